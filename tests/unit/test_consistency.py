"""Capture safety against the disk policies (docs/consistency.md)."""

from __future__ import annotations

import pytest

from xenpbr import consistency, domconfig
from xenpbr.guestproto.wire import BoundaryRequest, DiskState

BASE = ('name = "db"\ndisk = ["vdev=xvda, target=/img/root.ext4", '
        '"vdev=xvdb, target=/img/data.ext4", "vdev=xvdc, access=ro, target=/img/iso"]\n')


def config(policies: str = "") -> domconfig.DomainConfig:
    return domconfig.parse(BASE + (f"xenpbr_disks = [{policies}]\n" if policies else ""))


def request(disks=(), hazards=()) -> BoundaryRequest:
    return BoundaryRequest(seq=1, phase="app", phases=("kernel", "app"), identity="v1",
                           wait=60, disks=tuple(disks), hazards=tuple(hazards))


PERSISTENT = '"xvdb=persistent"'


def test_default_policies_make_every_capture_safe() -> None:
    req = request([DiskState("xvda1", "/", True), DiskState("xvdb", "/data", True)],
                  ["xvdb 100 auditd /data/audit.log"])
    assert consistency.judge(config(), req) is None  # all snapshot: reverted together


def test_a_snapshot_disk_need_not_be_frozen_and_an_old_agents_flag_is_ignored() -> None:
    """dom0 snapshots while xl holds the guest paused: frozen or not makes no difference
    (agents before 0.3 still send ``frozen``)."""
    for frozen in (False, True):
        req = request([DiskState("xvda1", "/", True, frozen=frozen),
                       DiskState("xvdb", "/data", True)])
        assert consistency.judge(config(), req) is None
    persistent = request([DiskState("xvdb", "/data", True, frozen=True)])
    refusal = consistency.judge(config(PERSISTENT), persistent)
    assert refusal is not None and refusal.reason == "persistent-disk-rw"  # never excused


def test_persistent_disk_mounted_read_write_is_refused_naming_the_device() -> None:
    refusal = consistency.judge(config(PERSISTENT),
                                request([DiskState("xvda1", "/", True, frozen=True),
                                         DiskState("xvdb1", "/data", True)]))
    assert refusal is not None and refusal.reason == "persistent-disk-rw"
    assert "persistent disk xvdb1 is mounted read-write on /data" in refusal.detail


def test_persistent_disk_mounted_read_only_is_fine() -> None:
    assert consistency.judge(config(PERSISTENT),
                             request([DiskState("xvdb", "/data", False)])) is None


def test_hazard_on_a_persistent_disk_names_process_and_file() -> None:
    refusal = consistency.judge(config(PERSISTENT), request(
        [DiskState("xvdb", "/data", True)], ["xvda1 7 ok /var/log/x", "xvdb 42 logger /data/my log"]))
    assert refusal is not None and refusal.reason == "hazard"  # before the rw mount
    assert refusal.detail.startswith("pid 42 (logger) has /data/my log open for writing "
                                     "without O_APPEND on persistent disk xvdb")
    assert "[after-last-phase]" in refusal.detail


def test_unmapped_devices_count_as_persistent_only_when_some_disk_is() -> None:
    lvm = request([DiskState("dm-0", "/srv", True)])
    assert consistency.judge(config(), lvm) is None
    refusal = consistency.judge(config(PERSISTENT), lvm)
    assert refusal is not None and refusal.reason == "persistent-disk-rw"


@pytest.mark.parametrize("dev, policy", [("xvdb", "persistent"), ("xvdb1", "persistent"),
                                         ("xvdbp2", "persistent"), ("xvdba", "unknown"),
                                         ("xvdc", "readonly"), ("xvda2", "snapshot")])
def test_guest_devices_map_to_configured_disks(dev: str, policy: str) -> None:
    policies = domconfig.disk_policies(config(PERSISTENT))
    assert consistency.disk_policy(policies, dev) == policy


def test_guest_text_is_quoted_in_the_detail() -> None:
    refusal = consistency.judge(config(PERSISTENT),
                                request(hazards=["xvdb 1 e\x1b[2J /data/\u202etxt"]))
    assert refusal is not None and "\x1b" not in refusal.detail
    assert "\\x1b" in refusal.detail and "\\u202e" in refusal.detail
