"""Recovery with a standby domain (:class:`~xenpbr.recovery.Standbys`) or with room in
Xen for both (:class:`~xenpbr.recovery.Room`): the crashed domain is set aside instead
of destroyed first, unless a disk must be reverted or the guest was still running."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.unit.test_recovery import FakeXen, domain_with_an_image_per_phase
from xenpbr.recovery import CandidateFailed, Recovery
from xenpbr.state import StateDir


class FakeXenWithStandby(FakeXen):
    """A restorer that keeps a standby of ``held`` and a toolstack that renames."""

    def __init__(self, held: str | None) -> None:
        super().__init__()
        self.held = held
        self.rename_fails = False
        self.aside_left = False  # a set-aside domain is still there (xenpbrd was killed)

    def standby_image(self, domain: str) -> str | None:
        return self.held

    def state(self, name: str) -> str | None:
        return None if name.endswith("--crashed") and not self.aside_left else self.domain_state

    def rename(self, old: str, new: str) -> None:
        self.calls.append(("rename", old, new))
        if self.rename_fails:
            raise CandidateFailed("xl rename failed")


def recovery_with(state: StateDir, xen: FakeXen) -> Recovery:
    clock = itertools.count(100.0, 0.5)
    return Recovery(state, xen, xen, xen, clock=lambda: next(clock))


def test_with_a_standby_of_the_chosen_image_the_crashed_domain_is_destroyed_after(
        tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithStandby("img-app")
    timeline = recovery_with(state, xen).recover("g", "crash").timeline
    assert xen.calls == [("rename", "g", "g--crashed"), ("restore", "img-app"),
                         ("ack", 10, 3, 1), ("unpause", 10), ("destroy", "g--crashed")]
    destroyed = next(m for m in timeline.marks if m.name == "destroyed")
    assert destroyed.detail.startswith("set aside as g--crashed")


def test_a_set_aside_domain_is_destroyed_when_the_standbys_image_fails(
        tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithStandby("img-app")
    xen.bad_images = {"img-app", "img-services", "img-kernel"}
    xen.create_fails = True
    with pytest.raises(Exception, match="could not be recovered"):
        recovery_with(state, xen).recover("g", "crash")
    # destroyed once, after the standby's image failed: the next restores need its memory
    assert xen.calls[:3] == [("rename", "g", "g--crashed"), ("restore", "img-app"),
                             ("destroy", "g--crashed")]
    assert xen.calls.count(("destroy", "g--crashed")) == 1


@pytest.mark.parametrize("held", [None, "img-services"])
def test_without_a_standby_of_the_chosen_image_the_crashed_domain_goes_first(
        tmp_path: Path, held: str | None) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithStandby(held)
    recovery_with(state, xen).recover("g", "crash")
    assert xen.calls[0] == ("destroy", "g") and not any(c[0] == "rename" for c in xen.calls)


def test_a_disk_the_image_reverts_needs_the_crashed_domain_gone_first(tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    state.register("g", {"name": "g", "disk": ["vdev=xvda, target=/img/root"],
                         "xenpbr_disks": ["xvda=snapshot"]}, 'name = "g"\n', "g.cfg")
    xen = FakeXenWithStandby("img-app")
    recovery_with(state, xen).recover("g", "crash")
    assert xen.calls[0] == ("destroy", "g")


def test_a_failed_set_aside_destroys_the_crashed_domain_as_always(tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithStandby("img-app")
    xen.rename_fails = True
    recovery_with(state, xen).recover("g", "crash")
    assert xen.calls[:2] == [("rename", "g", "g--crashed"), ("destroy", "g")]
    assert ("destroy", "g--crashed") not in xen.calls


def test_a_set_aside_domain_left_by_a_killed_xenpbrd_is_destroyed_at_resume(
        tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithStandby("img-app")
    xen.domain_state = "-b----"  # the standby runs as g: handed back before the kill
    xen.aside_left = True
    state.begin_recovery("g", {"trigger": "crash"})
    assert recovery_with(state, xen).resume_interrupted("g") is None
    assert ("destroy", "g--crashed") in xen.calls
    xen.calls.clear()
    xen.aside_left = False
    state.begin_recovery("g", {"trigger": "crash"})
    recovery_with(state, xen).resume_interrupted("g")
    assert ("destroy", "g--crashed") not in xen.calls  # nothing set aside: nothing done


class FakeXenWithRoom(FakeXenWithStandby):
    """No standby, but a restorer that says whether Xen has room for both."""

    def __init__(self, room: bool) -> None:
        super().__init__(None)
        self.has_room = room

    def room_beside(self, domain: str, image_id: str) -> bool:
        self.calls.append(("room?", image_id))
        return self.has_room


@pytest.mark.parametrize("trigger", ["crash", "watchdog"])
def test_with_room_for_both_the_crashed_domain_is_destroyed_after_the_hand_over(
        tmp_path: Path, trigger: str) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithRoom(True)
    timeline = recovery_with(state, xen).recover("g", trigger).timeline
    assert xen.calls == [("room?", "img-app"), ("rename", "g", "g--crashed"),
                         ("restore", "img-app"), ("ack", 10, 3, 1), ("unpause", 10),
                         ("destroy", "g--crashed")]
    destroyed = next(m for m in timeline.marks if m.name == "destroyed")
    assert destroyed.detail == ("set aside as g--crashed (Xen has memory for both), "
                                "destroyed after the hand-over")


def test_without_room_the_crashed_domain_goes_first(tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithRoom(False)
    recovery_with(state, xen).recover("g", "crash")
    assert xen.calls[:3] == [("room?", "img-app"), ("destroy", "g"), ("restore", "img-app")]


def test_a_disk_to_revert_sends_the_crashed_domain_first_without_asking_for_room(
        tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    state.register("g", {"name": "g", "disk": ["vdev=xvda, target=/img/root"],
                         "xenpbr_disks": ["xvda=snapshot"]}, 'name = "g"\n', "g.cfg")
    xen = FakeXenWithRoom(True)
    recovery_with(state, xen).recover("g", "crash")
    assert xen.calls[0] == ("destroy", "g") and ("room?", "img-app") not in xen.calls


def test_a_failed_candidate_frees_the_set_aside_domain_for_the_next(tmp_path: Path) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXenWithRoom(True)
    xen.bad_images = {"img-app"}
    recovery_with(state, xen).recover("g", "crash")
    assert xen.calls[1:5] == [("rename", "g", "g--crashed"), ("restore", "img-app"),
                              ("destroy", "g--crashed"), ("restore", "img-services")]
    assert xen.calls.count(("destroy", "g--crashed")) == 1


@pytest.mark.parametrize("xen", [FakeXenWithRoom(True), FakeXenWithStandby("img-app")])
def test_a_running_guest_an_operator_reboots_is_never_set_aside(
        tmp_path: Path, xen: FakeXenWithStandby) -> None:
    state = domain_with_an_image_per_phase(tmp_path)
    recovery_with(state, xen).recover("g", "operator")
    assert xen.calls[0] == ("destroy", "g") and not any(c[0] in ("rename", "room?")
                                                        for c in xen.calls)
