"""Build LKDTM, the kernel's own fault provoker, as a module for the lab's guest kernel.

``xenpbr inject --fault lkdtm:TYPE`` needs LKDTM in the guest (docs/faults.md), and
Debian's kernel is built without it (CONFIG_LKDTM is not set). So the lab builds
``drivers/misc/lkdtm`` out of tree, unchanged but for one line, from Debian's
``linux-source-6.1`` at exactly the guest kernel's package version, against that
kernel's headers (``linux-headers-*`` and ``linux-kbuild-6.1``, unpacked, never
installed), with the in-tree Makefile and ``CONFIG_LKDTM=m``. The module is stripped of
its debug information and cached by the package version and this file.

The one line: UNSET_SMEP calls ``native_write_cr4``, which the kernel exports only when
it was built with CONFIG_LKDTM=m, so that test is compiled as LKDTM compiles it on
kernels without it (it reports that it cannot run).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from . import debian
from .errors import MissingHostTool, PackageError
from .paths import digest

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "linux-source-6.1"
KBUILD_PACKAGE = "linux-kbuild-6.1"
SOURCE_TARBALL = "usr/src/linux-source-6.1.tar.xz"
SOURCE_DIR = "linux-source-6.1/drivers/misc/lkdtm/"
#: Where the guest image keeps it (outside kernel/: it is none of Debian's modules).
MODULE_PATH = "extra/lkdtm.ko"
SMEP_GUARD = "#if IS_ENABLED(CONFIG_X86_64) && !IS_ENABLED(CONFIG_UML)\n"
SMEP_GUARD_MODULE = SMEP_GUARD.rstrip("\n") + " && IS_MODULE(CONFIG_LKDTM)\n"
HOST_TOOLS = ("make", "gcc-12", "strip")
_VERMAGIC = re.compile(rb"vermagic=([^\0]*)\0")


def header_packages(kernel_version: str) -> list[str]:
    """The packages a module for ``linux-image-<kernel_version>`` is built against:
    ``6.1.0-57-amd64`` -> its headers, their common part, kbuild and the source."""
    abi = kernel_version.removesuffix("-amd64")
    return [f"linux-headers-{kernel_version}", f"linux-headers-{abi}-common",
            KBUILD_PACKAGE, SOURCE_PACKAGE]


def vermagic(ko: Path) -> str:
    """A module's ``vermagic`` (the kernel refuses a module whose vermagic differs)."""
    match = _VERMAGIC.search(ko.read_bytes())
    if not match:
        raise PackageError(f"{ko} has no vermagic: not a kernel module")
    return match.group(1).decode(errors="replace").strip()


def module(cache: Path, kernel_version: str, reference: Path) -> Path:
    """``lkdtm.ko`` for the kernel ``kernel_version`` (built once, then cached);
    *reference* is one of that kernel's own modules, whose vermagic it must carry."""
    kernel_pkg, *packages = debian.resolve([f"linux-image-{kernel_version}",
                                            *header_packages(kernel_version)])
    stale = [f"{p.name} {p.version}" for p in packages if p.version != kernel_pkg.version]
    if stale:
        raise PackageError(f"LKDTM must be built from the kernel's own version "
                           f"{kernel_pkg.version}, but apt offers {', '.join(stale)}: "
                           "run `apt-get update` (make deps)")
    out = cache / "lkdtm" / digest(kernel_pkg.version, kernel_version,
                                   Path(__file__).read_bytes()) / "lkdtm.ko"
    if out.exists():
        return out
    debs = debian.download(packages, cache / "debs")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = _build(Path(tmp), debs, kernel_version)
        if vermagic(built) != vermagic(reference):
            raise PackageError(f"the LKDTM built ({vermagic(built)!r}) does not match the "
                               f"kernel ({vermagic(reference)!r}): it would not load")
        shutil.move(built, out)
    return out


def _build(work: Path, debs: list[Path], kernel_version: str) -> Path:
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        raise MissingHostTool(f"building LKDTM needs {', '.join(missing)}: run "
                              "tools/install-host-deps.sh (make deps)")
    log.info("building LKDTM for %s out of tree (once; cached)", kernel_version)
    root = work / "root"
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpacking {deb.name}")
    src = _sources(root / SOURCE_TARBALL, work / "lkdtm")
    headers = root / f"usr/src/linux-headers-{kernel_version}"
    common = root / f"usr/src/linux-headers-{kernel_version.removesuffix('-amd64')}-common"
    # headers/Makefile only includes the common one by its installed (absolute) path:
    # run the common Makefile from the headers folder, as kbuild's own O= build does.
    _run(["make", "-s", "-C", str(headers), "-f", str(common / "Makefile"), f"M={src}",
          "CONFIG_LKDTM=m", "modules"], "building lkdtm.ko")
    _run(["strip", "--strip-debug", str(src / "lkdtm.ko")], "stripping lkdtm.ko")
    return src / "lkdtm.ko"


def _sources(tarball: Path, dest: Path) -> Path:
    """LKDTM's sources from the kernel source tarball, with the UNSET_SMEP line set."""
    dest.mkdir(parents=True)
    with tarfile.open(tarball, "r|xz") as tar:  # a stream: stop after the folder
        for member in tar:
            name = member.name.removeprefix(SOURCE_DIR)
            if name != member.name and member.isfile() and "/" not in name:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                (dest / name).write_bytes(data)
            elif (dest / "core.c").exists():
                break
    if not (dest / "core.c").exists():
        raise PackageError(f"{tarball} has no {SOURCE_DIR}core.c")
    bugs = dest / "bugs.c"
    text = bugs.read_text()
    if text.count(SMEP_GUARD) != 1:
        raise PackageError(f"{bugs}: the UNSET_SMEP guard line changed; update "
                           "xenpbr_lab/lkdtm.py")
    bugs.write_text(text.replace(SMEP_GUARD, SMEP_GUARD_MODULE))
    return dest


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise PackageError(f"{what} failed ({' '.join(argv[:3])} ...): "
                           f"{(proc.stderr or proc.stdout).strip()[-800:]}")
