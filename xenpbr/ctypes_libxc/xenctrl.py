"""ctypes binding to libxenctrl (Xen 4.17, x86_64): prototypes, loading, :class:`XenCtrl`.

The C types (structs, flag enums, constants) are in
:mod:`xenpbr.ctypes_libxc.xenctrl_structs`; this module holds what turns them into calls:
the prototype table written from ``tools/include/xenctrl.h`` (Xen 4.17), the loader, the
thin :class:`XenCtrl` handle. No policy and no decoding: :meth:`XenCtrl.domain_getinfolist`
returns the raw ``xc_domaininfo_t`` structs (:class:`XcDomainInfo`, copied out of the call's
buffer); :func:`xenpbr.hypervisor.libxc.domain_state_from_info` decodes them once into the
:class:`~xenpbr.hypervisor.base.DomainState` the rest of xenpbr uses.

The module is import-safe without Xen: nothing is loaded until :func:`libxenctrl` (or a
:class:`XenCtrl`) is first used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import functools
import logging
from collections.abc import Iterator
from ctypes import POINTER, c_int, c_uint, c_uint32, c_void_p
from dataclasses import dataclass
from typing import Any

from ._errcheck import (
    DomainNotFound,
    XenCallError,
    check_negative_errno,
    check_null_errno,
)
from ._loader import (
    LibrarySpec,
    LoadedLibrary,
    OwnedHandle,
    explain_open_failure,
    load_library,
)
from .xenctrl_structs import (
    DOMID_FIRST_RESERVED,
    XEN_EXTRAVERSION_LEN,
    XENVER_extraversion,
    XENVER_version,
    ShutdownReason,
    VcpuContextX86_64,
    VcpuGuestContextAny,
    XcDomainInfo,
    xc_interface_p,
    xen_pfn_t,
)

log = logging.getLogger(__name__)

LIBRARY = LibrarySpec("libxenctrl.so.4.17", "libxenmisc4.17")

# ---------------------------------------------------------------------------------------
# Prototypes (tools/include/xenctrl.h, Xen 4.17)
# ---------------------------------------------------------------------------------------

_p = POINTER
SIGNATURES: dict[str, tuple[tuple[Any, ...], Any]] = {
    # xc_interface *xc_interface_open(xentoollog_logger *, xentoollog_logger *, unsigned)
    "xc_interface_open": ((c_void_p, c_void_p, c_uint), xc_interface_p),
    "xc_interface_close": ((xc_interface_p,), c_int),
    "xc_version": ((xc_interface_p, c_int, c_void_p), c_int),
    "xc_domain_getinfolist": (
        (xc_interface_p, c_uint32, c_uint, _p(XcDomainInfo)),
        c_int,
    ),
    "xc_domain_pause": ((xc_interface_p, c_uint32), c_int),
    "xc_domain_unpause": ((xc_interface_p, c_uint32), c_int),
    "xc_domain_destroy": ((xc_interface_p, c_uint32), c_int),
    "xc_domain_shutdown": ((xc_interface_p, c_uint32, c_int), c_int),
    "xc_vcpu_getcontext": (
        (xc_interface_p, c_uint32, c_uint32, _p(VcpuGuestContextAny)),
        c_int,
    ),
    "xc_vcpu_setcontext": (
        (xc_interface_p, c_uint32, c_uint32, _p(VcpuGuestContextAny)),
        c_int,
    ),
    "xc_domain_maximum_gpfn": ((xc_interface_p, c_uint32, _p(xen_pfn_t)), c_int),
    "xc_domain_nr_gpfns": ((xc_interface_p, c_uint32, _p(xen_pfn_t)), c_int),
    "xc_domain_get_guest_width": ((xc_interface_p, c_uint32, _p(c_uint)), c_int),
}

ERROR_CHECKERS = {
    name: check_negative_errno for name, (_, restype) in SIGNATURES.items() if restype is c_int
}
ERROR_CHECKERS["xc_interface_open"] = check_null_errno


@functools.cache
def libxenctrl(libdir: str | None = None) -> LoadedLibrary:
    """Load (once per *libdir*) libxenctrl.so.4.17 with the prototypes above."""
    return load_library(LIBRARY, SIGNATURES, ERROR_CHECKERS, libdir)


# ---------------------------------------------------------------------------------------
# Pythonic layer
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XenVersion:
    """Hypervisor version from ``xc_version(XENVER_version / XENVER_extraversion)``."""

    major: int
    minor: int
    extra: str

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.extra}"



class XenCtrl(OwnedHandle):
    """An open ``xc_interface*``: query and control domains through libxenctrl.

    *lib* lets tests substitute a fake library object exposing the same function names
    (already error-checked, i.e. raising :class:`XenCallError`); by default the real
    ``libxenctrl.so.4.17`` is loaded (honouring ``XENPBR_LIBDIR`` or *libdir*).
    """

    _what = "xc_interface"

    def __init__(self, lib: Any = None, *, libdir: str | None = None) -> None:
        self._lib = lib if lib is not None else libxenctrl(libdir)
        try:
            handle = self._lib.xc_interface_open(None, None, 0)
        except XenCallError as exc:
            raise explain_open_failure(exc, "xc_interface_open") from exc
        self._adopt(self._lib.xc_interface_close, handle)

    @property
    def lib(self) -> Any:
        return self._lib

    def version(self) -> XenVersion:
        """The running hypervisor's version (not the library's)."""
        raw = self._lib.xc_version(self._h(), XENVER_version, None)
        extra = ctypes.create_string_buffer(XEN_EXTRAVERSION_LEN)
        self._lib.xc_version(self._h(), XENVER_extraversion, extra)
        return XenVersion(raw >> 16, raw & 0xFFFF, extra.value.decode("ascii", "replace"))

    def domain_getinfolist(self, first: int = 0, max: int = 1024) -> list[XcDomainInfo]:
        """The raw ``xc_domaininfo_t`` of up to *max* domains with domid >= *first*, in one
        hypercall. Each is a copy (not a view of the call's buffer): a snapshot that may
        go stale, but stays valid memory."""
        if not 0 < max <= DOMID_FIRST_RESERVED:
            raise ValueError(f"max must be in 1..{DOMID_FIRST_RESERVED}, not {max}")
        buf = (XcDomainInfo * max)()
        count = self._lib.xc_domain_getinfolist(self._h(), first, max, buf)
        return [XcDomainInfo.from_buffer_copy(buf[i]) for i in range(count)]

    def domain_getinfo(self, domid: int) -> XcDomainInfo:
        """Info for exactly *domid*.

        getinfolist returns the *next* existing domain at or after *domid*, so a
        different domid in the answer means ours does not exist (libxc's own caveat).
        """
        infos = self.domain_getinfolist(domid, 1)
        if not infos:
            raise DomainNotFound(domid, "no domain at or above it")
        if infos[0].domain != domid:
            raise DomainNotFound(domid, f"hypervisor returned domain {infos[0].domain}")
        return infos[0]

    def _domain_call(self, name: str, domid: int, *args: Any) -> int:
        """Call a per-domain function; ESRCH means the domain is gone."""
        try:
            return getattr(self._lib, name)(self._h(), domid, *args)
        except XenCallError as exc:
            if exc.errno == errno_mod.ESRCH:
                raise DomainNotFound(domid, f"{name}() returned ESRCH") from exc
            raise

    def domain_pause(self, domid: int) -> None:
        """Pause *domid* (pauses nest: each pause needs one unpause)."""
        self._domain_call("xc_domain_pause", domid)

    def domain_unpause(self, domid: int) -> None:
        self._domain_call("xc_domain_unpause", domid)

    def domain_destroy(self, domid: int) -> None:
        self._domain_call("xc_domain_destroy", domid)

    def domain_shutdown(self, domid: int, reason: ShutdownReason) -> None:
        self._domain_call("xc_domain_shutdown", domid, int(reason))

    @contextlib.contextmanager
    def paused(self, domid: int) -> Iterator[None]:
        """Keep *domid* paused for the ``with`` block, so its state holds still."""
        self.domain_pause(domid)
        try:
            yield
        finally:
            self.domain_unpause(domid)

    def vcpu_getcontext(self, domid: int, vcpu: int) -> VcpuContextX86_64:
        """The register state of *vcpu* (pause the domain first for a stable answer).

        Xen answers EINVAL for a vcpu id it does not have and ENODATA for a vcpu that
        was never initialised; those stay plain :class:`XenCallError`.
        """
        ctx = VcpuGuestContextAny()
        self._domain_call("xc_vcpu_getcontext", domid, vcpu, ctypes.byref(ctx))
        return ctx.x64

    def vcpu_setcontext(self, domid: int, vcpu: int, ctx: VcpuContextX86_64) -> None:
        """Load *ctx* into *vcpu* (the domain must be paused)."""
        any_ctx = VcpuGuestContextAny()
        any_ctx.x64 = ctx
        self._domain_call("xc_vcpu_setcontext", domid, vcpu, ctypes.byref(any_ctx))

    def domain_maximum_gpfn(self, domid: int) -> int:
        """Highest guest pfn the domain has ever populated (XENMEM_maximum_gpfn)."""
        gpfn = xen_pfn_t()
        self._domain_call("xc_domain_maximum_gpfn", domid, ctypes.byref(gpfn))
        return gpfn.value

    def domain_guest_width(self, domid: int) -> int:
        """Guest word size in bytes: 8 for 64-bit PV/HVM guests, 4 for 32-bit PV."""
        width = c_uint()
        self._domain_call("xc_domain_get_guest_width", domid, ctypes.byref(width))
        return width.value
