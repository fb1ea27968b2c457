"""xenpbrd's handlers over the fake hypervisor and fake xenstore (real Xen: tests/lab)."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest

from xenpbr.daemon import Daemon
from xenpbr.guestproto import control, wire
from xenpbr.hypervisor.fake import FakeHypervisor
from xenpbr.images.store import ImageStore
from xenpbr.state import StateDir
from xenpbr.xenstore import FakeXenstoreServer

CONFIG = 'name = "web"\ntype = "pv"\nmemory = 128\non_crash = "phasereboot"\n'


class Recorder:
    """Capture function, toolstack and restorer that record calls."""

    def __init__(self, hv: FakeHypervisor) -> None:
        self.hv, self.calls, self.captures = hv, [], 0

    def capture(self, name, store, phase, seq, fingerprint, **_):
        self.captures += 1
        self.calls.append(("capture", name, phase, seq))
        meta = types.SimpleNamespace(image_id=f"img-{phase}-{seq}")
        return types.SimpleNamespace(meta=meta, total_s=0.1)

    def destroy(self, name):
        self.calls.append(("destroy", name))

    def create(self, config):
        self.calls.append(("create", config.name))
        return self.hv.create_domain(name="web")

    def unpause(self, domid):
        self.calls.append(("unpause", domid))
        self.hv.unpause(domid)

    def state(self, name):
        return None

    def restore(self, domain, image_id):
        self.calls.append(("restore", image_id))
        return self.hv.create_domain(name="web", paused=True)


@pytest.fixture
def world(tmp_path: Path):
    server = FakeXenstoreServer()
    hv = FakeHypervisor(server)
    state = StateDir(tmp_path)
    state.register("web", {"name": "web", "on_crash": "phasereboot"}, CONFIG, "web.cfg")
    rec = Recorder(hv)
    daemon = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                    server.connect(0), toolstack=rec, restorer=rec, capture_fn=rec.capture)
    daemon.watcher.start()
    return server, hv, state, rec, daemon


def request(seq: int, phase: str) -> bytes:
    return json.dumps({"v": 1, "seq": seq, "phase": phase, "phases": ["kernel", "app"],
                       "identity": "v1", "wait": 60, "disks": [], "services": [],
                       "hazards": []}).encode()


def settle(daemon: Daemon, rounds: int = 3) -> None:
    for _ in range(rounds):
        daemon.turn()


def test_boundary_is_captured_then_skipped_after_a_normal_reboot(world) -> None:
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    guest = server.connect(domid)
    guest.write("data/xenpbr/request", request(1, "kernel"))
    settle(daemon)
    assert server.connect(0).read(control.ack_path(domid)) == b"1 captured"
    assert rec.calls == [("capture", "web", "kernel", 1)]
    images = state.phases("web").images
    assert images["kernel"].image_id == "img-kernel-1" and images["kernel"].seq == 1
    guest.write("data/xenpbr/request", request(2, "kernel"))  # same phase, same fingerprint
    settle(daemon)
    assert server.connect(0).read(control.ack_path(domid)) == b"2 skipped"
    assert rec.captures == 1


def crash_and_recover(server, hv, rec, daemon) -> int:
    domid = hv.create_domain(name="web")
    settle(daemon)
    server.connect(domid).write("data/xenpbr/request", request(1, "app"))
    settle(daemon)
    hv.crash(domid)
    settle(daemon)
    return [c for c in rec.calls if c[0] == "unpause"][0][1]


def test_crash_of_a_registered_domain_is_recovered_from_its_image(world) -> None:
    server, hv, state, rec, daemon = world
    new = crash_and_recover(server, hv, rec, daemon)
    assert ("destroy", "web") in rec.calls and ("restore", "img-app-1") in rec.calls
    assert server.connect(0).read(control.ack_path(new)) == b"1 restored:1"
    (timeline,) = state.history("web")
    assert timeline.method == "phase:app" and timeline.outcome == "recovered"


def test_unregistered_and_hostile_domains_do_not_disturb_the_daemon(world) -> None:
    server, hv, state, rec, daemon = world
    other = hv.create_domain(name="stranger")
    web = hv.create_domain(name="web")
    settle(daemon)
    server.connect(web).write("data/xenpbr/request", b"\xff" * 100)
    hv.crash(other)
    settle(daemon)
    assert rec.calls == []  # the stranger is not ours; garbage is refused, not captured
    server.connect(web).write("data/xenpbr/request", request(5, "kernel"))
    settle(daemon)
    assert server.connect(0).read(control.ack_path(web)) == b"5 captured"
    assert published(server)["refusals/bad-request-encoding"] == "1"


def test_failed_capture_is_refused_and_daemon_goes_on(world) -> None:
    server, hv, state, rec, daemon = world
    from xenpbr.images.errors import CaptureFailed

    def broken(*args, **kwargs):
        raise CaptureFailed("xl save failed: no space")
    daemon.controller.boundaries.capture = broken
    domid = hv.create_domain(name="web")
    settle(daemon)
    server.connect(domid).write("data/xenpbr/request", request(1, "kernel"))
    settle(daemon)
    assert server.connect(0).read(control.ack_path(domid)) == b"1 refused:capture-failed"


def published(server: FakeXenstoreServer, name: str = "web") -> dict[str, str]:
    """Everything xenpbrd published for ``name``, as relative key -> value."""
    dom0, root, out = server.connect(0), f"/xenpbr/domains/{name}", {}

    def walk(rel: str) -> None:
        path = f"{root}/{rel}" if rel else root
        value = dom0.read(path)
        if value:
            out[rel] = value.decode()
        for child in dom0.ls(path):
            walk(f"{rel}/{child}" if rel else child)
    walk("")
    return out


def test_guest_status_notes_complete_the_recovery_timeline(world) -> None:
    server, hv, state, rec, daemon = world
    new = crash_and_recover(server, hv, rec, daemon)
    guest = server.connect(new)
    guest.write("data/xenpbr/status", b"acked 7")  # another generation: ignored
    settle(daemon)
    (timeline,) = state.history("web")
    assert timeline.at("guest_ack") is None
    guest.write("data/xenpbr/status", b"acked 1")
    settle(daemon)
    guest.write("data/xenpbr/status", b"ready 1")
    settle(daemon)
    (timeline,) = state.history("web")
    marks = [m.name for m in timeline.marks]
    assert marks[-2:] == ["guest_ack", "service_ready"]
    assert timeline.downtime() == round(timeline.at("service_ready")
                                        - timeline.at("crash_seen"), 3)


def test_state_is_published_in_xenstore(world) -> None:
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    assert published(server)["status"] == "watching"
    assert published(server)["domid"] == str(domid)
    server.connect(domid).write("data/xenpbr/request", request(1, "app"))
    settle(daemon)
    keys = published(server)
    assert keys["phases"] == "kernel app" and keys["images/app/id"] == "img-app-1"
    assert keys["images/app/valid"] == "1" and float(keys["images/app/created"]) > 0
    hv.crash(domid)
    settle(daemon)
    keys = published(server)
    assert keys["last-recovery/method"] == "phase:app"
    assert keys["last-recovery/outcome"] == "recovered" and keys["generation"] == "1"
    new = [c for c in rec.calls if c[0] == "unpause"][0][1]
    assert keys["status"] == "watching" and keys["domid"] == str(new)


def test_guests_cannot_read_the_published_state(world) -> None:
    from xenpbr.xenstore import PermissionDenied
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    with pytest.raises(PermissionDenied):
        server.connect(domid).read("/xenpbr/domains/web/status")


def test_interrupted_recovery_is_finished_at_start(world) -> None:
    server, hv, state, rec, daemon = world
    state.begin_recovery("web", {"trigger": "crash"})
    daemon.controller.resume_interrupted()
    assert rec.calls[0] == ("destroy", "web") and ("create", "xl.cfg") in rec.calls
    assert state.interrupted_recoveries() == []
    assert [t.trigger for t in state.history("web")] == ["resume"]


def test_a_domain_restored_by_someone_else_keeps_its_ack(world) -> None:
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    control.prepare_domain(server.connect(0), domid, generation=4)
    control.write_ack(server.connect(0), domid, wire.Ack(9, wire.Verdict.restored(4)))
    settle(daemon)
    dom0 = server.connect(0)
    assert dom0.read(control.ack_path(domid)) == b"9 restored:4"
    assert dom0.read(control.generation_path(domid)) == b"4"


def test_restarted_daemon_treats_the_answered_request_as_a_replay(world, tmp_path) -> None:
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    server.connect(domid).write("data/xenpbr/request", request(1, "kernel"))
    settle(daemon)
    assert rec.captures == 1
    again = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                   server.connect(0), toolstack=rec, restorer=rec, capture_fn=rec.capture)
    again.watcher.start()
    settle(again)  # the request watch fires at once with the old, answered request
    assert rec.captures == 1
    assert server.connect(0).read(control.ack_path(domid)) == b"1 captured"
    server.connect(domid).write("data/xenpbr/request", request(2, "app"))
    settle(again)
    assert rec.captures == 2


def test_restarted_daemon_answers_a_request_left_pending(world) -> None:
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    daemon.watcher.close()  # xenpbrd dies; the guest asks meanwhile
    server.connect(domid).write("data/xenpbr/request", request(1, "kernel"))
    again = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                   server.connect(0), toolstack=rec, restorer=rec, capture_fn=rec.capture)
    again.watcher.start()
    settle(again)
    assert server.connect(0).read(control.ack_path(domid)) == b"1 captured"


def test_unsafe_boundary_is_refused_with_a_detail_the_guest_can_read(world) -> None:
    server, hv, state, rec, daemon = world
    state.register("web", {"name": "web", "on_crash": "phasereboot",
                           "disk": ["vdev=xvdb, target=/img/data"],
                           "xenpbr_disks": ["xvdb=persistent"]}, CONFIG, "web.cfg")
    domid = hv.create_domain(name="web")
    settle(daemon)
    doc = json.loads(request(1, "kernel"))
    doc["hazards"] = ["xvdb 312 auditd /data/audit/audit.log"]
    server.connect(domid).write("data/xenpbr/request", json.dumps(doc).encode())
    settle(daemon)
    guest = server.connect(domid)
    assert guest.read(control.ack_path(domid)) == b"1 refused:hazard"
    detail = guest.read(f"/local/domain/{domid}/{wire.DETAIL_KEY}").decode()
    assert detail.startswith("pid 312 (auditd) has /data/audit/audit.log open for writing")
    assert rec.captures == 0
    doc.update(seq=2, hazards=[])
    guest.write("data/xenpbr/request", json.dumps(doc).encode())
    settle(daemon)
    assert guest.read(control.ack_path(domid)) == b"2 captured"
    assert guest.read(f"/local/domain/{domid}/{wire.DETAIL_KEY}") == b""


def test_cli_refresh_keeps_the_published_status_and_domid(world) -> None:
    from xenpbr import publish
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    server.connect(domid).write("data/xenpbr/request", request(1, "app"))
    settle(daemon)
    phases = state.phases("web")
    phases.forget(None)
    state.save_phases(phases)
    assert publish.refresh(server.connect(0), state, "web")
    keys = published(server)
    assert keys["status"] == "watching" and keys["domid"] == str(domid)
    assert not any(k.startswith("images/") for k in keys)


def test_a_crash_during_a_capture_is_recovered(world) -> None:
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    server.connect(domid).write("data/xenpbr/request", request(1, "kernel"))
    settle(daemon)  # the kernel image exists now

    def crashing(name, store, phase, seq, fingerprint, crashed, **_):
        assert not crashed()  # the guard's check: running is not crashed
        hv.crash(domid)  # the guest dies while xl save waits for it to suspend
        assert crashed()  # what makes the capture's guard kill xl at once
        from xenpbr.images.errors import CaptureFailed
        raise CaptureFailed("guest didn't acknowledge suspend")
    daemon.controller.boundaries.capture = crashing
    server.connect(domid).write("data/xenpbr/request", request(2, "app"))
    settle(daemon)
    assert ("restore", "img-kernel-1") in rec.calls
    (timeline,) = state.history("web")
    assert timeline.method == "phase:kernel" and timeline.outcome == "recovered"


# -- issue 12 point 6: adoption matches the UUID xenpbr create gave the domain ----------

WEB_UUID = "3f1d2c4b-5a69-4788-9abc-def012345678"


@pytest.fixture
def uuid_world(world):
    """``world`` with web registered under WEB_UUID; the recorder's restores and
    normal reboots create the domain with that UUID, as xl does from the saved config."""
    import uuid as uuid_mod
    server, hv, state, rec, daemon = world
    state.register("web", {"name": "web", "on_crash": "phasereboot", "uuid": WEB_UUID},
                   CONFIG, "web.cfg", uuid=WEB_UUID)
    own = uuid_mod.UUID(WEB_UUID)
    rec.restore = lambda domain, image_id: (rec.calls.append(("restore", image_id)),
                                            hv.create_domain(name="web", paused=True,
                                                             uuid=own))[1]
    return server, hv, state, rec, daemon, own


def test_a_domain_reusing_the_name_under_another_uuid_is_not_adopted(uuid_world,
                                                                     caplog) -> None:
    import uuid as uuid_mod
    server, hv, state, rec, daemon, _ = uuid_world
    other = uuid_mod.UUID("00000000-1111-4222-8333-444455556666")
    domid = hv.create_domain(name="web", uuid=other)
    with caplog.at_level("WARNING", logger="xenpbr.controller.adoption"):
        settle(daemon)
    assert domid not in daemon.controller.watches.watching
    assert domid not in daemon.controller.names.names
    (warning,) = [r.getMessage() for r in caplog.records if "not adopted" in r.getMessage()]
    assert str(other) in warning and WEB_UUID in warning
    server.connect(domid).write("data/xenpbr/request", request(1, "app"))
    hv.crash(domid)
    settle(daemon)
    assert rec.calls == [] and list(state.history("web")) == []  # left alone


def test_the_domain_with_the_registered_uuid_is_adopted_and_recovered(uuid_world) -> None:
    server, hv, state, rec, daemon, own = uuid_world
    domid = hv.create_domain(name="web", uuid=own)
    settle(daemon)
    assert domid in daemon.controller.watches.watching
    server.connect(domid).write("data/xenpbr/request", request(1, "app"))
    settle(daemon)
    hv.crash(domid)
    settle(daemon)
    (new,) = [c[1] for c in rec.calls if c[0] == "unpause"]
    # the restored domain (same UUID) is adopted again
    assert new in daemon.controller.watches.watching
    (timeline,) = state.history("web")
    assert timeline.outcome == "recovered"


def test_an_unregistered_domain_is_no_longer_recovered(uuid_world) -> None:
    server, hv, state, rec, daemon, own = uuid_world
    domid = hv.create_domain(name="web", uuid=own)
    settle(daemon)
    state.unregister("web")
    hv.crash(domid)
    settle(daemon)
    assert rec.calls == []


# -- issue 13: published domid (point 4), image replacement and health (point 3) ------------


def boundary(seq: int, phase: str, identity: str = "v1") -> bytes:
    return json.dumps({"v": 1, "seq": seq, "phase": phase, "phases": ["kernel", "app"],
                       "identity": identity, "wait": 60, "disks": [], "services": [],
                       "hazards": []}).encode()


def ack(server: FakeXenstoreServer, domid: int) -> bytes:
    return server.connect(0).read(control.ack_path(domid))


def test_published_domid_is_the_recovered_domain_as_soon_as_it_is_back(world) -> None:
    server, hv, state, rec, daemon = world
    old = hv.create_domain(name="web")
    settle(daemon)
    assert published(server)["domid"] == str(old)
    server.connect(old).write("data/xenpbr/request", boundary(1, "app"))
    settle(daemon)
    hv.crash(old)
    daemon.turn()  # the turn that recovers it: nothing else has run yet
    new = [c for c in rec.calls if c[0] == "unpause"][0][1]
    keys = published(server)
    assert (keys["status"], keys.get("domid")) == ("watching", str(new))
    settle(daemon)  # the old domain's destruction and the new one's adoption
    keys = published(server)
    assert (keys["status"], keys.get("domid")) == ("watching", str(new))


def test_cli_refresh_publishes_the_running_domid_not_a_stale_one(world) -> None:
    from xenpbr import publish
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    publish.publish(server.connect(0), state, "web", "watching", None)  # stale: ""
    assert publish.refresh(server.connect(0), state, "web")
    assert published(server)["domid"] == str(domid)


def test_a_run_cannot_replace_a_phase_it_passed_with_another_identity(world) -> None:
    server, hv, state, rec, daemon = world
    domid = hv.create_domain(name="web")
    settle(daemon)
    guest = server.connect(domid)
    guest.write("data/xenpbr/request", boundary(1, "app"))
    settle(daemon)
    guest.write("data/xenpbr/request", boundary(2, "app", identity="evil"))
    settle(daemon)
    assert ack(server, domid) == b"2 refused:out-of-order"
    assert b"passed that phase already" in server.connect(0).read(
        f"/local/domain/{domid}/control/xenpbr/detail")
    phases = state.phases("web")
    assert rec.captures == 1 and phases.images["app"].image_id == "img-app-1"
    (image,) = phases.images.values()
    assert phases.fingerprint == image.fingerprint  # the refused claim was not taken


def test_a_restored_run_cannot_replace_the_image_it_was_restored_from(world) -> None:
    server, hv, state, rec, daemon = world
    new = crash_and_recover(server, hv, rec, daemon)
    settle(daemon)
    server.connect(new).write("data/xenpbr/request", boundary(2, "app", identity="evil"))
    settle(daemon)
    assert ack(server, new) == b"2 refused:out-of-order" and rec.captures == 1


def test_a_later_run_replaces_an_image_once_it_is_old_enough(world) -> None:
    server, hv, state, rec, daemon = world
    first = hv.create_domain(name="web")
    settle(daemon)
    server.connect(first).write("data/xenpbr/request", boundary(1, "app"))
    settle(daemon)
    hv.destroy(first)
    second = hv.create_domain(name="web")  # a fresh boot with new software
    settle(daemon)
    server.connect(second).write("data/xenpbr/request", boundary(1, "app", identity="v2"))
    settle(daemon)
    assert ack(server, second) == b"1 refused:rate-limited" and rec.captures == 1
    phases = state.phases("web")
    phases.images["app"] = dataclasses.replace(phases.images["app"], created_at=0.0)
    state.save_phases(phases)
    hv.destroy(second)
    third = hv.create_domain(name="web")
    settle(daemon)
    dropped: list[str] = []
    daemon.controller.boundaries.drop_image = (
        lambda name, image_id: dropped.append(image_id))
    server.connect(third).write("data/xenpbr/request", boundary(5, "app", identity="v2"))
    settle(daemon)
    assert ack(server, third) == b"5 captured"
    image = state.phases("web").images["app"]
    assert (image.image_id, image.replaced, image.failures) == ("img-app-5", "img-app-1", 0)
    assert dropped == ["img-app-1"]  # the replaced image can never be restored again


def test_ready_note_starts_the_restored_images_healthy_clock(world) -> None:
    server, hv, state, rec, daemon = world
    new = crash_and_recover(server, hv, rec, daemon)
    trial = state.phases("web").trial
    assert trial is not None and trial.image_id == "img-app-1" and trial.ready_at is None
    server.connect(new).write("data/xenpbr/status", b"ready 1")
    settle(daemon)
    assert state.phases("web").trial.ready_at is not None


# -- issue 13: a flood costs only the flooder (point 1), refusals acked and shown (point 2) --


def second_domain(state: StateDir, name: str = "calm") -> None:
    state.register(name, {"name": name, "on_crash": "phasereboot"},
                   CONFIG.replace('"web"', f'"{name}"'), f"{name}.cfg")


def polls(daemon: Daemon) -> list[int]:
    """The domids whose request the daemon reads, in order (recorded from now on)."""
    seen: list[int] = []
    poll = daemon.controller.protocol.poll

    def recording(domid: int):
        seen.append(domid)
        return poll(domid)
    daemon.controller.protocol.poll = recording
    return seen


def test_a_flood_is_read_once_per_turn_and_the_calm_guest_is_served(world) -> None:
    server, hv, state, rec, daemon = world
    second_domain(state)
    web, calm = hv.create_domain(name="web"), hv.create_domain(name="calm")
    settle(daemon)
    seen = polls(daemon)
    flooder = server.connect(web)
    for seq in range(1, 501):  # each write is a watch event for dom0
        flooder.write("data/xenpbr/request", request(seq, "kernel"))
    server.connect(calm).write("data/xenpbr/request", request(1, "kernel"))
    daemon.turn()
    assert ack(server, calm) == b"1 captured"
    assert seen.count(web) == 1 and seen.count(calm) == 1  # coalesced, round robin
    settle(daemon)
    assert ack(server, web) == b"500 captured"  # the newest request is the one answered


def test_a_flooding_guest_costs_dom0_bounded_ack_writes(world) -> None:
    server, hv, state, rec, daemon = world
    web = hv.create_domain(name="web")
    settle(daemon)
    watcher = server.connect(0)
    watcher.watch(control.ack_path(web), "acks")
    while watcher.read_watch(timeout=0) is not None:
        pass
    flooder = server.connect(web)
    for seq in range(1, 301):  # no turn in between: as fast as the guest can write
        flooder.write("data/xenpbr/request", request(seq, "a/b"))
        daemon.turn()
    acks = 0
    while watcher.read_watch(timeout=0) is not None:
        acks += 1
    # each ack fires the watch twice (its write, its perms): the burst of
    # guestproto.gate.REFUSAL_ACK_RATE and what refilled meanwhile, not one per request
    assert acks // 2 <= 12, acks
    assert daemon.controller.protocol.gate.refusal_counts(web)["bad-request:phase"] <= 300


def test_a_lost_watch_event_is_answered_by_the_sweep(world, monkeypatch) -> None:
    from xenpbr import daemon as daemon_mod
    server, hv, state, rec, daemon = world
    web = hv.create_domain(name="web")
    settle(daemon)
    server.connect(web).write("data/xenpbr/request", request(1, "kernel"))
    while daemon.xs.read_watch(timeout=0) is not None:
        pass  # the event is lost (xenstored dropped it, dom0 was busy...)
    daemon.turn()
    assert server.connect(0).read_or(control.ack_path(web), None) is None  # unanswered
    monkeypatch.setattr(daemon_mod, "SWEEP_S", 0.0)
    daemon.turn()
    assert ack(server, web) == b"1 captured"


def test_an_accepted_request_is_answered_even_if_dom0_fails_on_it(world) -> None:
    server, hv, state, rec, daemon = world

    def buggy(*args, **kwargs):
        raise RuntimeError("a bug in the capture path")
    daemon.controller.boundaries.capture = buggy
    web = hv.create_domain(name="web")
    settle(daemon)
    server.connect(web).write("data/xenpbr/request", request(1, "kernel"))
    settle(daemon)
    assert ack(server, web) == b"1 refused:capture-failed"
    assert published(server)["status"] == "watching"  # never left as capturing
    daemon.controller.boundaries.capture = rec.capture
    server.connect(web).write("data/xenpbr/request", request(2, "kernel"))
    settle(daemon)
    assert ack(server, web) == b"2 captured"  # not busy forever


#: Issue 13's bad requests, each with a fresh seq, and the refusal each must get.
BAD_NAMES = [("../../etc", ["kernel", "app"], "bad-request:phase"),
             ("a/b", ["kernel", "app"], "bad-request:phase"),
             ("a\x00b", ["kernel", "app"], "bad-request:phase"),
             ("p" * 300, ["kernel", "app"], "bad-request:phase"),
             ("ghost", ["kernel", "app"], "unknown-phase"),
             ("kernel", ["kernel", "../x"], "bad-request:phases")]


def test_bad_requests_after_a_flood_are_refused_counted_and_published(world,
                                                                      monkeypatch) -> None:
    from xenpbr import publish
    from xenpbr.controller import publishing
    server, hv, state, rec, daemon = world
    web = hv.create_domain(name="web")
    settle(daemon)
    guest = server.connect(web)
    for seq in range(1, 101):
        guest.write("data/xenpbr/request", request(seq, "kernel"))
        daemon.turn()
    settle(daemon)
    monkeypatch.setattr(daemon.controller.protocol.gate, "clock",
                        lambda: 1e9)  # budgets refilled
    daemon.controller.protocol._ack_buckets.clear()
    daemon._read_budget.clear()
    for n, (phase, phases, reason) in enumerate(BAD_NAMES):
        doc = json.loads(request(1000 + n, "kernel"))
        guest.write("data/xenpbr/request", json.dumps({**doc, "phase": phase,
                                                       "phases": phases}).encode())
        daemon.turn()
        assert ack(server, web) == f"{1000 + n} refused:{reason}".encode()
    monkeypatch.setattr(publishing, "PUBLISH_EVERY_S", 0.0)
    daemon.turn()
    keys = published(server)
    assert keys["refusals/bad-request-phase"] == "4" and keys["refusals/unknown-phase"] == "1"
    assert int(keys["refusals/rate-limited"]) >= 1  # the flood, read within its budget
    shown = publish.read_refusals(server.connect(0), "web")
    assert shown["bad-request:phase"] == 4 and shown["bad-request:phases"] == 1
    publish.refresh(server.connect(0), state, "web")  # as the CLI does after its changes
    assert publish.read_refusals(server.connect(0), "web") == shown


def test_a_pending_refusal_publication_does_not_revive_a_stopped_domain(world,
                                                                        monkeypatch) -> None:
    from xenpbr.controller import publishing
    server, hv, state, rec, daemon = world
    web = hv.create_domain(name="web")
    settle(daemon)
    server.connect(web).write("data/xenpbr/request", request(1, "a/b"))
    daemon.turn()  # refused; its counters wait for the next publication slot
    hv.destroy(web)
    settle(daemon)
    monkeypatch.setattr(publishing, "PUBLISH_EVERY_S", 0.0)
    daemon.turn()
    assert published(server)["status"] == "stopped"


def test_a_skipped_boundary_does_not_hash_the_kernel_again(tmp_path, monkeypatch) -> None:
    """A flood of well-formed requests once made xenpbrd hash the kernel and ramdisk for
    each accepted one (seconds under TCG), blocking its loop for everyone."""
    from xenpbr import domconfig
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k" * 4096)
    hashed: list[int] = []
    real = domconfig.hashlib.sha256

    def counting(*args):
        hashed.append(1)
        return real(*args)
    monkeypatch.setattr(domconfig.hashlib, "sha256", counting)
    first = domconfig.file_digest(str(kernel))
    assert [domconfig.file_digest(str(kernel)) for _ in range(50)] == [first] * 50
    assert len(hashed) == 1
    kernel.write_bytes(b"K" * 4096)  # a new kernel: hashed again
    assert domconfig.file_digest(str(kernel)) != first and len(hashed) == 2


@pytest.mark.parametrize("setting, live", [({}, False), ({"xenpbr_live_capture": 1}, True)])
def test_a_domain_asking_for_live_capture_is_captured_live_and_the_log_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, setting: dict, live: bool) -> None:
    server = FakeXenstoreServer()
    hv = FakeHypervisor(server)
    state = StateDir(tmp_path)
    state.register("web", {"name": "web", "on_crash": "phasereboot", **setting}, CONFIG,
                   "web.cfg")
    asked: list[object] = []

    def capture(name, store, phase, seq, fingerprint, **kwargs):
        asked.append(kwargs.get("live"))
        meta = types.SimpleNamespace(image_id=f"img-{phase}-{seq}")
        return types.SimpleNamespace(meta=meta, total_s=0.1, paused_s=0.01,
                                     live=kwargs.get("live"))
    daemon = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                    server.connect(0), capture_fn=capture)
    daemon.watcher.start()
    domid = hv.create_domain(name="web")
    settle(daemon)
    caplog.set_level("INFO")
    server.connect(domid).write("data/xenpbr/request", request(1, "kernel"))
    settle(daemon)
    assert server.connect(0).read(control.ack_path(domid)) == b"1 captured"
    assert asked == [live]
    said = [r.getMessage() for r in caplog.records if "captured phase kernel" in r.getMessage()]
    assert len(said) == 1 and ("(img-kernel-1) live in" in said[0]) is live, said
