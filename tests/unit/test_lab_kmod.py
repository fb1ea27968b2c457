"""Kernel module dependencies are resolved from the .ko modinfo strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpbr_lab.errors import PackageError
from xenpbr_lab.kmod import load_order


def fake_ko(root: Path, rel: str, depends: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0")


def test_dependencies_come_first_and_once(tmp_path: Path) -> None:
    fake_ko(tmp_path, "fs/ext4/ext4.ko", "jbd2,mbcache,crc16")
    fake_ko(tmp_path, "fs/jbd2/jbd2.ko", "")
    fake_ko(tmp_path, "fs/mbcache.ko", "")
    fake_ko(tmp_path, "lib/crc16.ko", "")
    fake_ko(tmp_path, "drivers/xen/xen-blkback.ko", "")
    order = [p.stem for p in load_order(["ext4", "xen_blkback", "jbd2"], tmp_path)]
    assert order == ["jbd2", "mbcache", "crc16", "ext4", "xen-blkback"]


def test_missing_module_is_named(tmp_path: Path) -> None:
    fake_ko(tmp_path, "a.ko", "nosuchmod")
    with pytest.raises(PackageError, match="nosuchmod"):
        load_order(["a"], tmp_path)
