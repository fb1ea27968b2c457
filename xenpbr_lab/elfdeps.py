"""Find the shared libraries an ELF program needs, inside a sysroot or on the host.

The images are assembled from unpacked packages, not installed ones, so the dynamic
loader is asked (via ``ldd`` with ``LD_LIBRARY_PATH`` pointing into the sysroot) which
files satisfy each program's ``DT_NEEDED`` entries. Host libraries fill in glibc and the
other base libraries every Debian 12 host has.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from .errors import PackageError

_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x")
_LDD_DIRECT = re.compile(r"^\s*(/\S+)\s+\(0x")


def is_elf(path: Path) -> bool:
    """True if ``path`` is a regular file starting with the ELF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def library_dirs(sysroot: Path) -> list[Path]:
    """The library folders inside an unpacked sysroot, in search order."""
    candidates = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu",
                  "usr/lib/xen-4.17/lib/x86_64-linux-gnu", "usr/lib/xen-4.17/lib"]
    return [sysroot / c for c in candidates if (sysroot / c).is_dir()]


def needed_libraries(programs: list[Path], sysroot: Path) -> set[Path]:
    """Absolute paths of every shared library ``programs`` load (transitively)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, library_dirs(sysroot))))
    libs: set[Path] = set()
    for prog in programs:
        proc = subprocess.run(["ldd", str(prog)], capture_output=True, text=True, env=env,
                              check=False, timeout=60)
        if "not a dynamic executable" in proc.stdout + proc.stderr:
            continue
        for line in proc.stdout.splitlines():
            if "not found" in line:
                raise PackageError(f"{prog} needs a library nobody provides: {line.strip()}")
            match = _LDD_LINE.match(line) or _LDD_DIRECT.match(line)
            if match:
                libs.add(Path(match.groups()[-1]))
    return libs
