"""Recovery follows the plan, falls back on failure, never leaves the domain down."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from xenpbr.phases import ImageInfo
from xenpbr.recovery import CandidateFailed, Recovery, RecoveryFailed
from xenpbr.state import StateDir

PHASES = ("kernel", "services", "app")


class FakeXen:
    """Toolstack + restorer + acknowledger recording what recovery asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.domids = itertools.count(10)
        self.bad_images: set[str] = set()
        self.create_fails = False
        self.ack_fails = False
        self.domain_state: str | None = None  # what `xl list` would say
        self.die_on_unpause = False  # simulates xenpbrd being killed at that point

    def destroy(self, name: str) -> None:
        self.calls.append(("destroy", name))

    def create(self, config: Path) -> int:
        self.calls.append(("create", config.name))
        if self.create_fails:
            raise CandidateFailed("xl create failed: out of memory")
        return next(self.domids)

    def unpause(self, domid: int) -> None:
        self.calls.append(("unpause", domid))
        if self.die_on_unpause:
            raise KeyboardInterrupt("killed")

    def state(self, name: str) -> str | None:
        return None if name.endswith("--crashed") else self.domain_state  # nothing set aside

    def restore(self, domain: str, image_id: str) -> int:
        self.calls.append(("restore", image_id))
        if image_id in self.bad_images:
            raise CandidateFailed(f"image {image_id} is corrupt")
        return next(self.domids)

    def restored(self, domid: int, seq: int, generation: int) -> None:
        if self.ack_fails:
            raise CandidateFailed("xenstore write failed")
        self.calls.append(("ack", domid, seq, generation))


def domain_with_an_image_per_phase(tmp_path: Path) -> StateDir:
    """A state dir where domain ``g`` has a valid image of each of :data:`PHASES`."""
    state = StateDir(tmp_path)
    state.register("g", {"name": "g"}, 'name = "g"\n', "g.cfg")
    p = state.phases("g")
    p.phases, p.fingerprint = PHASES, "F"
    for i, name in enumerate(PHASES):
        p.record_image(ImageInfo(f"img-{name}", name, "F", float(i), seq=i + 1))
    state.save_phases(p)
    return state


@pytest.fixture
def setup(tmp_path: Path):
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXen()
    clock = itertools.count(100.0, 0.5)
    return state, xen, Recovery(state, xen, xen, xen, clock=lambda: next(clock))


def test_deepest_image_restored_acked_and_unpaused(setup) -> None:
    state, xen, recovery = setup
    t = recovery.recover("g", "crash").timeline
    assert xen.calls == [("destroy", "g"), ("restore", "img-app"), ("ack", 10, 3, 1),
                         ("unpause", 10)]
    assert t.outcome == "recovered" and t.method == "phase:app"
    assert [m.name for m in t.marks] == ["crash_seen", "image_chosen", "destroyed",
                                         "restore_started", "restore_finished"]
    assert state.phases("g").generation == 1
    assert [h.method for h in state.history("g")] == ["phase:app"]


def test_the_result_says_what_was_brought_back_and_acked(setup) -> None:
    state, xen, recovery = setup
    result = recovery.recover("g", "crash")
    assert (result.domid, result.path, result.seq, result.generation) == (10, "phase:app",
                                                                          3, 1)
    assert result.restored_phase == "app" and result.timeline.domid == 10
    xen.bad_images = {"img-kernel", "img-services", "img-app"}
    result = recovery.recover("g", "crash")
    assert (result.domid, result.path, result.seq, result.generation) == (
        11, "normal-reboot", None, None)
    assert result.restored_phase is None


def test_corrupt_image_falls_back_and_is_never_planned_again(setup) -> None:
    state, xen, recovery = setup
    xen.bad_images = {"img-app"}
    t = recovery.recover("g", "crash").timeline
    assert t.method == "phase:services"
    assert t.attempts[0].startswith("phase:app failed: image img-app is corrupt")
    assert not state.phases("g").images["app"].verified
    xen.calls.clear()
    recovery.recover("g", "crash")
    assert ("restore", "img-app") not in xen.calls


def test_all_images_bad_ends_in_a_normal_reboot(setup) -> None:
    state, xen, recovery = setup
    xen.bad_images = {"img-app", "img-services", "img-kernel"}
    t = recovery.recover("g", "watchdog").timeline
    assert t.method == "normal-reboot" and ("create", "xl.cfg") in xen.calls
    assert state.phases("g").generation == 0  # a normal reboot is not a phase reboot


def test_failed_ack_destroys_the_paused_domain_and_falls_back(setup) -> None:
    state, xen, recovery = setup
    xen.ack_fails = True
    t = recovery.recover("g", "crash").timeline
    assert t.method == "normal-reboot"
    assert xen.calls.count(("destroy", "g")) == 1 + 3  # the crash + each half-restored one
    assert ("unpause", 10) not in xen.calls


def test_nothing_works_raises_and_keeps_the_record(setup) -> None:
    state, xen, recovery = setup
    xen.bad_images = {"img-app", "img-services", "img-kernel"}
    xen.create_fails = True
    with pytest.raises(RecoveryFailed, match="xenpbr history g"):
        recovery.recover("g", "crash")
    (record,) = list(state.history("g"))
    assert record.outcome == "failed" and len(record.attempts) == 4


def test_quick_re_crash_restores_an_earlier_phase(setup) -> None:
    state, xen, recovery = setup
    assert recovery.recover("g", "crash").path == "phase:app"
    assert recovery.recover("g", "crash").path == "phase:services"  # within 60 s


def test_operator_reboot_to_a_phase_and_unknown_phase(setup) -> None:
    state, xen, recovery = setup
    assert recovery.recover("g", "operator", max_phase="kernel").path == "phase:kernel"
    assert "app" in state.phases("g").images  # deeper images are kept, only skipped
    with pytest.raises(RecoveryFailed, match="no phase 'nope'"):
        recovery.recover("g", "operator", max_phase="nope")


def _register_with(state: StateDir, **settings: object) -> None:
    record = state.load_record("g")
    state.register("g", {"name": "g", **settings}, 'name = "g"\n', "g.cfg")
    assert state.load_record("g")["phases"] == record["phases"]


def test_configured_crash_loop_window_and_limit_are_applied(setup) -> None:
    state, xen, recovery = setup
    _register_with(state, xenpbr_crash_loop_window=5, xenpbr_crash_loop_limit=2)
    first = recovery.recover("g", "crash")  # clock steps 0.5 s: every crash is "quick"
    second = recovery.recover("g", "crash")
    third = recovery.recover("g", "crash")
    assert [first.path, second.path, third.path] == ["phase:app", "phase:services",
                                                           "normal-reboot"]
    assert any("crash loop: 2 crashes within 5 s" in s for s in third.timeline.skipped)


def test_crash_after_the_window_is_not_a_loop(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.register("g", {"name": "g", "xenpbr_crash_loop_window": 10}, 'name = "g"\n', "c")
    p = state.phases("g")
    p.phases, p.fingerprint = PHASES, "F"
    p.record_image(ImageInfo("img-app", "app", "F", 1.0, seq=3))
    state.save_phases(p)
    xen, now = FakeXen(), [100.0]
    recovery = Recovery(state, xen, xen, xen, clock=lambda: now[0])
    recovery.recover("g", "crash")
    now[0] += 11
    assert recovery.recover("g", "crash").path == "phase:app"
    now[0] = 5.0  # dom0 rebooted: monotonic time restarted below the last recovery
    assert recovery.recover("g", "crash").path == "phase:app"


def test_operator_reboots_do_not_feed_the_crash_loop_guard(setup) -> None:
    state, xen, recovery = setup
    for _ in range(4):
        assert recovery.recover("g", "operator").path == "phase:app"


def test_intent_is_cleared_when_the_recovery_ends(setup) -> None:
    state, xen, recovery = setup
    recovery.recover("g", "crash")
    assert state.recovery_intent("g") is None and state.interrupted_recoveries() == []


def test_recovery_killed_after_unpause_is_kept_on_resume(setup) -> None:
    state, xen, recovery = setup
    xen.die_on_unpause = True
    with pytest.raises(KeyboardInterrupt):
        recovery.recover("g", "crash")
    assert state.interrupted_recoveries() == ["g"]
    assert state.recovery_intent("g")["generation"] == 1
    xen.die_on_unpause, xen.domain_state = False, "-b----"
    xen.calls.clear()
    assert recovery.resume_interrupted("g") is None
    assert xen.calls == [] and state.interrupted_recoveries() == []
    assert state.phases("g").generation == 1  # the generation the guest was told


@pytest.mark.parametrize("left", [None, "--p---", "---s--"])
def test_recovery_killed_midway_is_redone_on_resume(setup, left) -> None:
    state, xen, recovery = setup
    state.begin_recovery("g", {"trigger": "crash"})
    xen.domain_state = left
    result = recovery.resume_interrupted("g")
    assert result is not None and result.timeline.trigger == "resume"
    assert result.path == "phase:app" and xen.calls[0] == ("destroy", "g")
    assert state.interrupted_recoveries() == []


def test_damaged_intent_still_means_unfinished(setup) -> None:
    state, xen, recovery = setup
    (state.root / "domains" / "g" / "recovering.json").write_text("{not json")
    assert state.recovery_intent("g") == {}
    assert recovery.resume_interrupted("g") is not None


def test_nothing_to_resume_without_an_intent(setup) -> None:
    state, xen, recovery = setup
    assert recovery.resume_interrupted("g") is None and xen.calls == []


def test_a_full_state_file_system_does_not_stop_a_recovery(setup, monkeypatch) -> None:
    """ENOSPC on the intent record once left a crashed guest down in the lab."""
    state, xen, recovery = setup

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(state, "begin_recovery", full)
    monkeypatch.setattr(state, "add_history", full)
    timeline = recovery.recover("g", "crash").timeline
    assert timeline.outcome == "recovered" and ("unpause", 10) in xen.calls


def test_history_records_why_each_image_was_skipped(setup) -> None:
    """Issue 12, point 7: every skipped image is in the timeline with its reason, an
    image of a phase the guest no longer declares included."""
    state, xen, recovery = setup
    p = state.phases("g")
    p.record_image(ImageInfo("img-old", "warmup", "F", 9.0, seq=9))  # renamed phase
    p.images["services"] = ImageInfo("img-services", "services", "OLD", 1.0, seq=2)
    state.save_phases(p)
    xen.bad_images = {"img-app"}
    t = recovery.recover("g", "crash").timeline
    assert t.attempts == ["phase:app failed: image img-app is corrupt", "phase:kernel"]
    assert "img-services (services): stale fingerprint" in t.skipped
    assert any(s.startswith("img-old (warmup): phase not declared") for s in t.skipped)
    (stored,) = state.history("g")
    assert stored.skipped == t.skipped and stored.attempts == t.attempts


def health_setup(tmp_path: Path, **settings):
    state = StateDir(tmp_path)
    state.register("g", {"name": "g", **settings}, 'name = "g"\n', "g.cfg")
    p = state.phases("g")
    p.phases, p.fingerprint = PHASES, "F"
    for i, name in enumerate(PHASES):
        p.record_image(ImageInfo(f"img-{name}", name, "F", float(i), seq=i + 1))
    state.save_phases(p)
    return state, fresh_recovery(state)


def fresh_recovery(state: StateDir, start: float = 0.0) -> Recovery:
    xen = FakeXen()
    clock = itertools.count(start, 500.0)  # crashes 500 s apart: no crash-loop guard
    return Recovery(state, xen, xen, xen, clock=lambda: next(clock))


def test_an_image_crashing_before_healthy_is_abandoned_and_the_history_says_why(
        tmp_path: Path) -> None:
    state, recovery = health_setup(tmp_path, xenpbr_image_failures=2)
    methods = [recovery.recover("g", "crash").path for _ in range(4)]
    assert methods == ["phase:app", "phase:app", "phase:services", "phase:services"]
    third = list(state.history("g"))[2]
    assert any(s == "img-app (app): abandoned: 2 restores crashed before healthy"
               for s in third.skipped), third.skipped
    assert any("img-app (app): restore 2 of 2 crashed before healthy (never reported "
               "ready)" in s for s in third.skipped), third.skipped


def test_failure_history_survives_a_xenpbrd_restart(tmp_path: Path) -> None:
    state, recovery = health_setup(tmp_path, xenpbr_image_failures=2)
    recovery.recover("g", "crash")
    recovery.recover("g", "crash")  # the first restore crashed before healthy
    reloaded = StateDir(tmp_path).phases("g")  # what a restarted xenpbrd reads
    assert reloaded.images["app"].failures == 1
    assert reloaded.trial is not None and reloaded.trial.image_id == "img-app"
    assert reloaded.trial.generation == reloaded.generation == 2
    restarted = fresh_recovery(StateDir(tmp_path), start=1e6)
    assert restarted.recover("g", "crash").path == "phase:services"  # 2nd failure


def test_the_recovery_records_the_domid_it_brought_back(setup) -> None:
    state, xen, recovery = setup
    assert recovery.recover("g", "crash").domid == 10
    xen.bad_images = {"img-kernel", "img-services", "img-app"}
    assert recovery.recover("g", "crash").domid == 11  # the normal reboot's domain
    assert list(state.history("g"))[-1].domid == 11
