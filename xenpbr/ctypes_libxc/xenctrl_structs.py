"""C types of libxenctrl (Xen 4.17, x86_64), written from Xen's public headers.

Separate from :mod:`xenpbr.ctypes_libxc.xenctrl` (prototypes, loading and the
:class:`~xenpbr.ctypes_libxc.xenctrl.XenCtrl` handle) because these layouts are pure data
descriptions that several layers read on their own: foreignmemory's ``xen_pfn_t``, the
guest-memory P2M walk (``shared_info``), the hypervisor's vCPU register translation.

Layout sources (all read at tag RELEASE-4.17.7, which matches Debian's 4.17.7 libraries,
and cross-checked by compiling the headers with gcc and printing sizeof/offsetof):

* ``xen/include/public/domctl.h`` - ``struct xen_domctl_getdomaininfo``, ``XEN_DOMINF_*``,
  ``XEN_DOMCTL_INTERFACE_VERSION`` 0x15.
* ``xen/include/public/arch-x86/xen.h`` - ``struct xen_arch_domainconfig``,
  ``struct trap_info``, ``struct vcpu_guest_context``, ``VGCF_*``.
* ``xen/include/public/arch-x86/xen-x86_64.h`` - ``struct cpu_user_regs``.
* ``xen/include/public/sched.h`` - ``SHUTDOWN_*``; ``public/version.h`` - ``XENVER_*``.
* ``tools/include/xenctrl.h`` - ``xc_domaininfo_t`` is ``xen_domctl_getdomaininfo_t`` and
  ``vcpu_guest_context_any_t`` a union of the x86_64/x86_32 contexts.
"""

from __future__ import annotations

import ctypes
import enum
from ctypes import (
    POINTER,
    c_char,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_ulong,
)

XEN_DOMCTL_INTERFACE_VERSION = 0x15  # domctl.h, Xen 4.17 (4.16: 0x14, 4.18: 0x16)
XEN_INVALID_MAX_VCPU_ID = 0xFFFFFFFF  # domctl.h: (~0U), domain has no vcpus
XENVER_version = 0  # public/version.h: returns (major << 16) | minor
XENVER_extraversion = 1  # public/version.h: char[16], e.g. ".7"
XEN_EXTRAVERSION_LEN = 16
DOMID_FIRST_RESERVED = 0x7FF0  # public/xen.h: domids at and above this are special

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
