"""The lab's LKDTM build (xenpbr_lab/lkdtm.py) without building: which packages, the
sources taken from the kernel tarball with the one line set, and the vermagic check (the
build itself runs in every lab session: tests/lab/test_faults_real.py provokes LKDTM)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from xenpbr_lab import lkdtm
from xenpbr_lab.errors import PackageError

BUGS = ("void lkdtm_BUG(void) { BUG(); }\n" + lkdtm.SMEP_GUARD
        + "static void smep(void) {}\n#endif\n")


def _tarball(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_module_is_built_against_the_kernel_s_own_headers() -> None:
    assert lkdtm.header_packages("6.1.0-57-amd64") == [
        "linux-headers-6.1.0-57-amd64", "linux-headers-6.1.0-57-common",
        "linux-kbuild-6.1", "linux-source-6.1"]


def test_the_sources_come_from_the_tarball_with_the_smep_line_set(tmp_path) -> None:
    folder = lkdtm.SOURCE_DIR
    tarball = _tarball(tmp_path / "src.tar.xz", {
        "linux-source-6.1/Makefile": "top\n", f"{folder}core.c": "core\n",
        f"{folder}bugs.c": BUGS, f"{folder}Makefile": "obj-$(CONFIG_LKDTM) += lkdtm.o\n",
        "linux-source-6.1/drivers/misc/other.c": "no\n"})
    src = lkdtm._sources(tarball, tmp_path / "out")
    assert sorted(p.name for p in src.iterdir()) == ["Makefile", "bugs.c", "core.c"]
    assert lkdtm.SMEP_GUARD_MODULE in (src / "bugs.c").read_text()
    assert lkdtm.SMEP_GUARD not in (src / "bugs.c").read_text()


def test_a_source_whose_smep_line_moved_is_refused(tmp_path) -> None:
    tarball = _tarball(tmp_path / "src.tar.xz", {f"{lkdtm.SOURCE_DIR}core.c": "core\n",
                                                 f"{lkdtm.SOURCE_DIR}bugs.c": "changed\n"})
    with pytest.raises(PackageError, match="UNSET_SMEP guard line changed"):
        lkdtm._sources(tarball, tmp_path / "out")


def test_a_tarball_without_lkdtm_is_refused(tmp_path) -> None:
    tarball = _tarball(tmp_path / "src.tar.xz", {"linux-source-6.1/Makefile": "top\n"})
    with pytest.raises(PackageError, match="has no linux-source-6.1/drivers/misc/lkdtm"):
        lkdtm._sources(tarball, tmp_path / "out")


def test_vermagic_is_read_from_the_module(tmp_path) -> None:
    ko = tmp_path / "m.ko"
    ko.write_bytes(b"\x7fELF...\0license=GPL\0vermagic=6.1.0-57-amd64 SMP preempt "
                   b"mod_unload modversions \0name=lkdtm\0")
    assert lkdtm.vermagic(ko) == "6.1.0-57-amd64 SMP preempt mod_unload modversions"
    (tmp_path / "x.ko").write_bytes(b"no modinfo")
    with pytest.raises(PackageError, match="no vermagic"):
        lkdtm.vermagic(tmp_path / "x.ko")
