"""ctypes binding to libxenctrl (Xen 4.17, x86_64): prototypes, loading, :class:`XenCtrl`.

The C types (structs, flag enums, constants) are in
:mod:`xenpbr.ctypes_libxc.xenctrl_structs`; this module holds what turns them into calls:
the prototype table written from ``tools/include/xenctrl.h`` (Xen 4.17), the loader, the
thin :class:`XenCtrl` handle, and :class:`DomainInfo`, the faithful decoded form of one
``xc_domaininfo_t`` (C field names, unknown shutdown codes kept as ints) that
:meth:`XenCtrl.domain_getinfolist` returns.

The module is import-safe without Xen: nothing is loaded until :func:`libxenctrl` (or a
:class:`XenCtrl`) is first used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import functools
import logging
import uuid
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
    XEN_DOMINF_SHUTDOWNMASK,
    XEN_DOMINF_SHUTDOWNSHIFT,
    XEN_EXTRAVERSION_LEN,
    XEN_INVALID_MAX_VCPU_ID,
    XENVER_extraversion,
    XENVER_version,
    DomainFlags,
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
class ArchConfig:
    """Decoded ``xen_arch_domainconfig`` (x86)."""

    emulation_flags: int
    misc_flags: int


@dataclass(frozen=True)
class DomainInfo:
    """One domain as reported by ``xc_domain_getinfolist`` (a snapshot; may go stale)."""

    domid: int
    flags: DomainFlags
    dying: bool
    shutdown: bool
    paused: bool
    blocked: bool
    running: bool
    hvm: bool
    debugged: bool
    xs_domain: bool
    hap: bool
    shutdown_reason: ShutdownReason | int | None
    tot_pages: int
    max_pages: int
    outstanding_pages: int
    shr_pages: int
    paged_pages: int
    shared_info_frame: int
    cpu_time: int
    nr_online_vcpus: int
    max_vcpu_id: int | None
    ssidref: int
    handle: uuid.UUID
    cpupool: int
    gpaddr_bits: int
    arch_config: ArchConfig

    @property
    def crashed(self) -> bool:
        return self.shutdown and self.shutdown_reason == ShutdownReason.CRASH

    @property
    def xl_state(self) -> str:
        """The 6-letter State column of ``xl list``, for cross-checking (see
        :func:`xl_state_column`)."""
        reason = self.shutdown_reason
        return xl_state_column(self.running, self.blocked, self.paused, self.shutdown,
                               None if reason is None else int(reason), self.dying)

    @classmethod
    def from_c(cls, raw: XcDomainInfo) -> DomainInfo:
        """Decode a raw ``xc_domaininfo_t``."""
        flags = DomainFlags(raw.flags & 0x1FF)
        shutdown = bool(flags & DomainFlags.SHUTDOWN)
        return cls(
            domid=raw.domain,
            flags=flags,
            dying=bool(flags & DomainFlags.DYING),
            shutdown=shutdown,
            paused=bool(flags & DomainFlags.PAUSED),
            blocked=bool(flags & DomainFlags.BLOCKED),
            running=bool(flags & DomainFlags.RUNNING),
            hvm=bool(flags & DomainFlags.HVM_GUEST),
            debugged=bool(flags & DomainFlags.DEBUGGED),
            xs_domain=bool(flags & DomainFlags.XS_DOMAIN),
            hap=bool(flags & DomainFlags.HAP),
            shutdown_reason=_shutdown_reason(raw.flags) if shutdown else None,
            tot_pages=raw.tot_pages,
            max_pages=raw.max_pages,
            outstanding_pages=raw.outstanding_pages,
            shr_pages=raw.shr_pages,
            paged_pages=raw.paged_pages,
            shared_info_frame=raw.shared_info_frame,
            cpu_time=raw.cpu_time,
            nr_online_vcpus=raw.nr_online_vcpus,
            max_vcpu_id=None if raw.max_vcpu_id == XEN_INVALID_MAX_VCPU_ID else raw.max_vcpu_id,
            ssidref=raw.ssidref,
            handle=uuid.UUID(bytes=bytes(raw.handle)),
            cpupool=raw.cpupool,
            gpaddr_bits=raw.gpaddr_bits,
            arch_config=ArchConfig(raw.arch_config.emulation_flags, raw.arch_config.misc_flags),
        )


#: xl list's fifth State letter per shutdown code (tools/xl/xl_list.c): poweroff "-",
#: reboot "r", suspend "s", crash "c", watchdog "w", soft_reset "S"; "?" for other codes.
XL_SHUTDOWN_LETTERS = "-rscwS"


def xl_state_column(running: bool, blocked: bool, paused: bool, shutdown: bool,
                    shutdown_code: int | None, dying: bool) -> str:
    """``xl list``'s State column exactly as xl prints it: ``r b p s``, then the letter
    of the shutdown reason (:data:`XL_SHUTDOWN_LETTERS`, ``-`` when not shut down), then
    ``d``. A crashed domain shows ``---sc-``, a watchdog-killed one ``---sw-``."""
    if shutdown and shutdown_code is not None:
        code = shutdown_code
        letter = XL_SHUTDOWN_LETTERS[code] if 0 <= code < len(XL_SHUTDOWN_LETTERS) else "?"
    else:
        letter = "-"
    flags = ((running, "r"), (blocked, "b"), (paused, "p"), (shutdown, "s"))
    return "".join(ch if on else "-" for on, ch in flags) + letter + ("d" if dying else "-")


def _shutdown_reason(flags: int) -> ShutdownReason | int:
    code = (flags >> XEN_DOMINF_SHUTDOWNSHIFT) & XEN_DOMINF_SHUTDOWNMASK
    try:
        return ShutdownReason(code)
    except ValueError:  # guest-supplied; keep unknown codes rather than fail
        return code


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

    def domain_getinfolist(self, first: int = 0, max: int = 1024) -> list[DomainInfo]:
        """Info for up to *max* domains with domid >= *first*, in one hypercall."""
        if not 0 < max <= DOMID_FIRST_RESERVED:
            raise ValueError(f"max must be in 1..{DOMID_FIRST_RESERVED}, not {max}")
        buf = (XcDomainInfo * max)()
        count = self._lib.xc_domain_getinfolist(self._h(), first, max, buf)
        return [DomainInfo.from_c(buf[i]) for i in range(count)]

    def domain_getinfo(self, domid: int) -> DomainInfo:
        """Info for exactly *domid*.

        getinfolist returns the *next* existing domain at or after *domid*, so a
        different domid in the answer means ours does not exist (libxc's own caveat).
        """
        infos = self.domain_getinfolist(domid, 1)
        if not infos:
            raise DomainNotFound(domid, "no domain at or above it")
        if infos[0].domid != domid:
            raise DomainNotFound(domid, f"hypervisor returned domain {infos[0].domid}")
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
