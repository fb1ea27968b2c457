"""The lab builder's staging helpers (the build itself runs in tests/lab)."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest

from xenpbr_lab import debian
from xenpbr_lab.build import LabImages, _copy, cached_sysroot, with_shadow_paging


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


def test_the_shadow_paging_hypervisor_is_never_taken_for_the_newest_sysroot(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A hypervisor-only unpack newer than the full sysroot once made the lab tests look
    for xen_wdt.ko in it (CI, stop 26): it must live outside sysroots/."""
    full = tmp_path / "sysroots/full"
    full.mkdir(parents=True)
    (full / ".complete").write_text("xen-utils\n")
    old = time.time() - 60
    os.utime(full, (old, old))

    def unpack_hypervisor(debs_dir: Path, folder: Path) -> tuple[Path, str]:
        root = folder / "hypervisor"
        (root / "boot").mkdir(parents=True)
        (root / ".complete").write_text("xen-hypervisor\n")
        with gzip.open(root / "boot/xen.gz", "wb") as xen:
            xen.write(b"\x7fELF")
        return root / "boot/xen.gz", "4.17.5"
    monkeypatch.setattr(debian, "hypervisor_with_shadow_paging", unpack_hypervisor)
    images = LabImages(tmp_path / "xen", tmp_path / "k", tmp_path / "map", tmp_path / "d",
                       tmp_path / "g", "6.1.0-57-amd64", ())

    shadow = with_shadow_paging(images, tmp_path)

    assert shadow.xen.read_bytes() == b"\x7fELF"
    assert cached_sysroot(tmp_path) == full
