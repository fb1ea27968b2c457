"""The persistent state survives restarts and refuses unsafe names."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpbr.phases import ImageInfo
from xenpbr.state import StateDir, StateError, UnknownDomain, check_name
from xenpbr.timeline import Timeline


def test_register_then_phase_state_round_trips(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.register("web1", {"name": "web1", "on_crash": "phasereboot"}, 'name = "web1"\n', "vm.cfg")
    p = sd.phases("web1")
    p.phases, p.fingerprint = ("kernel", "app"), "F"
    p.record_image(ImageInfo("i1", "app", "F", 12.5))
    p.guard.on_crash(3.0)
    sd.save_phases(p)
    again = StateDir(tmp_path).phases("web1")  # a restarted daemon
    assert again == p
    assert sd.domains() == ["web1"]
    assert sd.xl_config_path("web1").read_text() == 'name = "web1"\n'


def test_re_registering_keeps_images(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.register("g", {}, "", "a.cfg")
    p = sd.phases("g")
    p.record_image(ImageInfo("i1", "app", "F", 1.0))
    sd.save_phases(p)
    sd.register("g", {"memory": 1}, "", "b.cfg")
    assert "app" in sd.phases("g").images


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".", "..", "x" * 65, "-x", "a b"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(StateError, match="not usable"):
        check_name(name)


def test_unknown_and_damaged_records_are_reported(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    with pytest.raises(UnknownDomain, match="xenpbr create"):
        sd.phases("nope")
    sd.register("g", {}, "", "a.cfg")
    (tmp_path / "domains/g/domain.json").write_text("{torn")
    with pytest.raises(StateError, match="damaged"):
        sd.phases("g")


def test_history_is_ordered_and_bounded(tmp_path: Path, monkeypatch) -> None:
    import xenpbr.state as state
    monkeypatch.setattr(state, "HISTORY_KEEP", 3)
    sd = StateDir(tmp_path)
    sd.register("g", {}, "", "a.cfg")
    for i in range(5):
        t = Timeline("g", "crash", method=f"m{i}")
        t.mark("crash_seen", now=float(i))
        sd.add_history(t)
    assert [t.method for t in sd.history("g")] == ["m2", "m3", "m4"]


def test_unregister_removes_everything(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.register("g", {}, "", "a.cfg")
    sd.add_history(Timeline("g", "crash"))
    sd.unregister("g")
    assert sd.domains() == [] and not (tmp_path / "domains/g").exists()


def test_latest_history_reads_the_newest_and_amend_rewrites_it(tmp_path) -> None:

    state = StateDir(tmp_path)
    state.register("g", {"name": "g"}, 'name = "g"\n', "c")
    assert state.latest_history("g") is None
    for method in ("phase:app", "normal-reboot"):
        t = Timeline("g", "crash")
        t.mark("crash_seen", now=1.0)
        t.method = method
        state.add_history(t)
    assert state.latest_history("g").method == "normal-reboot"
    assert not state.amend_latest_history("g", lambda t: False)
    assert state.amend_latest_history("g", lambda t: bool(t.mark("guest_ack", now=3.0)))
    assert [m.name for m in state.latest_history("g").marks] == ["crash_seen", "guest_ack"]
    assert [t.method for t in state.history("g")] == ["phase:app", "normal-reboot"]


def test_a_snapshot_publishes_the_phase_state_it_is_given(tmp_path: Path) -> None:
    """The phase controller publishes the phase state it loaded for the event, without
    reading it from disk again; without one, the stored state is read."""
    from xenpbr import publish
    state = StateDir(tmp_path)
    state.register("web", {"name": "web"}, 'name = "web"\n', "web.cfg")
    held = state.phases("web")
    held.phases = ("kernel", "app")
    held.record_image(ImageInfo("img-app", "app", "F", 5.0, seq=2))
    given = publish.snapshot(state, "web", "watching", 7, now=9.0, phases=held)
    assert given["phases"] == "kernel app" and given["images/app/id"] == "img-app"
    stored = publish.snapshot(state, "web", "watching", 7, now=9.0)
    assert stored["phases"] == "" and "images/app/id" not in stored


def test_domain_lock_serialises_a_domain_across_processes(tmp_path: Path) -> None:
    """domain_lock holds an exclusive flock on the domain's lock file while held."""
    import fcntl
    from xenpbr.state import domain_lock
    state = StateDir(tmp_path)
    with domain_lock(state, "web"):
        with open(tmp_path / "locks" / "web.lock") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "locks" / "web.lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
