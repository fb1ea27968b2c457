"""What follows a phase-based reboot waits for the guest's ``ready``
(:mod:`xenpbr.controller.aftermath`): alone, and in xenpbrd over the fake hypervisor."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from tests.unit.test_liveness import Clock
from tests.unit.test_daemon import Recorder, crash_and_recover, settle
from tests.unit.test_recovery import FakeXen, domain_with_an_image_per_phase
from xenpbr.controller.aftermath import Aftermath
from xenpbr.daemon import Daemon
from xenpbr.hypervisor.fake import FakeHypervisor
from xenpbr.images.store import ImageStore
from xenpbr.recovery import Recovery
from xenpbr.state import StateDir
from xenpbr.xenstore import FakeXenstoreServer


@pytest.fixture
def held() -> tuple[Aftermath, list[tuple[str, ...]], Clock]:
    calls: list[tuple[str, ...]] = []
    clock = Clock()
    aftermath = Aftermath(lambda name, aside: calls.append(("destroy", name, aside)),
                          lambda name: calls.append(("warm", name)), clock, grace_s=60)
    return aftermath, calls, clock


def test_the_guests_ready_destroys_its_crashed_domain_then_warms_up(held, caplog) -> None:
    aftermath, calls, _ = held
    aftermath.hold("g", "g--crashed")
    assert aftermath.holding("g") and calls == []
    caplog.set_level(logging.INFO, "xenpbr.controller.aftermath")
    aftermath.guest_ready("g")
    assert calls == [("destroy", "g", "g--crashed"), ("warm", "g")]
    assert "destroyed g--crashed (the guest reported ready)" in caplog.text
    assert not aftermath.holding("g")
    aftermath.guest_ready("g")  # a second note: nothing held any more
    assert len(calls) == 2


def test_a_recovery_without_a_domain_aside_still_waits_to_warm_up(held) -> None:
    aftermath, calls, _ = held
    aftermath.hold("g", None)
    aftermath.guest_ready("h")  # another domain's note
    assert calls == [] and aftermath.holding("g")
    aftermath.guest_ready("g")
    assert calls == [("warm", "g")]


def test_a_guest_that_never_reports_gets_its_aftermath_after_the_grace(held, caplog) -> None:
    aftermath, calls, clock = held
    aftermath.hold("g", "g--crashed")
    clock.now += 59.9
    aftermath.settle_due()
    assert calls == []
    clock.now += 0.1
    caplog.set_level(logging.INFO, "xenpbr.controller.aftermath")
    aftermath.settle_due()
    assert calls == [("destroy", "g", "g--crashed"), ("warm", "g")]
    assert "no ready from the guest within 60 s" in caplog.text


def test_another_recovery_frees_the_memory_and_keeps_the_warm_up_held(held) -> None:
    aftermath, calls, _ = held
    aftermath.hold("g", "g--crashed")
    aftermath.hold("h", None)
    aftermath.free_memory()
    assert calls == [("destroy", "g", "g--crashed")]
    assert aftermath.holding("g") and aftermath.holding("h")
    aftermath.free_memory()  # destroyed once
    aftermath.guest_ready("g")
    assert calls == [("destroy", "g", "g--crashed"), ("warm", "g")]


def test_stopping_destroys_what_is_aside_and_starts_no_warm_up(held) -> None:
    aftermath, calls, clock = held
    aftermath.hold("g", "g--crashed")
    aftermath.hold("h", None)
    aftermath.stop()
    clock.now += 3600
    aftermath.settle_due()
    aftermath.guest_ready("h")
    assert calls == [("destroy", "g", "g--crashed")]


# -- Recovery leaves the set-aside domain to its caller -------------------------------------

class RoomyXen(FakeXen):
    """Xen with room for the image beside the crashed domain, and renames."""

    def room_beside(self, domain: str, image_id: str) -> bool:
        return True

    def rename(self, old: str, new: str) -> None:
        self.calls.append(("rename", old, new))


def test_with_keep_aside_the_recovery_hands_the_crashed_domain_to_its_caller(
        tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = RoomyXen()
    clock = itertools.count(100.0, 0.5)
    result = Recovery(state, xen, xen, xen, clock=lambda: next(clock),
                      keep_aside=True).recover("g", "crash")
    assert result.set_aside == "g--crashed"
    assert xen.calls == [("rename", "g", "g--crashed"), ("restore", "img-app"),
                         ("ack", 10, 3, 1), ("unpause", 10)]
    destroyed = next(m for m in result.timeline.marks if m.name == "destroyed")
    assert destroyed.detail == ("set aside as g--crashed (Xen has memory for both), "
                                "destroyed once the guest reports ready")


def test_with_keep_aside_a_failed_recovery_still_destroys_what_it_set_aside(
        tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = RoomyXen()
    xen.bad_images = {"img-app"}
    result = Recovery(state, xen, xen, xen, keep_aside=True).recover("g", "crash")
    assert result.set_aside is None and result.path == "phase:services"
    assert xen.calls.count(("destroy", "g--crashed")) == 1  # before the next candidate


# -- in xenpbrd -----------------------------------------------------------------------------

class RoomyRecorder(Recorder):
    """The daemon test's toolstack and restorer, with room beside and ``xl rename``."""

    def __init__(self, hv: FakeHypervisor) -> None:
        super().__init__(hv)
        self.domains: set[str] = set()

    def room_beside(self, domain: str, image_id: str) -> bool:
        return True

    def rename(self, old: str, new: str) -> None:
        self.calls.append(("rename", old, new))
        self.domains.add(new)

    def destroy(self, name: str) -> None:
        super().destroy(name)
        self.domains.discard(name)

    def state(self, name: str) -> str | None:
        return "--p--c" if name in self.domains else None


@pytest.fixture
def roomy(tmp_path: Path):
    server = FakeXenstoreServer()
    hv = FakeHypervisor(server)
    state = StateDir(tmp_path)
    state.register("web", {"name": "web", "on_crash": "phasereboot"},
                   'name = "web"\ntype = "pv"\nmemory = 128\non_crash = "phasereboot"\n',
                   "web.cfg")
    rec = RoomyRecorder(hv)
    daemon = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                    server.connect(0), toolstack=rec, restorer=rec, capture_fn=rec.capture)
    daemon.watcher.start()
    return server, hv, state, rec, daemon


@pytest.mark.parametrize("note", [b"ready 1", b"steps-failed 1"])
def test_xenpbrd_destroys_the_crashed_domain_when_the_guest_reports_in(roomy,
                                                                      note: bytes) -> None:
    server, hv, state, rec, daemon = roomy
    new = crash_and_recover(server, hv, rec, daemon)
    assert ("rename", "web", "web--crashed") in rec.calls
    assert ("destroy", "web--crashed") not in rec.calls  # the guest resumes first
    guest = server.connect(new)
    guest.write("data/xenpbr/status", b"acked 1")
    settle(daemon)
    assert ("destroy", "web--crashed") not in rec.calls
    guest.write("data/xenpbr/status", note)
    settle(daemon)
    assert rec.calls.count(("destroy", "web--crashed")) == 1
    assert not daemon.controller.recoveries.aftermath.holding("web")


def test_xenpbrd_destroys_the_crashed_domain_of_a_silent_guest_after_the_grace(
        roomy, monkeypatch) -> None:
    server, hv, state, rec, daemon = roomy
    crash_and_recover(server, hv, rec, daemon)
    aftermath = daemon.controller.recoveries.aftermath
    monkeypatch.setattr(aftermath, "grace_s", 0.0)
    aftermath.hold("web", "web--crashed")  # held again, due at once
    settle(daemon, 1)
    assert ("destroy", "web--crashed") in rec.calls and not aftermath.holding("web")


def test_xenpbrd_leaves_no_crashed_domain_aside_when_it_stops(roomy) -> None:
    server, hv, state, rec, daemon = roomy
    crash_and_recover(server, hv, rec, daemon)
    daemon.stop()
    daemon.controller.stop()
    assert "web--crashed" not in rec.domains


def test_a_crashed_domain_left_aside_by_a_previous_xenpbrd_goes_at_start(roomy) -> None:
    server, hv, state, rec, daemon = roomy
    rec.domains.add("web--crashed")  # the last xenpbrd was killed before the guest's ready
    daemon.controller.resume_interrupted()
    assert rec.calls == [("destroy", "web--crashed")]
