"""ctypes binding to libxenctrl (Xen 4.17, x86_64) and the :class:`XenCtrl` handle class.

Layout sources (all read at tag RELEASE-4.17.7, which matches Debian's 4.17.7 libraries,
and cross-checked by compiling the headers with gcc and printing sizeof/offsetof):

* ``xen/include/public/domctl.h`` - ``struct xen_domctl_getdomaininfo``, ``XEN_DOMINF_*``,
  ``XEN_DOMCTL_INTERFACE_VERSION`` 0x15.
* ``xen/include/public/arch-x86/xen.h`` - ``struct xen_arch_domainconfig``,
  ``struct trap_info``, ``struct vcpu_guest_context``, ``VGCF_*``.
* ``xen/include/public/arch-x86/xen-x86_64.h`` - ``struct cpu_user_regs``.
* ``xen/include/public/sched.h`` - ``SHUTDOWN_*``; ``public/version.h`` - ``XENVER_*``.
* ``tools/include/xenctrl.h`` - prototypes; ``xc_domaininfo_t`` is
  ``xen_domctl_getdomaininfo_t`` and ``vcpu_guest_context_any_t`` a union of the
  x86_64/x86_32 contexts.

The module is import-safe without Xen: nothing is loaded until :func:`libxenctrl` (or a
:class:`XenCtrl`) is first used.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno as errno_mod
import functools
import logging
import uuid
from collections.abc import Iterator
from ctypes import (
    POINTER,
    c_char,
    c_int,
    c_uint,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_ulong,
    c_void_p,
)
from dataclasses import dataclass
from typing import Any

from ._errcheck import (
    DomainNotFound,
    XenCallError,
    check_negative_errno,
    check_null_errno,
)
from ._loader import LibrarySpec, OwnedHandle, explain_open_failure, load_library

log = logging.getLogger(__name__)

LIBRARY = LibrarySpec("libxenctrl.so.4.17", "libxenmisc4.17")

XEN_DOMCTL_INTERFACE_VERSION = 0x15  # domctl.h, Xen 4.17 (4.16: 0x14, 4.18: 0x16)
XEN_INVALID_MAX_VCPU_ID = 0xFFFFFFFF  # domctl.h: (~0U), domain has no vcpus
XENVER_version = 0  # public/version.h: returns (major << 16) | minor
XENVER_extraversion = 1  # public/version.h: char[16], e.g. ".7"
XEN_EXTRAVERSION_LEN = 16

# ---------------------------------------------------------------------------------------
# C types
# ---------------------------------------------------------------------------------------

domid_t = c_uint16  # public/xen.h
xen_pfn_t = c_ulong  # arch-x86/xen.h: typedef unsigned long xen_pfn_t
xen_ulong_t = c_ulong  # arch-x86/xen.h


class XcInterface(ctypes.Structure):
    """Opaque ``xc_interface`` (``struct xc_interface_core``); only ever used by pointer."""


xc_interface_p = POINTER(XcInterface)


class DomainFlags(enum.IntFlag):
    """``XEN_DOMINF_*`` bits of ``xen_domctl_getdomaininfo.flags`` (domctl.h, Xen 4.17)."""

    DYING = 1 << 0
    HVM_GUEST = 1 << 1
    SHUTDOWN = 1 << 2
    PAUSED = 1 << 3
    BLOCKED = 1 << 4
    RUNNING = 1 << 5
    DEBUGGED = 1 << 6
    XS_DOMAIN = 1 << 7
    HAP = 1 << 8


XEN_DOMINF_SHUTDOWNMASK = 255  # domctl.h: guest-supplied shutdown code ...
XEN_DOMINF_SHUTDOWNSHIFT = 16  # ... lives in flags bits 16-23


class ShutdownReason(enum.IntEnum):
    """``SHUTDOWN_*`` codes (public/sched.h, Xen 4.17)."""

    POWEROFF = 0
    REBOOT = 1
    SUSPEND = 2
    CRASH = 3
    WATCHDOG = 4
    SOFT_RESET = 5


class VcpuFlags(enum.IntFlag):
    """``VGCF_*`` bits of ``vcpu_guest_context.flags`` (arch-x86/xen.h, Xen 4.17)."""

    I387_VALID = 1 << 0
    IN_KERNEL = 1 << 2
    FAILSAFE_DISABLES_EVENTS = 1 << 3
    SYSCALL_DISABLES_EVENTS = 1 << 4
    ONLINE = 1 << 5


class XenArchDomainConfig(ctypes.Structure):
    """``struct xen_arch_domainconfig`` for x86 (arch-x86/xen.h, Xen 4.17); 8 bytes."""

    _fields_ = [
        ("emulation_flags", c_uint32),  # XEN_X86_EMU_*
        ("misc_flags", c_uint32),  # XEN_X86_MSR_RELAXED
    ]


class XcDomainInfo(ctypes.Structure):
    """``xc_domaininfo_t`` == ``struct xen_domctl_getdomaininfo`` (domctl.h, Xen 4.17).

    112 bytes on x86_64. Xen 4.16 added ``pad1``/``gpaddr_bits``/``pad2`` (4.15 had
    104 bytes), so this layout is only valid for 4.16-4.18 hypervisors/libraries.
    ``uint64_aligned_t`` is plain ``uint64_t`` on x86_64.
    """

    _fields_ = [
        ("domain", domid_t),
        ("pad1", c_uint16),
        ("flags", c_uint32),
        ("tot_pages", c_uint64),
        ("max_pages", c_uint64),
        ("outstanding_pages", c_uint64),
        ("shr_pages", c_uint64),
        ("paged_pages", c_uint64),
        ("shared_info_frame", c_uint64),  # GMFN of shared_info (an MFN for PV)
        ("cpu_time", c_uint64),  # nanoseconds
        ("nr_online_vcpus", c_uint32),
        ("max_vcpu_id", c_uint32),
        ("ssidref", c_uint32),
        ("handle", c_uint8 * 16),  # xen_domain_handle_t (the domain's UUID)
        ("cpupool", c_uint32),
        ("gpaddr_bits", c_uint8),
        ("pad2", c_uint8 * 7),
        ("arch_config", XenArchDomainConfig),
    ]


class CpuUserRegsX86_64(ctypes.Structure):
    """``struct cpu_user_regs`` (arch-x86/xen-x86_64.h, Xen 4.17); 200 bytes.

    The header wraps each register in an anonymous union of its 64/32/16/8-bit names;
    we declare only the 64-bit member, which is what non-GCC consumers see too.
    """

    _fields_ = [
        ("r15", c_uint64),
        ("r14", c_uint64),
        ("r13", c_uint64),
        ("r12", c_uint64),
        ("rbp", c_uint64),
        ("rbx", c_uint64),
        ("r11", c_uint64),
        ("r10", c_uint64),
        ("r9", c_uint64),
        ("r8", c_uint64),
        ("rax", c_uint64),
        ("rcx", c_uint64),
        ("rdx", c_uint64),
        ("rsi", c_uint64),
        ("rdi", c_uint64),
        ("error_code", c_uint32),  # private
        ("entry_vector", c_uint32),  # private
        ("rip", c_uint64),
        ("cs", c_uint16),
        ("_pad0", c_uint16 * 1),
        ("saved_upcall_mask", c_uint8),
        ("_pad1", c_uint8 * 3),
        ("rflags", c_uint64),  # rflags.IF == !saved_upcall_mask
        ("rsp", c_uint64),
        ("ss", c_uint16),
        ("_pad2", c_uint16 * 3),
        ("es", c_uint16),
        ("_pad3", c_uint16 * 3),
        ("ds", c_uint16),
        ("_pad4", c_uint16 * 3),
        ("fs", c_uint16),
        ("_pad5", c_uint16 * 3),
        ("gs", c_uint16),
        ("_pad6", c_uint16 * 3),
    ]


class TrapInfoX86_64(ctypes.Structure):
    """``struct trap_info`` (arch-x86/xen.h, Xen 4.17); 16 bytes on x86_64."""

    _fields_ = [
        ("vector", c_uint8),
        ("flags", c_uint8),  # 0-3: privilege level; 4: clear event enable?
        ("cs", c_uint16),
        ("address", c_ulong),
    ]


class VcpuContextX86_64(ctypes.Structure):
    """``struct vcpu_guest_context`` for an x86_64 toolstack (arch-x86/xen.h, Xen 4.17).

    5168 bytes. This is the ``x64`` member of ``vcpu_guest_context_any_t`` and what Xen
    returns for 64-bit PV and for HVM guests; a 32-bit PV guest's context comes back in
    the (smaller) x86_32 compat layout, which is not decoded here.
    """

    _fields_ = [
        ("fpu_ctxt", c_char * 512),  # FXSAVE image
        ("flags", c_ulong),  # VGCF_*
        ("user_regs", CpuUserRegsX86_64),
        ("trap_ctxt", TrapInfoX86_64 * 256),  # virtual IDT
        ("ldt_base", c_ulong),
        ("ldt_ents", c_ulong),
        ("gdt_frames", c_ulong * 16),
        ("gdt_ents", c_ulong),
        ("kernel_ss", c_ulong),
        ("kernel_sp", c_ulong),
        ("ctrlreg", c_ulong * 8),  # CR0-CR7; user pagetable is ctrlreg[1]
        ("debugreg", c_ulong * 8),
        ("event_callback_eip", c_ulong),
        ("failsafe_callback_eip", c_ulong),
        ("syscall_callback_eip", c_ulong),
        ("vm_assist", c_ulong),  # VMASST_TYPE_* bitmap
        ("fs_base", c_uint64),
        ("gs_base_kernel", c_uint64),
        ("gs_base_user", c_uint64),
    ]

    @property
    def rip(self) -> int:
        return self.user_regs.rip

    @property
    def rsp(self) -> int:
        return self.user_regs.rsp

    @property
    def cr3(self) -> int:
        """Kernel page-table base (ctrlreg[3]); for PV this holds a machine address."""
        return self.ctrlreg[3]

    @property
    def cr3_mfn(self) -> int:
        """``xen_cr3_to_pfn(cr3)`` for a 64-bit guest: the MFN of the top-level table."""
        return self.ctrlreg[3] >> 12

    @property
    def vcpu_flags(self) -> VcpuFlags:
        """The ``flags`` field decoded as :class:`VcpuFlags`."""
        return VcpuFlags(self.flags)


class VcpuGuestContextAny(ctypes.Union):
    """``vcpu_guest_context_any_t`` (tools/include/xenctrl.h, Xen 4.17).

    The x86_32 member is smaller than the x86_64 one, so a union holding only the
    64-bit layout has the same size (5168) and is a valid buffer for libxc.
    """

    _fields_ = [("x64", VcpuContextX86_64), ("c", VcpuContextX86_64)]


class VcpuTimeInfo(ctypes.Structure):
    """``struct vcpu_time_info`` (public/xen.h, Xen 4.17); 32 bytes."""

    _fields_ = [
        ("version", c_uint32),
        ("pad0", c_uint32),
        ("tsc_timestamp", c_uint64),
        ("system_time", c_uint64),
        ("tsc_to_system_mul", c_uint32),
        ("tsc_shift", ctypes.c_int8),
        ("flags", c_uint8),
        ("pad1", c_uint8 * 2),
    ]


class ArchVcpuInfoX86_64(ctypes.Structure):
    """``struct arch_vcpu_info`` (arch-x86/xen-x86_64.h, Xen 4.17); 16 bytes."""

    _fields_ = [("cr2", c_ulong), ("pad", c_ulong)]


class VcpuInfoX86_64(ctypes.Structure):
    """``struct vcpu_info`` (public/xen.h, Xen 4.17); 64 bytes on x86."""

    _fields_ = [
        ("evtchn_upcall_pending", c_uint8),
        ("evtchn_upcall_mask", c_uint8),
        ("evtchn_pending_sel", xen_ulong_t),
        ("arch", ArchVcpuInfoX86_64),
        ("time", VcpuTimeInfo),
    ]


class ArchSharedInfoX86_64(ctypes.Structure):
    """``struct arch_shared_info`` (arch-x86/xen.h, Xen 4.17); 48 bytes on x86_64.

    Where a PV guest publishes its P2M for the toolstack: the 3-level frame-list-list
    (``pfn_to_mfn_frame_list_list``) and/or the linear list (``p2m_cr3``/``p2m_vaddr``).
    ``max_pfn`` is the number of valid P2M entries, not the highest pfn.
    """

    _fields_ = [
        ("max_pfn", c_ulong),
        ("pfn_to_mfn_frame_list_list", xen_pfn_t),
        ("nmi_reason", c_ulong),
        ("p2m_cr3", c_ulong),
        ("p2m_vaddr", c_ulong),
        ("p2m_generation", c_ulong),
    ]


XEN_LEGACY_MAX_VCPUS = 32  # arch-x86/xen.h


class SharedInfoX86_64(ctypes.Structure):
    """``struct shared_info`` as seen by an x86_64 toolstack (public/xen.h, Xen 4.17).

    3136 bytes; ``arch`` at offset 3088. Valid for 64-bit guests only: a 32-bit PV
    guest's shared_info uses the compat layout with 4-byte longs.
    """

    _fields_ = [
        ("vcpu_info", VcpuInfoX86_64 * XEN_LEGACY_MAX_VCPUS),
        ("evtchn_pending", xen_ulong_t * 64),  # sizeof(xen_ulong_t) * 8
        ("evtchn_mask", xen_ulong_t * 64),
        ("wc_version", c_uint32),
        ("wc_sec", c_uint32),
        ("wc_nsec", c_uint32),
        ("wc_sec_hi", c_uint32),
        ("arch", ArchSharedInfoX86_64),
    ]


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
def libxenctrl(libdir: str | None = None) -> ctypes.CDLL:
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




DOMID_FIRST_RESERVED = 0x7FF0  # public/xen.h: domids at and above this are special


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
