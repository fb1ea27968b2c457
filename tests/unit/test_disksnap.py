"""Disk snapshots on this machine's file system (the lab covers what it has)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from xenpbr import disksnap


def sparse_disk(path: Path, size: int = 64 << 20) -> bytes:
    """A sparse image with data at 0, 16 MiB and the very end; returns its bytes' hash."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, 16 << 20, size - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    return path.read_bytes()


def test_copy_snapshot_and_revert_round_trip_keeping_holes(tmp_path: Path) -> None:
    disk = tmp_path / "root.img"
    original = sparse_disk(disk)
    kind = disksnap.mechanism(str(disk), tmp_path / "snaps")
    snap = disksnap.snapshot(str(disk), tmp_path / "snaps" / "root.snap")
    assert snap.mechanism == kind
    if kind == "copy":
        assert snap.bytes_copied < 1 << 20  # three data blocks, not 64 MiB
        assert os.stat(snap.path).st_blocks * 512 < 4 << 20  # holes stayed holes
    with open(disk, "r+b") as f:  # the guest writes after the image point
        f.seek(8 << 20)
        f.write(b"after the image point" * 100)
        f.truncate(80 << 20)
    assert disk.read_bytes() != original
    seconds = disksnap.revert(snap, str(disk))
    assert seconds >= 0 and disk.read_bytes() == original


def test_mechanism_of_a_missing_disk_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(disksnap.SnapshotError, match="nope.img"):
        disksnap.mechanism(str(tmp_path / "nope.img"), tmp_path)


def test_reflink_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    assert disksnap.mechanism(str(disk), tmp_path / "s") in ("reflink", "copy")
    assert list((tmp_path / "s").iterdir()) == []


def test_holes_are_the_complement_of_the_data_ranges() -> None:
    assert disksnap._holes([(0, 10), (20, 30)], 40) == [(10, 20), (30, 40)]
    assert disksnap._holes([], 5) == [(0, 5)]
    assert disksnap._holes([(0, 5)], 5) == []
