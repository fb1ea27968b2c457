"""Is it safe to capture this boundary? The disk rules of docs/consistency.md.

An image is restored with the disks as they are *then*, not as they were when it was
taken, except for ``snapshot`` disks, which are reverted with it. So at a boundary:

* a ``persistent`` disk (never reverted) must not be mounted read-write in the guest:
  its kernel's page cache and journal state would be restored over newer on-disk data.
  The refusal names the device; the agent mounts such disks after the last image point;
* a process holding a file on a ``persistent`` disk open for writing without
  ``O_APPEND`` is a *hazard* (after a restore it would write at its old offset, over
  newer data: auditd is the classic case). The refusal names the process and the file;
  the operator starts that service after the restore point;
* a ``snapshot`` disk may be mounted read-write: dom0 snapshots it while xl holds the
  guest paused at the instant its memory was saved (``xl save -c -p``), so the disk is
  exactly what the image's kernel last wrote; block requests still in flight are
  re-issued by the restored kernel's blkfront, as after a migration.

Guest input (the request's ``disks`` and ``hazards``) was bounded by the protocol parser;
here it is only matched against the operator's config, and quoted in messages with
``ascii()``. A device dom0 cannot map to a configured disk counts as persistent when
the domain has persistent disks: refusing is the safe side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenpbr.domconfig import DomainConfig, disk_policies
from xenpbr.guestproto.wire import BoundaryRequest

_PARTITION = re.compile(r"p?[0-9]+")


@dataclass(frozen=True)
class Refusal:
    """Why a capture is refused: a protocol reason token and a message for people."""

    reason: str  # "hazard" | "persistent-disk-rw"
    detail: str


def disk_policy(policies: dict[str, str], dev: str) -> str:
    """The policy of guest device ``dev`` (``xvdb``, ``xvdb1``, ``xvda2``...); ``unknown``
    if it is not one of the configured disks or a partition of one."""
    for vdev, policy in policies.items():
        if dev == vdev or (dev.startswith(vdev) and _PARTITION.fullmatch(dev[len(vdev):])):
            return policy
    return "unknown"


def _unsafe(policy: str, has_persistent: bool) -> bool:
    return policy == "persistent" or (policy == "unknown" and has_persistent)


def judge(config: DomainConfig, request: BoundaryRequest) -> Refusal | None:
    """A refusal if capturing this boundary would be unsafe, else None."""
    policies = disk_policies(config)
    has_persistent = "persistent" in policies.values()
    for hazard in request.hazards:
        dev, _, rest = hazard.partition(" ")
        pid, _, rest = rest.partition(" ")
        comm, _, path = rest.partition(" ")
        if _unsafe(disk_policy(policies, dev), has_persistent):
            return Refusal("hazard", f"pid {ascii(pid)[1:-1]} ({ascii(comm)[1:-1]}) has "
                           f"{ascii(path)[1:-1]} open for writing without O_APPEND on "
                           f"{'persistent' if dev in policies else 'unmapped'} disk "
                           f"{dev}: after a restore it would overwrite newer data; start it "
                           "after the last phase ([after-last-phase] in the agent config)")
    for disk in request.disks:
        policy = disk_policy(policies, disk.dev)
        if disk.rw and _unsafe(policy, has_persistent):
            return Refusal("persistent-disk-rw",
                           f"persistent disk {disk.dev} is mounted read-write on "
                           f"{ascii(disk.mount)[1:-1]}: mount it after the last phase "
                           "([after-last-phase] in the agent config), or declare it "
                           "'snapshot' in xenpbr_disks")
    return None
