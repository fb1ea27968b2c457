"""The lab builder's staging helpers (the build itself runs in tests/lab)."""

from __future__ import annotations

import os
from pathlib import Path

from xenpbr_lab.build import _copy


def test_copy_replaces_an_applet_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "host-busybox"
    outside.write_bytes(b"the host's busybox")
    stage = tmp_path / "stage"
    (stage / "sbin").mkdir(parents=True)
    os.symlink(outside, stage / "sbin/mke2fs")  # as _busybox links every applet
    tool = tmp_path / "mke2fs"
    tool.write_bytes(b"e2fsprogs' mke2fs")
    _copy(tool, stage / "sbin/mke2fs")
    assert outside.read_bytes() == b"the host's busybox"
    assert not (stage / "sbin/mke2fs").is_symlink()
    assert (stage / "sbin/mke2fs").read_bytes() == b"e2fsprogs' mke2fs"
