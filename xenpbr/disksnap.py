"""Snapshot and revert a guest disk, with the cheapest mechanism its storage offers.

A ``snapshot`` disk belongs to its images (docs/consistency.md): dom0 copies it while the
guest's file systems are frozen at a boundary, and copies it back before a restored
image runs. Three mechanisms, detected per disk, best first:

* ``reflink``: a copy-on-write clone of the image file (``FICLONE``; XFS with reflink,
  btrfs, bcachefs). Constant time, no space until blocks diverge;
* ``lvm-thin``: a thin snapshot of a thin logical volume (``lvcreate -s``), reverted by
  copying the snapshot's blocks back (``lvconvert --merge`` needs the origin closed,
  which a Xen backend holding it open prevents);
* ``copy``: a plain, sparse-aware copy (``copy_file_range``, holes kept), for every
  other file or block device. Linear in the disk's allocated size.

:func:`mechanism` says which one applies (operators see it in ``xenpbr images``);
:func:`snapshot` and :func:`revert` return how long they took, for the benchmarks.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from xenpbr.errors import XenpbrError

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
BLKFLSBUF = 0x1261  # _IO(0x12, 97), linux/fs.h
CHUNK = 8 << 20
_LIBC = ctypes.CDLL(None, use_errno=True)  # fallocate(2), which os does not wrap


class SnapshotError(XenpbrError):
    """A disk could not be snapshotted or reverted (the message says which and why)."""


@dataclass(frozen=True)
class SnapshotResult:
    mechanism: str  # reflink | lvm-thin | copy
    path: str  # where the snapshot is
    seconds: float
    bytes_copied: int  # 0 for reflink and lvm-thin snapshots


def _reflink(src: int, dst: int) -> bool:
    """Clone ``src`` into ``dst``; False if the file system cannot."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                         errno.ENOSYS):
            return False
        raise


def _lv_is_thin(device: str) -> bool:
    """True if ``device`` is an LVM thin volume (``lvs`` says its segment type)."""
    try:
        out = subprocess.run(["lvs", "--noheadings", "-o", "segtype", device],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "thin"


def mechanism(target: str, snapshot_dir: Path) -> str:
    """Which mechanism :func:`snapshot` would use for disk ``target`` into
    ``snapshot_dir`` (probing reflink with a scratch file there)."""
    try:
        mode = os.stat(target).st_mode
    except OSError as exc:
        raise SnapshotError(f"disk {target}: {exc.strerror}") from exc
    if stat.S_ISBLK(mode):
        return "lvm-thin" if _lv_is_thin(target) else "copy"
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    probe = snapshot_dir / f".reflink-probe-{os.getpid()}"
    try:
        with open(target, "rb") as src, open(probe, "wb") as dst:
            return "reflink" if _reflink(src.fileno(), dst.fileno()) else "copy"
    finally:
        probe.unlink(missing_ok=True)


def _ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The data ranges of ``fd`` (SEEK_DATA/SEEK_HOLE); everything if it cannot say."""
    found, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            return [(0, size)]  # no SEEK_DATA (a block device): all of it is data
        found.append((start, end))
        offset = end
    return found


def _holes(data: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    holes, pos = [], 0
    for start, end in data:
        if start > pos:
            holes.append((pos, start))
        pos = end
    return holes + ([(pos, size)] if pos < size else [])


def _zero(fd: int, start: int, end: int) -> None:
    """Make ``[start, end)`` of ``fd`` read as zeros: punch a hole in a file, write
    zeros on a device (a restored kernel must not find data the snapshot had not)."""
    punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _LIBC.fallocate(fd, punch, ctypes.c_long(start), ctypes.c_long(end - start)) == 0:
        return
    zeros = bytes(min(CHUNK, end - start))
    pos = start
    while pos < end:
        pos += os.pwrite(fd, zeros[:end - pos], pos)


def _copy(src_path: str, dst_path: str) -> int:
    """Make ``dst`` equal to ``src``, copying only ``src``'s data ranges and zeroing
    ``dst`` where ``src`` has holes (holes stay holes in files). Returns bytes copied."""
    copied = 0
    with open(src_path, "rb") as src, open(dst_path, "r+b" if os.path.exists(dst_path)
                                           else "wb") as dst:
        size = _size(src.fileno())
        if stat.S_ISREG(os.fstat(dst.fileno()).st_mode):
            dst.truncate(size)  # also drops what lies beyond a shorter source
        data = _ranges(src.fileno(), size)
        for start, end in data:
            copied += _copy_range(src.fileno(), dst.fileno(), start, end)
        dst_size = _size(dst.fileno())
        dst_data = _ranges(dst.fileno(), dst_size)
        for hole_start, hole_end in _holes(data, size):
            for start, end in dst_data:  # only where dst holds data inside src's hole
                lo, hi = max(start, hole_start), min(end, hole_end)
                if lo < hi:
                    _zero(dst.fileno(), lo, hi)
        os.fsync(dst.fileno())
    return copied


def _copy_range(src: int, dst: int, start: int, end: int) -> int:
    """Copy bytes ``[start, end)`` at the same offsets: ``copy_file_range`` (in-kernel,
    reflinks where the file system can), or read/write where it does not apply (block
    devices, copies across file systems on older kernels)."""
    pos = start
    try:
        while pos < end:
            n = os.copy_file_range(src, dst, min(CHUNK, end - pos), pos, pos)
            if n == 0:
                return pos - start
            pos += n
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    while pos < end:
        chunk = os.pread(src, min(CHUNK, end - pos), pos)
        if not chunk:
            break
        os.pwrite(dst, chunk, pos)
        pos += len(chunk)
    return pos - start


def _flush_device(path: str) -> None:
    """Drop dom0's buffer cache of a block device after writing around it (BLKFLSBUF),
    so nothing in dom0 reads the disk as it was before a revert."""
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            with open(path, "rb") as dev:
                fcntl.ioctl(dev.fileno(), BLKFLSBUF)
    except OSError as exc:
        log.warning("could not flush dom0's cache of %s: %s", path, exc)


def _size(fd: int) -> int:
    """Bytes in a file, or in a block device (whose st_size is 0)."""
    return os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)


def snapshot(target: str, dest: Path) -> SnapshotResult:
    """Snapshot disk ``target`` as ``dest`` (a file, or an LV name for lvm-thin)."""
    start = time.monotonic()
    kind = mechanism(target, dest.parent)
    try:
        if kind == "reflink":
            with open(target, "rb") as src, open(dest, "wb") as dst:
                _reflink(src.fileno(), dst.fileno())
                os.fsync(dst.fileno())
            copied = 0
        elif kind == "lvm-thin":
            name = f"xenpbr-{dest.parent.name}-{dest.stem}"  # unique per image and disk
            subprocess.run(["lvcreate", "-s", "-kn", "-n", name, target], check=True,
                           capture_output=True, text=True, timeout=120)
            dest = Path(target).parent / name
            copied = 0
        else:
            copied = _copy(target, str(dest))
    except (OSError, subprocess.SubprocessError) as exc:
        raise SnapshotError(f"snapshot of disk {target} ({kind}) into {dest} failed: "
                            f"{exc}") from exc
    took = time.monotonic() - start
    log.info("disk %s snapshotted by %s in %.2f s (%d bytes copied)", target, kind, took,
             copied)
    return SnapshotResult(kind, str(dest), took, copied)


def revert(snap: SnapshotResult, target: str) -> float:
    """Put snapshot ``snap`` back onto disk ``target`` (the domain must not be running
    on it); return the seconds it took."""
    start = time.monotonic()
    try:
        if snap.mechanism == "reflink":
            with open(snap.path, "rb") as src, open(target, "r+b") as dst:
                _reflink(src.fileno(), dst.fileno())
                dst.truncate(os.fstat(src.fileno()).st_size)
                os.fsync(dst.fileno())
        else:  # copy, and lvm-thin (the snapshot LV's device is copied back)
            _copy(snap.path, target)
    except OSError as exc:
        raise SnapshotError(f"revert of disk {target} from {snap.path} failed: "
                            f"{exc}") from exc
    _flush_device(target)
    return time.monotonic() - start


def remove_lv(path: str, origin: str) -> None:
    """Remove an lvm-thin snapshot volume (with its image); failures are logged."""
    try:
        subprocess.run(["lvremove", "-f", path], check=True, capture_output=True,
                       text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("could not remove snapshot volume %s of %s: %s; remove it with "
                  "`lvremove %s`", path, origin, exc, path)
