"""Thin ctypes bindings to Xen 4.17's libxenctrl and libxenforeignmemory (x86_64).

* :mod:`._loader` finds the libraries by exact soname and applies the prototype tables;
* :mod:`._errcheck` turns "-1/NULL + errno" into :class:`XenCallError` (an OSError);
* :mod:`.xenctrl` / :mod:`.foreignmemory` hold the struct layouts, ``SIGNATURES`` and
  ``ERROR_CHECKERS`` tables and the small owning classes :class:`XenCtrl` and
  :class:`ForeignMemory`;
* no policy and no decoding: a domain's facts come back as the raw ``xc_domaininfo_t``
  (:class:`XcDomainInfo`), decoded once in :mod:`xenpbr.hypervisor.libxc`; the dom0
  diagnostic that proves these layouts is :mod:`xenpbr.hypervisor.selfcheck`
  (see docs/ctypes-bindings.md).

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
from .xenctrl import XenCtrl
from .xenctrl_structs import DomainFlags, ShutdownReason, VcpuContextX86_64, XcDomainInfo

__all__ = [
    "LIBDIR_ENV",
    "DomainFlags",
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
    "XcDomainInfo",
]
