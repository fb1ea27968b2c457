"""Disk snapshots that belong to images: taken at capture, put back at restore, charged to
the quota, deleted with their image, collected when orphaned (docs/consistency.md)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from xenpbr.daemon import Daemon
from xenpbr.disksnap import SnapshotError
from xenpbr.guestproto import control, wire
from xenpbr.hypervisor.fake import FakeHypervisor
from xenpbr.images import disks
from xenpbr.images.store import ImageStore
from xenpbr.images.writer import new_image_id
from xenpbr.state import StateDir
from xenpbr.xenstore import FakeXenstoreServer

MIB = 1 << 20


def disk(path: Path, fill: bytes) -> Path:
    """A sparse 4 MiB disk with ``fill`` at 1 MiB."""
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(MIB)
        f.write(fill)
    return path


def image(domain: str, image_id: str, vdevs: list[str]) -> types.SimpleNamespace:
    meta = types.SimpleNamespace(domain=domain, image_id=image_id, phase="app",
                                 extra={disks.EXTRA_KEY: vdevs})
    return types.SimpleNamespace(meta=meta)


def test_take_then_revert_puts_the_disk_back(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    root = disk(tmp_path / "root.img", b"at the boundary" * 1000)
    image_id = new_image_id(1.0)
    taken = disks.take(store, "web", image_id, {"xvda": str(root)})
    assert [t.vdev for t in taken] == ["xvda"] and taken[0].mechanism in ("reflink", "copy")
    with open(root, "r+b") as f:  # the guest runs on and writes more
        f.seek(3 * MIB)
        f.write(b"after the boundary")
        f.seek(MIB)
        f.write(b"OVERWRITTEN")
    took = disks.revert(store, image("web", image_id, ["xvda"]))
    assert set(took) == {"xvda"}
    data = root.read_bytes()
    assert data[MIB:MIB + 15] == b"at the boundary"
    assert data[3 * MIB:3 * MIB + 18] == bytes(18)  # a hole in the snapshot reads as zeros


def test_an_image_without_its_snapshot_is_invalid(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    image_id = new_image_id(2.0)
    with pytest.raises(disks.DiskSnapshotMissing, match="lacks its snapshot of disk.*xvda"):
        disks.revert(store, image("web", image_id, ["xvda"]))
    assert disks.revert(store, image("web", image_id, [])) == {}  # no snapshot disks


def test_a_failed_snapshot_leaves_nothing_behind(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    image_id = new_image_id(3.0)
    good = disk(tmp_path / "a.img", b"x")
    with pytest.raises(SnapshotError, match="missing.img"):
        disks.take(store, "web", image_id, {"xvda": str(good),
                                            "xvdb": str(tmp_path / "missing.img")})
    assert not disks.image_dir(store, "web", image_id).exists()


def test_snapshots_are_charged_deleted_and_collected(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    root = disk(tmp_path / "root.img", b"y" * MIB)
    image_id = new_image_id(4.0)
    disks.take(store, "web", image_id, {"xvda": str(root)})
    assert store.usage("web").disk_bytes >= MIB  # allocated bytes, not the 4 MiB size
    assert store.usage("web").disk_bytes < 4 * MIB
    assert disks.orphans(store) == [("web", image_id)]  # no manifest: an orphan
    report = store.gc()
    assert report.orphan_snapshots_removed == [f"web/{image_id}"]
    assert not disks.image_dir(store, "web", image_id).exists()


# -- the daemon: snapshot in the freeze window, refuse when it cannot ----------------------

CONFIG = 'name = "web"\ntype = "pv"\nmemory = 128\non_crash = "phasereboot"\n'


class Capturer:
    """Stands in for ``images.capture.capture``: the guest is "paused" while the hook
    runs, then writes to its disk (``after``) as a running guest would."""

    def __init__(self, after: Path | None = None) -> None:
        self.extra: list[dict | None] = []
        self.after = after
        self.paused_hooks = 0

    def __call__(self, name, store, phase, seq, fingerprint, extra=None, while_paused=None,
                 **_):
        self.extra.append(extra)
        image_id = new_image_id(100.0 + seq)
        try:
            if while_paused is not None:
                self.paused_hooks += 1
                while_paused(image_id)
        finally:
            if self.after is not None and self.after.exists():
                with self.after.open("ab") as f:
                    f.write(b" and what the guest wrote once unpaused")
        meta = types.SimpleNamespace(image_id=image_id)
        return types.SimpleNamespace(meta=meta, total_s=0.1, paused_s=0.05)


def run_boundary(tmp_path: Path, target: str, frozen: bool = False,
                 capturer: Capturer | None = None):
    server = FakeXenstoreServer()
    hv = FakeHypervisor(server)
    state = StateDir(tmp_path / "state")
    state.register("web", {"name": "web", "on_crash": "phasereboot",
                           "disk": [f"{target},raw,xvda,w"]}, CONFIG, "web.cfg")
    capturer = capturer or Capturer(Path(target.removeprefix("phy:")))
    daemon = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                    server.connect(0), capture_fn=capturer)
    daemon.watcher.start()
    domid = hv.create_domain(name="web")
    daemon.turn()
    req = {"v": 1, "seq": 1, "phase": "kernel", "phases": ["kernel"], "identity": "v1",
           "wait": 60, "disks": [{"dev": "xvda", "mount": "/", "rw": True,
                                  **({"frozen": True} if frozen else {})}],
           "services": [], "hazards": []}
    server.connect(domid).write("data/xenpbr/request", json.dumps(req).encode())
    for _ in range(3):
        daemon.turn()
    guest = server.connect(domid)
    ack = guest.read(control.ack_path(domid)).decode()
    detail = guest.read(f"/local/domain/{domid}/{wire.DETAIL_KEY}").decode()
    return ack, detail, state, daemon, capturer


def test_daemon_snapshots_snapshot_disks_while_the_guest_is_paused(tmp_path: Path) -> None:
    root = disk(tmp_path / "root.img", b"kernel boundary")
    at_the_boundary = root.read_bytes()
    ack, detail, state, daemon, capturer = run_boundary(tmp_path, f"phy:{root}")
    assert ack == "1 captured" and detail == "" and capturer.paused_hooks == 1
    assert capturer.extra == [{disks.EXTRA_KEY: ["xvda"]}]  # the manifest names its disks
    (info,) = state.phases("web").images.values()
    assert info.disk_mechanisms in ("xvda=copy", "xvda=reflink") and info.disks_s is not None
    snap = disks.load(daemon.controller.boundaries.store, "web", info.image_id)[0]
    assert snap.target == str(root)
    assert Path(snap.path).read_bytes() == at_the_boundary != root.read_bytes()


def test_daemon_refuses_a_capture_whose_disk_cannot_be_snapshotted(tmp_path: Path) -> None:
    ack, detail, state, daemon, _ = run_boundary(tmp_path, str(tmp_path / "gone.img"))
    assert ack == "1 refused:snapshot-failed"
    assert detail.startswith("disk snapshot failed in dom0: disk ") and "gone.img" in detail
    assert state.phases("web").images == {}


def test_an_old_agents_frozen_flag_changes_nothing(tmp_path: Path) -> None:
    root = disk(tmp_path / "root.img", b"z")
    ack, _, state, _, capturer = run_boundary(tmp_path, str(root), frozen=True)
    assert ack == "1 captured" and capturer.paused_hooks == 1
    assert len(state.phases("web").images) == 1


def test_a_pause_left_by_a_killed_xenpbrd_is_released_when_the_next_one_starts(
        tmp_path: Path) -> None:
    """xl save -c -p pauses the guest after its save; xenpbrd unpauses it after the disk
    snapshots. Killed in between, the next xenpbrd finds the record and unpauses."""
    server = FakeXenstoreServer()
    hv = FakeHypervisor(server)
    state = StateDir(tmp_path / "state")
    state.register("web", {"name": "web", "on_crash": "phasereboot"}, CONFIG, "web.cfg")
    held = hv.create_domain(name="web")
    hv.pause(held)  # what xl left behind
    state.begin_held_pause("web", held)
    daemon = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                    server.connect(0), capture_fn=Capturer())
    daemon.controller.resume_interrupted()
    assert hv.pause_count(held) == 0 and state.held_pauses() == []
    # xl failed before pausing (not paused): nothing to undo, the record goes
    state.begin_held_pause("web", held)
    daemon.controller.resume_interrupted()
    assert hv.pause_count(held) == 0 and state.held_pauses() == []


def test_a_capture_records_its_held_pause_only_while_it_runs(tmp_path: Path) -> None:
    root = disk(tmp_path / "root.img", b"k")
    seen: list[list[tuple[str, int]]] = []
    state_dir = tmp_path / "state"

    class Watching(Capturer):
        def __call__(self, *args, **kwargs):
            seen.append(StateDir(state_dir).held_pauses())
            return super().__call__(*args, **kwargs)

    ack, _, state, _, _ = run_boundary(tmp_path, f"phy:{root}", capturer=Watching(root))
    assert ack == "1 captured"
    assert len(seen) == 1 and [name for name, _ in seen[0]] == ["web"]
    assert state.held_pauses() == []
