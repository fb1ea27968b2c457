"""Find and open the Xen tool libraries, own their handles, explain failures to open.

One loader serves every binding module (modelled on pyudev's ``_ctypeslib``): a module
describes its library as a :class:`LibrarySpec` plus ``SIGNATURES`` and ``ERROR_CHECKERS``
tables, and :func:`load_library` turns that into a ready :class:`ctypes.CDLL`.

Why by soname: the libxc ABI changes with every Xen minor release (the struct layouts in
:mod:`.xenctrl` are Xen 4.17's), so we ask for exactly ``libxenctrl.so.4.17`` and refuse
anything else instead of loading a library whose structs we would misread.

Why ``XENPBR_LIBDIR``: tests and the QEMU lab need to load an unpacked Debian library tree
that is not on the linker path. Loading by absolute path does not make the dynamic linker
find the library's own ``DT_NEEDED`` dependencies, so we pre-load those from the same
directory; glibc then matches them by soname.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import logging
import os
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenpbr.errors import XenpbrError

from ._errcheck import (
    ErrorChecker,
    NotPrivileged,
    PrivcmdUnavailable,
    XenNotRunning,
    XenUnavailable,
)

log = logging.getLogger(__name__)

LIBDIR_ENV = "XENPBR_LIBDIR"

# name -> (argtypes, restype)
Signatures = Mapping[str, tuple[Sequence[Any], Any]]

# Where the kernel exposes Xen; module-level so tests can point them elsewhere.
HYPERVISOR_TYPE_FILE = Path("/sys/hypervisor/type")
PRIVCMD_PATHS = (Path("/dev/xen/privcmd"), Path("/proc/xen/privcmd"))

_MISSING_DEP = re.compile(r"(lib[^\s:/]+\.so[.\d]*): cannot open shared object file")
_MAX_DEPENDENCIES = 32


class XenLibraryNotFound(XenpbrError):
    """A Xen tool library (of the exact soname we need) cannot be loaded."""


class LoadedLibrary(ctypes.CDLL):
    """A :class:`ctypes.CDLL` opened by :func:`load_library`, with what it recorded."""

    xenpbr_info: LibraryInfo
    _xenpbr_dependencies: list[LoadedLibrary]  # pre-loaded from libdir, kept alive


@dataclass(frozen=True)
class LibrarySpec:
    """A C library we bind: its soname and the Debian package that ships it."""

    soname: str
    package: str


@dataclass(frozen=True)
class LibraryInfo:
    """What was actually loaded, recorded for diagnostics (selfcheck, bug reports)."""

    soname: str
    path: str | None
    version: str | None
    missing_symbols: tuple[str, ...] = field(default=())


def _file_version(path: str | None, soname: str) -> str | None:
    """Derive the full library version from the resolved file name.

    ``libxenctrl.so.4.17`` is a symlink to ``libxenctrl.so.4.17.0``; the part after
    ``.so.`` of the real file is the most precise version the file itself states.
    """
    if path is None:
        return None
    name = os.path.basename(os.path.realpath(path))
    if ".so." in name:
        return name.split(".so.", 1)[1]
    return soname.split(".so.", 1)[1] if ".so." in soname else None


def _loaded_path(lib: ctypes.CDLL, soname: str) -> str | None:
    """Find the file the dynamic linker actually mapped for *lib* (via /proc/self/maps)."""
    if os.path.isabs(lib._name):
        return lib._name
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith(soname):
                    return path
    except OSError:
        pass
    return None


def _open_in_dir(spec: LibrarySpec, libdir: str, keep: list[LoadedLibrary]) -> LoadedLibrary:
    """dlopen libdir/soname, first pre-loading any dependency found in *libdir*."""
    path = os.path.join(libdir, spec.soname)
    for _ in range(_MAX_DEPENDENCIES):
        try:
            return LoadedLibrary(path, use_errno=True)
        except OSError as exc:
            dep = _MISSING_DEP.search(str(exc))
            if dep is None:
                raise
            dep_path = os.path.join(libdir, dep.group(1))
            if dep_path == path or not os.path.exists(dep_path):
                raise
            log.debug("pre-loading %s for %s", dep_path, spec.soname)
            keep.append(_open_in_dir(LibrarySpec(dep.group(1), spec.package), libdir, keep))
    raise OSError(f"{path}: too many missing dependencies")


def _not_found(spec: LibrarySpec, libdir: str | None, exc: OSError) -> XenLibraryNotFound:
    where = f" in {libdir} ({LIBDIR_ENV})" if libdir else ""
    return XenLibraryNotFound(
        f"{spec.soname} not found{where}: install {spec.package} "
        f"(apt-get install {spec.package}) for Xen 4.17, or name the directory holding "
        f"it: ${LIBDIR_ENV}, or in dom0 [xen] libdir of /etc/xenpbr/xenpbr.conf [{exc}]"
    )


def _dlopen(spec: LibrarySpec, libdir: str | None) -> LoadedLibrary:
    keep: list[LoadedLibrary] = []
    try:
        if libdir:
            lib = _open_in_dir(spec, libdir, keep)
        else:
            lib = LoadedLibrary(spec.soname, use_errno=True)
    except OSError as exc:
        raise _not_found(spec, libdir, exc) from exc
    lib._xenpbr_dependencies = keep  # keep pre-loaded dependencies alive
    return lib


def _apply_signatures(
    lib: ctypes.CDLL, signatures: Signatures, checkers: Mapping[str, ErrorChecker]
) -> tuple[str, ...]:
    """Set argtypes/restype/errcheck; return the symbols the library lacks."""
    missing = []
    for name, (argtypes, restype) in signatures.items():
        try:
            func = getattr(lib, name)
        except AttributeError:
            missing.append(name)
            continue
        func.argtypes = argtypes
        func.restype = restype
        if name in checkers:
            func.errcheck = checkers[name]
    if missing:
        log.debug("%s lacks symbols: %s", lib._name, ", ".join(missing))
    return tuple(missing)


def load_library(
    spec: LibrarySpec,
    signatures: Signatures,
    error_checkers: Mapping[str, ErrorChecker],
    libdir: str | None = None,
) -> LoadedLibrary:
    """Open *spec* and attach the prototypes from *signatures*.

    Missing symbols are tolerated (callers feature-test with ``hasattr``); what was
    loaded is recorded as ``lib.xenpbr_info`` (a :class:`LibraryInfo`).
    *libdir* defaults to ``$XENPBR_LIBDIR``; without either, the normal linker search
    path (ld.so.cache, ``LD_LIBRARY_PATH``) is used.
    """
    libdir = libdir or os.environ.get(LIBDIR_ENV) or None
    lib = _dlopen(spec, libdir)
    missing = _apply_signatures(lib, signatures, error_checkers)
    path = _loaded_path(lib, spec.soname)
    lib.xenpbr_info = LibraryInfo(spec.soname, path, _file_version(path, spec.soname), missing)
    log.debug("loaded %s from %s", spec.soname, path)
    return lib


def _hypervisor_type() -> str | None:
    try:
        return HYPERVISOR_TYPE_FILE.read_text(encoding="ascii").strip()
    except OSError:
        return None


def explain_open_failure(exc: OSError, what: str) -> XenUnavailable:
    """Turn a failed ``*_open()`` of the privcmd interface into an actionable error.

    The libraries only say "-1, errno"; whether that means "not root", "no privcmd
    driver" or "this is not Xen at all" depends on the machine, so we look.
    """
    err = exc.errno or errno_mod.EIO
    if err in (errno_mod.EACCES, errno_mod.EPERM):
        return NotPrivileged(
            err,
            f"{what}: cannot open /dev/xen/privcmd: permission denied: "
            "run as root in dom0",
            what,
        )
    privcmd = any(p.exists() for p in PRIVCMD_PATHS)
    hypervisor = _hypervisor_type()
    if not privcmd and hypervisor != "xen":
        return XenNotRunning(
            err,
            f"{what}: Xen is not running ({HYPERVISOR_TYPE_FILE} says "
            f"{hypervisor or 'nothing'}): boot the host into the Xen 4.17 hypervisor "
            "and run this in dom0",
            what,
        )
    if not privcmd:
        return PrivcmdUnavailable(
            err,
            f"{what}: cannot open /dev/xen/privcmd: run as root in dom0 with "
            "xen-privcmd loaded (modprobe xen-privcmd)",
            what,
        )
    return XenUnavailable(
        err, f"{what}: cannot open the Xen privcmd interface: {os.strerror(err)}", what
    )


def _close_handle(close: Callable[[Any], Any], handle: Any, what: str, finaliser: bool) -> None:
    if finaliser:
        log.warning("%s handle was not closed explicitly; closing it in the finaliser", what)
    try:
        close(handle)
    except OSError as exc:
        log.warning("closing %s handle failed: %s", what, exc)


class OwnedHandle:
    """Base for classes owning one C handle (``xc_interface*``, ``xenforeignmemory_handle*``).

    ``close()`` is explicit and idempotent and the class is a context manager, because
    each handle holds a privcmd file descriptor (and libxc some hypercall buffers) that
    should be released deterministically. A :func:`weakref.finalize` closes a forgotten
    handle as a safety net only, and says so in the log so the leak gets fixed.
    """

    _what = "xen"

    def _adopt(self, close: Callable[[Any], Any], handle: Any) -> None:
        self._handle = handle
        self._close_fn = close
        self._finalizer = weakref.finalize(self, _close_handle, close, handle, self._what, True)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Release the C handle; calling it again does nothing."""
        if self._finalizer.detach() is not None:
            _close_handle(self._close_fn, self._handle, self._what, False)

    def _h(self) -> Any:
        """The live C handle; refuse to hand a closed (dangling) pointer to C."""
        if self.closed:
            raise ValueError(f"operation on closed {self._what} handle")
        return self._handle

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
