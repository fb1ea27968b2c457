"""Thin ctypes bindings to Xen 4.17's libxenctrl and libxenforeignmemory (x86_64).

* :mod:`._loader` finds the libraries by exact soname and applies the prototype tables;
* :mod:`._errcheck` turns "-1/NULL + errno" into :class:`XenCallError` (an OSError);
* :mod:`.xenctrl` / :mod:`.foreignmemory` hold the struct layouts, ``SIGNATURES`` and
  ``ERROR_CHECKERS`` tables and the small owning classes :class:`XenCtrl` and
  :class:`ForeignMemory`;
* :mod:`.selfcheck` proves the layouts in a real dom0 (see docs/ctypes-bindings.md).

Importing this package loads no library; the first :class:`XenCtrl` or
:class:`ForeignMemory` does.
"""

from ._errcheck import (
    DomainNotFound,
    FrameMapError,
    NotPrivileged,
    PrivcmdUnavailable,
    XenCallError,
    XenNotRunning,
    XenUnavailable,
)
from ._loader import LIBDIR_ENV, LibraryInfo, XenLibraryNotFound
from .foreignmemory import ForeignMemory, Mapping
from .xenctrl import DomainInfo, XenCtrl
from .xenctrl_structs import DomainFlags, ShutdownReason, VcpuContextX86_64

__all__ = [
    "LIBDIR_ENV",
    "DomainFlags",
    "DomainInfo",
    "DomainNotFound",
    "ForeignMemory",
    "FrameMapError",
    "LibraryInfo",
    "Mapping",
    "NotPrivileged",
    "PrivcmdUnavailable",
    "ShutdownReason",
    "VcpuContextX86_64",
    "XenCallError",
    "XenCtrl",
    "XenLibraryNotFound",
    "XenNotRunning",
    "XenUnavailable",
]
