"""The disk snapshots that belong to an image (``snapshot`` disks, docs/consistency.md).

A memory image of a guest with a ``snapshot`` disk is only half of a restartable image:
the guest kernel in it believes its file systems hold what they held at the boundary.
So right after the memory capture, while the guest agent still keeps those file systems
frozen, dom0 snapshots each such disk (:mod:`xenpbr.disksnap` picks reflink, LVM thin or
a copy), and before a restored image runs, puts the snapshots back.

Layout, beside the manifests::

    <store>/disks/<domain>/<image>/<vdev>.img      one snapshot per snapshot disk
    <store>/disks/<domain>/<image>/snapshots.json  written last: the set is complete

The image's manifest names the vdevs it needs (``extra["snapshot_disks"]``, written by
the capture before any snapshot exists). An image whose record is missing or lacks one
of them is :class:`DiskSnapshotMissing`, an :class:`ImageInvalid`: recovery falls back
to an earlier image instead of running a kernel over disks it does not know.

Snapshots count against the domain's quota (their allocated bytes), are deleted with
their image, and GC removes the ones whose image is gone (a daemon killed between the
manifest and the snapshots).

Its functions take the store as :class:`~.layout.HasLayout`: paths are all they need.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from xenpbr import disksnap
from xenpbr.fsutil import atomic_write_json
from xenpbr.images.errors import ImageInvalid
from xenpbr.images.image import Image, check_name
from xenpbr.images.layout import HasLayout

_LOG = logging.getLogger(__name__)

RECORD = "snapshots.json"
#: The manifest's ``extra`` key naming the vdevs an image needs snapshots of.
EXTRA_KEY = "snapshot_disks"


class DiskSnapshotMissing(ImageInvalid):
    """An image needs a disk snapshot that is not there (the image is not used)."""


@dataclass(frozen=True)
class DiskSnapshot:
    """One snapshot of one guest disk, taken for one image."""

    vdev: str
    target: str  # the disk in dom0 (file or block device)
    mechanism: str  # reflink | lvm-thin | copy
    path: str
    seconds: float
    bytes_copied: int


def image_dir(store: HasLayout, domain: str, image_id: str) -> Path:
    return store.layout.disk_image_dir(domain, image_id)


def take(store: HasLayout, domain: str, image_id: str,
         disks: dict[str, str]) -> list[DiskSnapshot]:
    """Snapshot each ``{vdev: target}`` for image ``image_id``; the record is written
    only once all succeeded. :raises disksnap.SnapshotError: (partial files removed)."""
    where = image_dir(store, domain, image_id)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    taken = []
    try:
        for vdev, target in disks.items():
            result = disksnap.snapshot(target, where / f"{check_name(vdev, 'vdev')}.img")
            taken.append(DiskSnapshot(vdev, target, result.mechanism, result.path,
                                      round(result.seconds, 4), result.bytes_copied))
        atomic_write_json(where / RECORD, {"version": 1,
                                           "snapshots": [asdict(s) for s in taken]})
    except BaseException:
        shutil.rmtree(where, ignore_errors=True)
        raise
    return taken


def load(store: HasLayout, domain: str, image_id: str) -> list[DiskSnapshot]:
    """The image's snapshot record ([] if it has none). :raises DiskSnapshotMissing:"""
    path = image_dir(store, domain, image_id) / RECORD
    try:
        doc = json.loads(path.read_text())
        return [DiskSnapshot(**entry) for entry in doc["snapshots"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as exc:
        raise DiskSnapshotMissing(f"disk snapshot record {path} is damaged ({exc}); image "
                                  f"{domain}/{image_id} is not used") from exc


def needed(image: Image) -> list[str]:
    """The vdevs ``image`` needs snapshots of (from its manifest)."""
    vdevs = image.meta.extra.get(EXTRA_KEY, [])
    return [str(v) for v in vdevs] if isinstance(vdevs, list) else []


def check(store: HasLayout, image: Image) -> list[DiskSnapshot]:
    """The snapshots of ``image``, all present. :raises DiskSnapshotMissing:"""
    meta = image.meta
    snaps = load(store, meta.domain, meta.image_id)
    have = {s.vdev for s in snaps}
    missing = [v for v in needed(image) if v not in have]
    missing += [s.vdev for s in snaps if s.mechanism != "lvm-thin"
                and not Path(s.path).is_file()]
    if missing:
        raise DiskSnapshotMissing(f"image {meta.domain}/{meta.image_id} ({meta.phase}) lacks "
                                  f"its snapshot of disk(s) {', '.join(sorted(missing))}: its "
                                  "kernel would run over disks it does not know; not used")
    return snaps


def revert(store: HasLayout, image: Image) -> dict[str, float]:
    """Put ``image``'s disk snapshots back (the domain must not be running); returns
    seconds per vdev. :raises DiskSnapshotMissing, disksnap.SnapshotError:"""
    took = {}
    for snap in check(store, image):
        result = disksnap.SnapshotResult(snap.mechanism, snap.path, snap.seconds,
                                         snap.bytes_copied)
        took[snap.vdev] = disksnap.revert(result, snap.target)
        _LOG.info("disk %s (%s) of %s reverted to image %s by %s in %.2f s", snap.vdev,
                  snap.target, image.meta.domain, image.meta.image_id, snap.mechanism,
                  took[snap.vdev])
    return took


def remove(store: HasLayout, domain: str, image_id: str) -> None:
    """Delete an image's snapshots (with the image, or after a failed capture)."""
    for snap in _quiet_load(store, domain, image_id):
        if snap.mechanism == "lvm-thin":
            disksnap.remove_lv(snap.path, snap.target)
    shutil.rmtree(image_dir(store, domain, image_id), ignore_errors=True)


def _quiet_load(store: HasLayout, domain: str, image_id: str) -> list[DiskSnapshot]:
    try:
        return load(store, domain, image_id)
    except DiskSnapshotMissing:
        return []


def allocated_bytes(store: HasLayout, domain: str) -> int:
    """Bytes the domain's snapshot files occupy (allocated blocks: sparse and reflinked
    files cost what they hold, not their size)."""
    root = store.layout.disk_domain_dir(domain)
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file()) \
        if root.is_dir() else 0


def orphans(store: HasLayout) -> list[tuple[str, str]]:
    """``(domain, image_id)`` of snapshot sets whose image manifest is gone."""
    root = store.layout.disks_dir
    if not root.is_dir():
        return []
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(p for p in d.iterdir() if p.is_dir()):
            if not store.layout.manifest_path(d.name, img.name).exists():
                found.append((d.name, img.name))
    return found
