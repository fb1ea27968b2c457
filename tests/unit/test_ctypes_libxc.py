"""Unit tests for the libxenctrl / libxenforeignmemory ctypes bindings (no Xen needed).

Struct sizes and offsets are pinned to values derived by hand from Xen 4.17's public
headers (tag RELEASE-4.17.7); the derivations are in the comments. They were also checked
by compiling the headers with gcc (-D__XEN_TOOLS__) and printing sizeof/offsetof.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import logging
import os
import uuid
from pathlib import Path

import pytest

from xenpbr.ctypes_libxc import _loader, foreignmemory, xenctrl, xenctrl_structs
from xenpbr.ctypes_libxc._errcheck import (
    DomainNotFound,
    FrameMapError,
    NotPrivileged,
    PrivcmdUnavailable,
    XenCallError,
    XenNotRunning,
    XenUnavailable,
    check_negative_errno,
    check_null_errno,
)
from xenpbr.ctypes_libxc._loader import LibrarySpec, XenLibraryNotFound, load_library
from xenpbr.ctypes_libxc.foreignmemory import ForeignMemory
from xenpbr.ctypes_libxc.xenctrl import XenCtrl
from xenpbr.ctypes_libxc.xenctrl_structs import (
    DomainFlags,
    ShutdownReason,
    VcpuContextX86_64,
    XcDomainInfo,
)
from xenpbr.errors import XenpbrError
from xenpbr.hypervisor import selfcheck

XEN_LIBDIR = os.environ.get("XENPBR_TEST_LIBDIR", "")
needs_real_libs = pytest.mark.skipif(
    not Path(XEN_LIBDIR, "libxenctrl.so.4.17").exists(),
    reason=f"Debian Xen 4.17 libraries not unpacked at {XEN_LIBDIR} "
    "(set XENPBR_TEST_LIBDIR to a directory holding libxenctrl.so.4.17)",
)
ON_XEN = Path("/dev/xen/privcmd").exists() or Path("/proc/xen/privcmd").exists()


def off(struct, dotted: str) -> int:
    """offsetof() for a dotted path through nested ctypes structures."""
    total, cls = 0, struct
    for name in dotted.split("."):
        field = getattr(cls, name)
        total += field.offset
        cls = dict(cls._fields_)[name]
    return total


# --------------------------------------------------------------------------- layouts


def test_domaininfo_layout_matches_xen_4_17_domctl_h():
    # struct xen_domctl_getdomaininfo (public/domctl.h, 4.17, interface version 0x15):
    # domain u16 @0, pad1 u16 @2, flags u32 @4, then 7 x uint64_aligned_t:
    # tot_pages @8, max_pages @16, outstanding @24, shr @32, paged @40,
    # shared_info_frame @48, cpu_time @56; nr_online_vcpus u32 @64, max_vcpu_id @68,
    # ssidref @72, handle u8[16] @76..92, cpupool u32 @92, gpaddr_bits u8 @96,
    # pad2 u8[7] @97..104, arch_config {emulation_flags, misc_flags} u32x2 @104..112.
    assert ctypes.sizeof(XcDomainInfo) == 112
    expected = {
        "domain": 0, "pad1": 2, "flags": 4, "tot_pages": 8, "max_pages": 16,
        "outstanding_pages": 24, "shr_pages": 32, "paged_pages": 40,
        "shared_info_frame": 48, "cpu_time": 56, "nr_online_vcpus": 64,
        "max_vcpu_id": 68, "ssidref": 72, "handle": 76, "cpupool": 92,
        "gpaddr_bits": 96, "pad2": 97, "arch_config": 104,
    }
    assert {name: getattr(XcDomainInfo, name).offset for name in expected} == expected
    assert ctypes.sizeof(xenctrl_structs.XenArchDomainConfig) == 8
    assert xenctrl_structs.XEN_DOMCTL_INTERFACE_VERSION == 0x15


def test_cpu_user_regs_layout_matches_xen_x86_64_h():
    # struct cpu_user_regs (arch-x86/xen-x86_64.h): 15 x u64 (r15..rdi) = 120 bytes,
    # error_code u32 @120, entry_vector u32 @124, rip @128, cs u16 @136 + _pad0[1],
    # saved_upcall_mask u8 @140 + _pad1[3], rflags @144, rsp @152, then ss/es/ds/fs/gs
    # each u16 + u16[3] pad = 8 bytes: ss @160 ... gs @192; size 200.
    regs = xenctrl_structs.CpuUserRegsX86_64
    assert ctypes.sizeof(regs) == 200
    assert (regs.rax.offset, regs.rdi.offset, regs.error_code.offset) == (80, 112, 120)
    assert (regs.rip.offset, regs.cs.offset, regs.saved_upcall_mask.offset) == (128, 136, 140)
    assert (regs.rflags.offset, regs.rsp.offset, regs.ss.offset, regs.gs.offset) == (
        144, 152, 160, 192)


def test_vcpu_guest_context_layout_matches_arch_x86_xen_h():
    # struct vcpu_guest_context (arch-x86/xen.h), x86_64 tools view (ulong = 8):
    # fpu_ctxt 512 @0; flags @512; user_regs (200) @520; trap_ctxt 256 x 16 @720..4816;
    # ldt_base @4816, ldt_ents @4824; gdt_frames[16] @4832..4960; gdt_ents @4960;
    # kernel_ss @4968, kernel_sp @4976; ctrlreg[8] @4984; debugreg[8] @5048;
    # event_callback_eip @5112, failsafe @5120, syscall @5128, vm_assist @5136;
    # fs_base @5144, gs_base_kernel @5152, gs_base_user @5160; size 5168.
    ctx = VcpuContextX86_64
    assert ctypes.sizeof(ctx) == 5168
    assert ctypes.sizeof(xenctrl_structs.TrapInfoX86_64) == 16
    assert ctypes.sizeof(xenctrl_structs.VcpuGuestContextAny) == 5168
    expected = {
        "flags": 512, "user_regs": 520, "trap_ctxt": 720, "ldt_base": 4816,
        "gdt_frames": 4832, "gdt_ents": 4960, "kernel_ss": 4968, "kernel_sp": 4976,
        "ctrlreg": 4984, "debugreg": 5048, "event_callback_eip": 5112,
        "failsafe_callback_eip": 5120, "syscall_callback_eip": 5128,
        "vm_assist": 5136, "fs_base": 5144, "gs_base_kernel": 5152, "gs_base_user": 5160,
    }
    assert {name: getattr(ctx, name).offset for name in expected} == expected
    assert off(ctx, "user_regs.rip") == 648 and off(ctx, "user_regs.rsp") == 672


def test_shared_info_layout_matches_public_xen_h():
    # struct shared_info (public/xen.h) on x86_64: vcpu_info[32] x 64 = 2048;
    # evtchn_pending[64] ulong @2048; evtchn_mask[64] @2560; wc_version @3072,
    # wc_sec @3076, wc_nsec @3080, wc_sec_hi @3084; arch @3088 (48 bytes):
    # max_pfn @3088, pfn_to_mfn_frame_list_list @3096, nmi_reason @3104,
    # p2m_cr3 @3112, p2m_vaddr @3120, p2m_generation @3128; size 3136.
    shinfo = xenctrl_structs.SharedInfoX86_64
    assert ctypes.sizeof(xenctrl_structs.VcpuTimeInfo) == 32
    assert ctypes.sizeof(xenctrl_structs.VcpuInfoX86_64) == 64
    assert ctypes.sizeof(xenctrl_structs.ArchSharedInfoX86_64) == 48
    assert ctypes.sizeof(shinfo) == 3136
    assert (shinfo.evtchn_pending.offset, shinfo.evtchn_mask.offset) == (2048, 2560)
    assert (shinfo.wc_version.offset, shinfo.wc_sec_hi.offset, shinfo.arch.offset) == (
        3072, 3084, 3088)
    assert [off(shinfo, f"arch.{f}") for f in (
        "max_pfn", "pfn_to_mfn_frame_list_list", "nmi_reason", "p2m_cr3", "p2m_vaddr",
        "p2m_generation")] == [3088, 3096, 3104, 3112, 3120, 3128]


def test_flag_bits_match_headers():
    # XEN_DOMINF_* (domctl.h): _XEN_DOMINF_dying 0 .. _XEN_DOMINF_hap 8
    assert [f.value for f in DomainFlags] == [1 << n for n in range(9)]
    assert [f.name for f in DomainFlags] == [
        "DYING", "HVM_GUEST", "SHUTDOWN", "PAUSED", "BLOCKED", "RUNNING", "DEBUGGED",
        "XS_DOMAIN", "HAP"]
    assert (xenctrl_structs.XEN_DOMINF_SHUTDOWNSHIFT,
            xenctrl_structs.XEN_DOMINF_SHUTDOWNMASK) == (16, 255)
    # SHUTDOWN_* (sched.h)
    assert [(r.name, r.value) for r in ShutdownReason] == [
        ("POWEROFF", 0), ("REBOOT", 1), ("SUSPEND", 2), ("CRASH", 3), ("WATCHDOG", 4),
        ("SOFT_RESET", 5)]
    # VGCF_* (arch-x86/xen.h)
    assert [f.value for f in xenctrl_structs.VcpuFlags] == [1, 4, 8, 16, 32]
    assert (xenctrl_structs.XENVER_version, xenctrl_structs.XENVER_extraversion) == (0, 1)


def test_signature_tables_are_consistent():
    for module in (xenctrl, foreignmemory):
        assert set(module.ERROR_CHECKERS) <= set(module.SIGNATURES)
        for name, (argtypes, restype) in module.SIGNATURES.items():
            assert isinstance(argtypes, tuple), name
            assert name in module.ERROR_CHECKERS, f"{name} has no error checker"


# --------------------------------------------------------------------------- decoding


def make_raw_info(domid=3, flags=0, **fields) -> XcDomainInfo:
    raw = XcDomainInfo(domain=domid, flags=flags)
    for name, value in fields.items():
        setattr(raw, name, value)
    return raw


def test_getinfolist_returns_raw_struct_copies_with_every_field():
    """The binding decodes nothing: what comes back is the xc_domaininfo_t itself (copied
    out of the call's buffer), its fields as Xen wrote them. Decoding into DomainState is
    tests/unit/test_hypervisor_libxc.py's (test_domain_state_decodes_flags_and_fields)."""
    handle = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    flags = DomainFlags.SHUTDOWN | DomainFlags.PAUSED | DomainFlags.HAP
    flags |= ShutdownReason.CRASH << 16
    raw = make_raw_info(7, flags, tot_pages=262144, max_pages=262400, shared_info_frame=0xABC,
                        cpu_time=12_500_000_000, nr_online_vcpus=2, max_vcpu_id=1,
                        cpupool=0, gpaddr_bits=52)
    raw.handle[:] = list(handle.bytes)
    raw.arch_config.emulation_flags = 0x7FF
    lib = FakeXcLib([raw])
    with XenCtrl(lib) as xc:
        (info,) = xc.domain_getinfolist()
        single = xc.domain_getinfo(7)
    for got in (info, single):
        assert isinstance(got, XcDomainInfo) and bytes(got) == bytes(raw)
        assert got.domain == 7 and got.flags == int(flags)
        assert DomainFlags.HAP & got.flags and DomainFlags.PAUSED & got.flags
        assert bytes(got.handle) == handle.bytes
        assert (got.tot_pages, got.shared_info_frame, got.gpaddr_bits) == (262144, 0xABC, 52)
        assert got.arch_config.emulation_flags == 0x7FF
        assert got.max_vcpu_id == 1
        assert got._b_base_ is None  # a copy, not a view into the call's buffer


def test_getinfolist_keeps_edge_values_raw():
    lib = FakeXcLib([make_raw_info(0, int(DomainFlags.RUNNING), max_vcpu_id=0xFFFFFFFF),
                     make_raw_info(1, int(DomainFlags.SHUTDOWN) | (42 << 16))])
    with XenCtrl(lib) as xc:
        dom0, odd = xc.domain_getinfolist()
    assert dom0.max_vcpu_id == xenctrl_structs.XEN_INVALID_MAX_VCPU_ID
    assert (odd.flags >> 16) & 0xFF == 42  # an undefined shutdown code survives the binding


def test_vcpu_context_convenience_properties():
    ctx = VcpuContextX86_64()
    ctx.user_regs.rip = 0xFFFFFFFF81000000
    ctx.user_regs.rsp = 0xFFFFC90000003F00
    ctx.ctrlreg[3] = 0x1234000
    ctx.flags = xenctrl_structs.VcpuFlags.ONLINE | xenctrl_structs.VcpuFlags.IN_KERNEL
    raw = bytes(ctx)
    assert int.from_bytes(raw[648:656], "little") == 0xFFFFFFFF81000000
    assert (ctx.rip, ctx.rsp, ctx.cr3, ctx.cr3_mfn) == (
        0xFFFFFFFF81000000, 0xFFFFC90000003F00, 0x1234000, 0x1234)
    assert xenctrl_structs.VcpuFlags.ONLINE in ctx.vcpu_flags


# --------------------------------------------------------------------------- errcheck


class _Func:
    __name__ = "xc_something"


def test_check_negative_errno_uses_errno():
    ctypes.set_errno(errno.EPERM)
    with pytest.raises(XenCallError) as info:
        check_negative_errno(-1, _Func(), ())
    assert info.value.errno == errno.EPERM and info.value.function == "xc_something"
    assert isinstance(info.value, OSError) and isinstance(info.value, XenpbrError)
    assert check_negative_errno(5, _Func(), ()) == 5


def test_check_negative_errno_accepts_minus_errno_returns():
    ctypes.set_errno(0)
    with pytest.raises(XenCallError) as info:
        check_negative_errno(-errno.EINVAL, _Func(), ())
    assert info.value.errno == errno.EINVAL


def test_check_null_errno():
    ctypes.set_errno(errno.ENOENT)
    with pytest.raises(XenCallError) as info:
        check_null_errno(None, _Func(), ())
    assert info.value.errno == errno.ENOENT
    assert check_null_errno(0x1000, _Func(), ()) == 0x1000


# --------------------------------------------------------------------------- loader


def test_missing_library_says_what_to_install(tmp_path):
    with pytest.raises(XenLibraryNotFound) as info:
        load_library(xenctrl.LIBRARY, {}, {}, libdir=str(tmp_path))
    message = str(info.value)
    assert "libxenctrl.so.4.17 not found" in message and "install libxenmisc4.17" in message
    assert "XENPBR_LIBDIR" in message


def test_missing_library_by_soname(monkeypatch):
    monkeypatch.delenv("XENPBR_LIBDIR", raising=False)
    spec = LibrarySpec("libxenpbr-does-not-exist.so.9", "xenpbr-nothing")
    with pytest.raises(XenLibraryNotFound, match="install xenpbr-nothing"):
        load_library(spec, {}, {})


def test_loader_tolerates_missing_symbols_and_applies_prototypes():
    libc = LibrarySpec("libc.so.6", "libc6")
    sigs = {"getpid": ((), ctypes.c_int), "xenpbr_no_such_symbol": ((), ctypes.c_int)}
    lib = load_library(libc, sigs, {"getpid": check_negative_errno})
    assert lib.xenpbr_info.missing_symbols == ("xenpbr_no_such_symbol",)
    assert not hasattr(lib, "xenpbr_no_such_symbol")
    assert lib.getpid.errcheck is check_negative_errno and lib.getpid() == os.getpid()
    assert lib.xenpbr_info.path and "libc" in lib.xenpbr_info.path


@needs_real_libs
@pytest.mark.parametrize("module", [xenctrl, foreignmemory], ids=lambda m: m.LIBRARY.soname)
def test_real_debian_library_has_every_symbol(module):
    lib = load_library(module.LIBRARY, module.SIGNATURES, module.ERROR_CHECKERS, XEN_LIBDIR)
    assert lib.xenpbr_info.missing_symbols == ()
    for name, (argtypes, restype) in module.SIGNATURES.items():
        func = getattr(lib, name)
        assert tuple(func.argtypes) == argtypes and func.restype is restype
    assert lib.xenpbr_info.soname == module.LIBRARY.soname


@needs_real_libs
def test_real_xc_interface_open_dummy_roundtrip():
    # XC_OPENFLAG_DUMMY (1) opens no device, so the real open/close prototypes and the
    # opaque-pointer return can be exercised without Xen.
    lib = xenctrl.libxenctrl(XEN_LIBDIR)
    handle = lib.xc_interface_open(None, None, 1)
    assert handle and isinstance(handle, xenctrl_structs.xc_interface_p)
    assert lib.xc_interface_close(handle) == 0


@needs_real_libs
def test_real_library_versions_recorded(monkeypatch):
    monkeypatch.setenv("XENPBR_LIBDIR", XEN_LIBDIR)
    lib = load_library(xenctrl.LIBRARY, xenctrl.SIGNATURES, xenctrl.ERROR_CHECKERS)
    assert lib.xenpbr_info.version.startswith("4.17")


@needs_real_libs
@pytest.mark.skipif(ON_XEN, reason="this host runs Xen; the no-Xen path cannot be tested")
def test_xc_interface_open_without_xen_says_xen_not_running():
    with pytest.raises(XenNotRunning) as info:
        XenCtrl(libdir=XEN_LIBDIR)
    assert info.value.errno == errno.ENOENT
    assert "Xen is not running" in str(info.value) and "dom0" in str(info.value)
    with pytest.raises(XenNotRunning):
        ForeignMemory(libdir=XEN_LIBDIR)


def _failure(err=errno.ENOENT):
    return OSError(err, os.strerror(err))


def test_explain_open_failure(monkeypatch, tmp_path):
    hv = tmp_path / "type"
    privcmd = tmp_path / "privcmd"
    monkeypatch.setattr(_loader, "HYPERVISOR_TYPE_FILE", hv)
    monkeypatch.setattr(_loader, "PRIVCMD_PATHS", (privcmd,))
    assert type(_loader.explain_open_failure(_failure(), "x")) is XenNotRunning
    hv.write_text("xen\n")
    err = _loader.explain_open_failure(_failure(), "x")
    assert type(err) is PrivcmdUnavailable
    assert "run as root in dom0 with xen-privcmd loaded" in str(err)
    privcmd.touch()
    err = _loader.explain_open_failure(_failure(errno.EACCES), "x")
    assert type(err) is NotPrivileged and "run as root" in str(err)
    assert type(_loader.explain_open_failure(_failure(errno.EIO), "x")) is XenUnavailable


# --------------------------------------------------------------------------- XenCtrl (fake lib)


def _raise(err: int, name: str):
    raise XenCallError.from_call(err, name)


class FakeXcLib:
    """Stands in for the loaded libxenctrl: same names, already error-checked."""

    def __init__(self, domains=(), open_errno=None):
        self.domains = {d.domain: d for d in domains}
        self.open_errno = open_errno
        self.closed = 0
        self.calls = []
        self.context = VcpuContextX86_64()

    def xc_interface_open(self, logger, dombuild_logger, flags):
        if self.open_errno:
            _raise(self.open_errno, "xc_interface_open")
        return "xch"

    def xc_interface_close(self, xch):
        self.closed += 1
        return 0

    def xc_version(self, xch, cmd, arg):
        if cmd == xenctrl_structs.XENVER_extraversion:
            ctypes.memmove(arg, b".7\0", 3)
            return 0
        return (4 << 16) | 17

    def xc_domain_getinfolist(self, xch, first, count, buf):
        found = sorted(d for d in self.domains if d >= first)[:count]
        for i, domid in enumerate(found):
            buf[i] = self.domains[domid]
        return len(found)

    def _per_domain(self, name, domid):
        self.calls.append((name, domid))
        if domid not in self.domains:
            _raise(errno.ESRCH, name)
        return 0

    def xc_domain_pause(self, xch, domid):
        return self._per_domain("pause", domid)

    def xc_domain_unpause(self, xch, domid):
        return self._per_domain("unpause", domid)

    def xc_domain_destroy(self, xch, domid):
        return self._per_domain("destroy", domid)

    def xc_vcpu_getcontext(self, xch, domid, vcpu, ctx_ref):
        self._per_domain("getcontext", domid)
        if vcpu > 0:
            _raise(errno.EINVAL, "xc_vcpu_getcontext")
        ctypes.memmove(ctx_ref, ctypes.addressof(self.context), ctypes.sizeof(self.context))
        return 0

    def xc_vcpu_setcontext(self, xch, domid, vcpu, ctx_ref):
        self._per_domain("setcontext", domid)
        ctypes.memmove(ctypes.addressof(self.context), ctx_ref, ctypes.sizeof(self.context))
        return 0

    def xc_domain_maximum_gpfn(self, xch, domid, out):
        self._per_domain("max_gpfn", domid)
        ctypes.cast(out, ctypes.POINTER(ctypes.c_ulong))[0] = 0x3FFFF
        return 0


def test_xenctrl_getinfolist_and_getinfo():
    lib = FakeXcLib([make_raw_info(0, int(DomainFlags.RUNNING)), make_raw_info(5)])
    with XenCtrl(lib) as xc:
        assert [d.domain for d in xc.domain_getinfolist()] == [0, 5]
        assert xc.domain_getinfo(5).domain == 5
        with pytest.raises(DomainNotFound, match="domain 3 does not exist"):
            xc.domain_getinfo(3)  # hypervisor answers with domain 5
        with pytest.raises(DomainNotFound) as info:
            xc.domain_getinfo(9)
        assert info.value.errno == errno.ESRCH and info.value.domid == 9
        assert str(xc.version()) == "4.17.7"
        with pytest.raises(ValueError):
            xc.domain_getinfolist(0, 0)


def test_xenctrl_domain_vanished_is_domain_not_found():
    lib = FakeXcLib([make_raw_info(5)])
    with XenCtrl(lib) as xc:
        xc.domain_pause(5)
        xc.domain_unpause(5)
        for call in (xc.domain_pause, xc.domain_unpause, xc.domain_destroy,
                     xc.domain_maximum_gpfn):
            with pytest.raises(DomainNotFound):
                call(6)
        with pytest.raises(DomainNotFound):
            xc.vcpu_getcontext(6, 0)


def test_xenctrl_vcpu_context_roundtrip_and_paused():
    lib = FakeXcLib([make_raw_info(5)])
    lib.context.user_regs.rip = 0xFFFFFFFF81234567
    with XenCtrl(lib) as xc:
        with xc.paused(5):
            ctx = xc.vcpu_getcontext(5, 0)
        assert [c[0] for c in lib.calls] == ["pause", "getcontext", "unpause"]
        assert ctx.rip == 0xFFFFFFFF81234567
        ctx.user_regs.rsp = 0x1000
        xc.vcpu_setcontext(5, 0, ctx)
        assert lib.context.user_regs.rsp == 0x1000
        with pytest.raises(XenCallError) as info:
            xc.vcpu_getcontext(5, 3)
        assert info.value.errno == errno.EINVAL and not isinstance(info.value, DomainNotFound)
        assert xc.domain_maximum_gpfn(5) == 0x3FFFF


def test_xenctrl_close_is_idempotent_and_blocks_use():
    lib = FakeXcLib()
    xc = XenCtrl(lib)
    xc.close()
    xc.close()
    assert lib.closed == 1 and xc.closed
    with pytest.raises(ValueError, match="closed"):
        xc.domain_getinfolist()


def test_xenctrl_finaliser_is_a_logged_safety_net(caplog):
    lib = FakeXcLib()
    with caplog.at_level(logging.WARNING):
        XenCtrl(lib)  # dropped without close()
        gc.collect()
    assert lib.closed == 1
    assert "not closed explicitly" in caplog.text


def test_xenctrl_open_failure_is_explained(monkeypatch):
    monkeypatch.setattr(_loader, "PRIVCMD_PATHS", (Path("/nonexistent/privcmd"),))
    monkeypatch.setattr(_loader, "HYPERVISOR_TYPE_FILE", Path("/nonexistent/type"))
    with pytest.raises(XenNotRunning):
        XenCtrl(FakeXcLib(open_errno=errno.ENOENT))


# --------------------------------------------------------------------------- ForeignMemory (fake lib)


class FakeFmemLib:
    """libxenforeignmemory stand-in: frames are served from a dict mfn -> bytes."""

    def __init__(self, frames, map_errno=None):
        self.frames = frames
        self.map_errno = map_errno
        self.buffers = {}
        self.unmapped = []
        self.closed = 0

    def xenforeignmemory_open(self, logger, flags):
        return "fmem"

    def xenforeignmemory_close(self, handle):
        self.closed += 1
        return 0

    def xenforeignmemory_map(self, handle, domid, prot, count, arr, err):
        if self.map_errno:
            _raise(self.map_errno, "xenforeignmemory_map")
        buf = ctypes.create_string_buffer(count * 4096)
        for i in range(count):
            data = self.frames.get(arr[i])
            if isinstance(data, int):
                err[i] = -data  # Linux privcmd reports negative errno values
            elif data is None:
                err[i] = -errno.EFAULT
            else:
                ctypes.memmove(ctypes.addressof(buf) + i * 4096, data, len(data))
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def xenforeignmemory_unmap(self, handle, address, count):
        self.unmapped.append((address, count))
        del self.buffers[address]
        return 0

    def xenforeignmemory_restrict(self, handle, domid):
        return 0


def page(fill: bytes) -> bytes:
    return (fill * 4096)[:4096]


def test_foreign_map_reads_and_unmaps():
    lib = FakeFmemLib({0x10: page(b"A"), 0x20: page(b"B")})
    with ForeignMemory(lib) as fmem:
        with fmem.map(1, [0x20, 0x10]) as mapping:
            view = mapping.memoryview
            assert view.readonly and len(view) == 8192
            assert bytes(view[:2]) == b"BB" and bytes(mapping.page(1)[:1]) == b"A"
        assert mapping.closed and lib.unmapped and not lib.buffers
        with pytest.raises(ValueError):
            _ = mapping.memoryview
        mapping.close()  # idempotent
        assert len(lib.unmapped) == 1
    assert lib.closed == 1


def test_foreign_map_writable_view():
    lib = FakeFmemLib({0x10: page(b"A")})
    with ForeignMemory(lib) as fmem, fmem.map(1, [0x10], writable=True) as mapping:
        mapping.memoryview[0] = ord("Z")
        assert bytes(mapping.memoryview[:1]) == b"Z"


def test_foreign_map_frame_error_names_the_frame_and_unmaps():
    lib = FakeFmemLib({0x10: page(b"A"), 0x30: errno.EINVAL})
    with ForeignMemory(lib) as fmem, pytest.raises(FrameMapError) as info:
        fmem.map(4, [0x10, 0x30, 0x40])
    err = info.value
    assert (err.domid, err.frame, err.errno, err.index, err.failed) == (4, 0x30, errno.EINVAL, 1, 2)
    assert "cannot map frame 0x30 of domain 4" in str(err)
    assert not lib.buffers  # the partial mapping was unmapped


def test_foreign_map_partial_reports_errors_per_page():
    lib = FakeFmemLib({0x10: page(b"A")})
    with ForeignMemory(lib) as fmem, fmem.map(4, [0x99, 0x10], partial=True) as mapping:
        assert mapping.errors == {0: errno.EFAULT}
        with pytest.raises(FrameMapError, match="0x99"):
            mapping.page(0)
        assert bytes(mapping.page(1)[:1]) == b"A"
    assert not lib.buffers


def test_foreign_map_domain_gone():
    lib = FakeFmemLib({0x10: errno.ESRCH})
    with ForeignMemory(lib) as fmem, pytest.raises(DomainNotFound):
        fmem.map(4, [0x10])
    with ForeignMemory(FakeFmemLib({}, map_errno=errno.ESRCH)) as fmem:
        with pytest.raises(DomainNotFound):
            fmem.map(4, [0x10])
    with ForeignMemory(FakeFmemLib({}, map_errno=errno.ENOMEM)) as fmem:
        with pytest.raises(XenCallError) as info:
            fmem.map(4, [0x10])
        assert info.value.errno == errno.ENOMEM


def test_foreign_mapping_unmapped_when_body_raises():
    lib = FakeFmemLib({0x10: page(b"A")})
    with ForeignMemory(lib) as fmem, pytest.raises(RuntimeError):
        with fmem.map(1, [0x10]):
            raise RuntimeError("boom")
    assert not lib.buffers


def test_foreign_map_rejects_empty():
    with ForeignMemory(FakeFmemLib({})) as fmem, pytest.raises(ValueError):
        fmem.map(1, [])


# --------------------------------------------------------------------------- selfcheck
# (xenpbr.hypervisor.selfcheck: it sits above the bindings, but proves them, so its tests
# stay next to the binding's fake library)


def test_selfcheck_collect_with_fakes():
    lib = FakeXcLib([make_raw_info(0, int(DomainFlags.RUNNING), tot_pages=262144,
                                   nr_online_vcpus=2, cpu_time=3_000_000_000),
                     make_raw_info(4, int(DomainFlags.BLOCKED))])
    lib.context.user_regs.rip = 0xFFFFFFFF81000000
    args = selfcheck.build_parser().parse_args(["--json", "--vcpu-context", "4"])
    with XenCtrl(lib) as xc:
        report = selfcheck.collect(xc, None, args)
    json.dumps(report)  # must be serialisable
    assert report["xen_version"]["string"] == "4.17.7"
    dom0 = report["domains"][0]
    assert (dom0["mem_mib"], dom0["xl_state"], dom0["cpu_time_s"]) == (1024, "r-----", 3.0)
    # raw C fields and the decoded DomainState side by side
    assert (dom0["domain"], dom0["domid"], dom0["nr_online_vcpus"]) == (0, 0, 2)
    assert dom0["flag_names"] == ["RUNNING"] and dom0["uuid"] == str(uuid.UUID(int=0))
    assert report["domains"][1]["xl_state"] == "-b----"
    assert report["vcpu_context"]["rip"] == "0xffffffff81000000"
    assert [c[0] for c in lib.calls] == ["pause", "getcontext", "unpause"]


def test_selfcheck_marker_parsing():
    assert selfcheck.parse_marker("hex:00ff41") == b"\x00\xffA"
    assert selfcheck.parse_marker("XENPBR") == b"XENPBR"


@needs_real_libs
@pytest.mark.skipif(ON_XEN, reason="this host runs Xen")
def test_selfcheck_main_without_xen_reports_json_error(capsys):
    assert selfcheck.main(["--json", "--libdir", XEN_LIBDIR]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["error"]["type"] == "XenNotRunning"
    assert report["libraries"]["libxenctrl"]["soname"] == "libxenctrl.so.4.17"
    assert report["structs"]["xc_domaininfo_t"] == 112
