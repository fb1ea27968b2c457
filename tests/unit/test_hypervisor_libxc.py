"""LibxcHypervisor over stub libxenctrl / libxenforeignmemory objects (no Xen needed).

The stubs stand in for the *loaded C libraries* (same function names, already
error-checked: they raise XenCallError like the real errcheck does), so the real
XenCtrl / ForeignMemory / GuestMemory code runs and these tests check the whole
translation: raw XEN_DOMINF_* flags and shutdown codes -> DomainState, errnos ->
exceptions, vcpu_guest_context <-> VcpuRegisters, guest pfns -> frames. Real-Xen checks
are the lab's (docs/hypervisor.md).
"""

from __future__ import annotations

import ctypes
import errno
import struct
import uuid

import pytest

from xenpbr.ctypes_libxc._errcheck import XenCallError
from xenpbr.ctypes_libxc.foreignmemory import ForeignMemory
from xenpbr.ctypes_libxc.xenctrl import XenCtrl
from xenpbr.ctypes_libxc.xenctrl_structs import (
    XEN_INVALID_MAX_VCPU_ID,
    DomainFlags,
    VcpuContextX86_64,
    XcDomainInfo,
)
from xenpbr.hypervisor.guest_memory import INVALID_MFN
from xenpbr.hypervisor import (
    ControlDomainRefused,
    DomainNotFound,
    NoSuchVcpu,
    NotPaused,
    NotPVGuest,
    PauseLimitReached,
    PfnNotPresent,
    ShutdownReason,
    VcpuContextRejected,
    VcpuFlags,
    VcpuNotInitialised,
)
from xenpbr.hypervisor import libxc as libxc_mod
from xenpbr.hypervisor.libxc import LibxcHypervisor, domain_state_from_info

PAGE = 4096
ARCH = 3088  # offsetof(struct shared_info, arch), x86_64, Xen 4.17
SHINFO, FLL, FL, LEAF = 0x100, 0x101, 0x102, 0x103
SHUTDOWN_CODE_INVALID = 0xFF  # what a running domain carries in flags bits 16-23


def raw_info(domid, flags=0, code=SHUTDOWN_CODE_INVALID, *, uid=None, pages=1024, vcpus=1,
             cpu_time=0, shinfo=SHINFO) -> XcDomainInfo:
    info = XcDomainInfo()
    info.domain = domid
    info.flags = int(flags) | (code << 16)
    info.tot_pages = pages
    info.max_pages = pages * 2
    info.nr_online_vcpus = vcpus
    info.max_vcpu_id = vcpus - 1 if vcpus else XEN_INVALID_MAX_VCPU_ID
    info.cpu_time = cpu_time
    info.shared_info_frame = shinfo
    info.handle[:] = list((uid or uuid.UUID(int=domid)).bytes)
    return info


def fail(err: int, name: str):
    raise XenCallError.from_call(err, name)


class StubXcLib:
    """libxenctrl stand-in: domains, injectable errnos, one context per (domid, vcpu)."""

    def __init__(self, *infos: XcDomainInfo) -> None:
        self.domains = {i.domain: i for i in infos}
        self.errors: dict[str, int] = {}  # function name -> errno to fail with
        self.calls: list[tuple] = []
        self.contexts: dict[tuple[int, int], VcpuContextX86_64] = {}
        self.closed = 0
        self.width = 8

    def xc_interface_open(self, *args):
        return "xch"

    def xc_interface_close(self, xch):
        self.closed += 1
        return 0

    def xc_domain_getinfolist(self, xch, first, count, buf):
        self.calls.append(("getinfolist", first, count))
        found = sorted(d for d in self.domains if d >= first)[:count]
        for i, domid in enumerate(found):
            buf[i] = self.domains[domid]
        return len(found)

    def _call(self, name, domid, *args):
        self.calls.append((name, domid, *args))
        if domid not in self.domains:
            fail(errno.ESRCH, name)
        if name in self.errors:
            fail(self.errors[name], name)
        return 0

    def xc_domain_pause(self, xch, domid):
        return self._call("xc_domain_pause", domid)

    def xc_domain_unpause(self, xch, domid):
        return self._call("xc_domain_unpause", domid)

    def xc_domain_destroy(self, xch, domid):
        return self._call("xc_domain_destroy", domid)

    def xc_domain_shutdown(self, xch, domid, reason):
        return self._call("xc_domain_shutdown", domid, reason)

    def xc_vcpu_getcontext(self, xch, domid, vcpu, ctx_ref):
        self._call("xc_vcpu_getcontext", domid, vcpu)
        ctx = self.contexts[(domid, vcpu)]
        ctypes.memmove(ctx_ref, ctypes.addressof(ctx), ctypes.sizeof(ctx))
        return 0

    def xc_vcpu_setcontext(self, xch, domid, vcpu, ctx_ref):
        self._call("xc_vcpu_setcontext", domid, vcpu)
        ctx = VcpuContextX86_64()
        ctypes.memmove(ctypes.addressof(ctx), ctx_ref, ctypes.sizeof(ctx))
        self.contexts[(domid, vcpu)] = ctx
        return 0

    def xc_domain_get_guest_width(self, xch, domid, out):
        self._call("xc_domain_get_guest_width", domid)
        ctypes.cast(out, ctypes.POINTER(ctypes.c_uint))[0] = self.width
        return 0


class StubFmemLib:
    """libxenforeignmemory stand-in over machine pages (ctypes buffers, so writes
    through a mapping land in them)."""

    def __init__(self) -> None:
        self.pages: dict[int, ctypes.Array] = {}
        self.buffers: dict[int, ctypes.Array] = {}
        self.closed = 0

    def put(self, mfn: int, data: bytes, offset: int = 0) -> None:
        page = self.pages.setdefault(mfn, ctypes.create_string_buffer(PAGE))
        ctypes.memmove(ctypes.addressof(page) + offset, data, len(data))

    def xenforeignmemory_open(self, logger, flags):
        return "fmem"

    def xenforeignmemory_close(self, handle):
        self.closed += 1
        return 0

    def xenforeignmemory_map(self, handle, domid, prot, count, arr, err):
        if count == 1 and arr[0] in self.pages:  # map in place: writes are visible
            return ctypes.addressof(self.pages[arr[0]])
        buf = ctypes.create_string_buffer(count * PAGE)
        for i in range(count):
            if arr[i] not in self.pages:
                err[i] = -errno.EFAULT
                continue
            ctypes.memmove(ctypes.addressof(buf) + i * PAGE, self.pages[arr[i]], PAGE)
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def xenforeignmemory_unmap(self, handle, address, count):
        self.buffers.pop(address, None)
        return 0


def pv_guest(fmem: StubFmemLib, nr_pfns: int, holes=()) -> dict[int, int]:
    """Lay out a 64-bit PV guest's P2M tree (shared_info -> fll -> fl -> leaf)."""
    p2m = {pfn: 0x200 + 2 * pfn for pfn in range(nr_pfns) if pfn not in holes}
    leaf = [p2m.get(pfn, INVALID_MFN) for pfn in range(nr_pfns)]
    leaf += [INVALID_MFN] * (512 - len(leaf))
    fmem.put(LEAF, struct.pack("<512Q", *leaf))
    fmem.put(FL, struct.pack("<Q", LEAF))
    fmem.put(FLL, struct.pack("<Q", FL))
    fmem.put(SHINFO, struct.pack("<QQ", nr_pfns, FLL), offset=ARCH)
    for mfn in p2m.values():
        fmem.put(mfn, b"")
    return p2m


_OPEN: list[LibxcHypervisor] = []


def make(*infos: XcDomainInfo) -> tuple[LibxcHypervisor, StubXcLib, StubFmemLib]:
    xlib, flib = StubXcLib(*infos), StubFmemLib()
    hv = LibxcHypervisor(XenCtrl(xlib), ForeignMemory(flib))
    _OPEN.append(hv)
    return hv, xlib, flib


@pytest.fixture(autouse=True)
def _close_handles():
    """Close every hypervisor a test made (else the handles' finalisers warn)."""
    yield
    while _OPEN:
        _OPEN.pop().close()


# --------------------------------------------------------------------------- domain state


def test_domain_state_decodes_flags_and_fields():
    """Once, here: the raw xc_domaininfo_t -> DomainState (the binding returns the struct
    undecoded; its raw fields are checked in test_ctypes_libxc.py)."""
    handle = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
    flags = DomainFlags.SHUTDOWN | DomainFlags.PAUSED | DomainFlags.HAP
    flags |= ShutdownReason.CRASH << 16
    raw = XcDomainInfo(domain=7, flags=flags, tot_pages=262144, max_pages=262400,
                       shared_info_frame=0xABC, cpu_time=12_500_000_000, nr_online_vcpus=2,
                       max_vcpu_id=1, cpupool=0, gpaddr_bits=52)
    raw.handle[:] = list(handle.bytes)
    state = domain_state_from_info(raw)
    assert (state.domid, state.shutdown, state.paused, state.running) == (7, True, True, False)
    assert state.shutdown_reason is ShutdownReason.CRASH and state.crashed
    assert state.shutdown_code == 3
    assert state.xl_state == "--psc-"
    assert state.uuid == handle
    assert (state.memory_pages, state.max_memory_pages) == (262144, 262400)
    assert state.cpu_time_ns == 12_500_000_000 and state.vcpus_online == 2
    assert state.max_vcpu_id == 1
    assert not state.hvm and not state.dying and not state.blocked


def test_domain_state_edge_values():
    state = domain_state_from_info(XcDomainInfo(domain=0, flags=int(DomainFlags.RUNNING),
                                                max_vcpu_id=0xFFFFFFFF))
    assert state.shutdown_reason is None and state.max_vcpu_id is None
    assert state.shutdown_code is None
    assert state.xl_state == "r-----"
    odd = domain_state_from_info(XcDomainInfo(domain=1,
                                              flags=int(DomainFlags.SHUTDOWN) | (42 << 16)))
    assert odd.shutdown and odd.shutdown_code == 42 and odd.shutdown_reason is None
    assert odd.xl_state == "---s?-"


def test_running_domain_translation():
    uid = uuid.uuid4()
    hv, _, _ = make(raw_info(0, DomainFlags.RUNNING),
                    raw_info(3, DomainFlags.BLOCKED, uid=uid, pages=2048, vcpus=2,
                             cpu_time=5_000_000))
    state = hv.domain_state(3)
    assert state.domid == 3 and state.uuid == uid
    assert state.blocked and not state.running and not state.paused
    assert not state.shutdown and not state.dying and not state.hvm
    assert state.shutdown_reason is None and state.shutdown_code is None  # 0xff ignored
    assert state.memory_pages == 2048 and state.max_memory_pages == 4096
    assert state.memory_mib == 8 and state.vcpus_online == 2 and state.max_vcpu_id == 1
    assert state.cpu_time_ns == 5_000_000 and state.xl_state == "-b----"


@pytest.mark.parametrize("reason", list(ShutdownReason))
def test_shutdown_reason_translation(reason):
    hv, _, _ = make(raw_info(4, DomainFlags.SHUTDOWN | DomainFlags.PAUSED, int(reason)))
    state = hv.domain_state(4)
    assert state.shutdown and state.paused
    assert state.shutdown_reason is reason and state.shutdown_code == int(reason)
    assert state.crashed == (reason is ShutdownReason.CRASH)


def test_unknown_shutdown_code_is_kept_raw():
    hv, _, _ = make(raw_info(4, DomainFlags.SHUTDOWN, 42))
    state = hv.domain_state(4)
    assert state.shutdown and state.shutdown_reason is None and state.shutdown_code == 42


def test_dying_and_hvm_flags():
    hv, _, _ = make(raw_info(6, DomainFlags.DYING | DomainFlags.SHUTDOWN, 3, vcpus=0),
                    raw_info(7, DomainFlags.HVM_GUEST | DomainFlags.RUNNING))
    dying, hvm = hv.list_domains()
    assert dying.dying and dying.crashed and dying.max_vcpu_id is None
    assert dying.xl_state == "---scd"
    assert hvm.hvm and hvm.running


def test_list_domains_pages_through_getinfolist(monkeypatch):
    monkeypatch.setattr(libxc_mod, "LIST_BATCH", 2)
    hv, xlib, _ = make(*(raw_info(d) for d in (0, 1, 5, 9, 12)))
    assert [s.domid for s in hv.list_domains()] == [0, 1, 5, 9, 12]
    assert [c[1] for c in xlib.calls if c[0] == "getinfolist"] == [0, 2, 10]


def test_missing_domain_is_domain_not_found():
    hv, _, _ = make(raw_info(0), raw_info(5))
    with pytest.raises(DomainNotFound) as info:
        hv.domain_state(3)
    assert info.value.domid == 3 and info.value.errno == errno.ESRCH
    for call in (lambda: hv.pause(3), lambda: hv.unpause(3), lambda: hv.destroy(3),
                 lambda: hv.shutdown(3, ShutdownReason.CRASH),
                 lambda: hv.vcpu_registers(3, 0), lambda: hv.read_pfn(3, 0)):
        with pytest.raises(DomainNotFound):
            call()


# --------------------------------------------------------------------------- control ops


def test_control_calls_reach_libxc():
    hv, xlib, _ = make(raw_info(0), raw_info(5))
    hv.pause(5)
    hv.unpause(5)
    hv.shutdown(5, ShutdownReason.CRASH)
    hv.destroy(5)
    assert xlib.calls == [("xc_domain_pause", 5), ("xc_domain_unpause", 5),
                          ("xc_domain_shutdown", 5, 3), ("xc_domain_destroy", 5)]


@pytest.mark.parametrize("call,name,err,exc", [
    ("pause", "xc_domain_pause", errno.EOVERFLOW, PauseLimitReached),
    ("unpause", "xc_domain_unpause", errno.EINVAL, NotPaused),
])
def test_pause_errnos_are_mapped(call, name, err, exc):
    hv, xlib, _ = make(raw_info(5))
    xlib.errors[name] = err
    with pytest.raises(exc) as info:
        getattr(hv, call)(5)
    assert info.value.errno == err and info.value.domid == 5
    assert isinstance(info.value.__cause__, XenCallError)


def test_other_errnos_stay_xen_call_error():
    hv, xlib, _ = make(raw_info(5))
    xlib.errors["xc_domain_pause"] = errno.EPERM
    with pytest.raises(XenCallError) as info:
        hv.pause(5)
    assert type(info.value) is XenCallError and info.value.errno == errno.EPERM
    assert "xc_domain_pause" in str(info.value)


def test_control_domain_refused_before_any_call():
    hv, xlib, _ = make(raw_info(0))
    for call in (lambda: hv.pause(0), lambda: hv.unpause(0), lambda: hv.destroy(0),
                 lambda: hv.shutdown(0, ShutdownReason.REBOOT), lambda: hv.write_pfn(0, 0, b"x")):
        with pytest.raises(ControlDomainRefused):
            call()
    assert xlib.calls == []


def test_shutdown_takes_only_defined_reasons():
    hv, _, _ = make(raw_info(5))
    with pytest.raises(ValueError):
        hv.shutdown(5, 42)


def test_close_closes_both_handles_once():
    hv, xlib, flib = make(raw_info(0))
    with hv:
        pass
    hv.close()
    assert xlib.closed == 1 and flib.closed == 1


# --------------------------------------------------------------------------- vCPUs


def context(rip=0x1000, rsp=0x2000, cr3=0x5000, flags=VcpuFlags.ONLINE | VcpuFlags.IN_KERNEL):
    ctx = VcpuContextX86_64()
    ctx.user_regs.rip, ctx.user_regs.rsp, ctx.user_regs.rax = rip, rsp, 7
    ctx.user_regs.rflags, ctx.user_regs.cs = 0x202, 0xE033
    ctx.ctrlreg[3] = cr3
    ctx.flags = int(flags)
    ctx.kernel_sp, ctx.fs_base = 0x3000, 0x4000
    ctx.fpu_ctxt = b"\x7f" * 16
    ctx.trap_ctxt[14].address = 0xFFFFFFFF81001234
    return ctx


def test_vcpu_registers_decoded():
    hv, xlib, _ = make(raw_info(5, vcpus=2))
    xlib.contexts[(5, 1)] = context()
    regs = hv.vcpu_registers(5, 1)
    assert (regs.vcpu, regs.rip, regs.rsp, regs.cr3, regs.rax) == (1, 0x1000, 0x2000, 0x5000, 7)
    assert regs.rflags == 0x202 and regs.cs == 0xE033
    assert regs.kernel_sp == 0x3000 and regs.fs_base == 0x4000
    assert regs.online and regs.in_kernel and len(regs.raw) == 5168


def test_set_vcpu_registers_keeps_the_rest_of_the_context():
    hv, xlib, _ = make(raw_info(5, vcpus=1))
    xlib.contexts[(5, 0)] = context()
    regs = hv.vcpu_registers(5, 0)
    hv.set_vcpu_registers(5, 0, regs.replace(rip=0xDEAD000, rax=9))
    ctx = xlib.contexts[(5, 0)]
    assert ctx.user_regs.rip == 0xDEAD000 and ctx.user_regs.rax == 9
    assert ctx.user_regs.rsp == 0x2000 and ctx.ctrlreg[3] == 0x5000
    assert ctx.fpu_ctxt[:16] == b"\x7f" * 16
    assert ctx.trap_ctxt[14].address == 0xFFFFFFFF81001234


def test_set_vcpu_registers_without_raw_reads_current_context():
    hv, xlib, _ = make(raw_info(5, vcpus=1))
    xlib.contexts[(5, 0)] = context()
    regs = hv.vcpu_registers(5, 0)
    bare = type(regs)(vcpu=0, rip=0x42, rsp=regs.rsp, rflags=regs.rflags, cr3=regs.cr3,
                      flags=regs.flags)
    hv.set_vcpu_registers(5, 0, bare)
    assert xlib.contexts[(5, 0)].user_regs.rip == 0x42
    assert xlib.contexts[(5, 0)].trap_ctxt[14].address == 0xFFFFFFFF81001234


@pytest.mark.parametrize("err,exc", [(errno.EINVAL, NoSuchVcpu),
                                     (errno.ENODATA, VcpuNotInitialised)])
def test_getcontext_errnos_are_mapped(err, exc):
    hv, xlib, _ = make(raw_info(5))
    xlib.errors["xc_vcpu_getcontext"] = err
    with pytest.raises(exc) as info:
        hv.vcpu_registers(5, 0)
    assert info.value.errno == err


def test_setcontext_errors():
    hv, xlib, _ = make(raw_info(5, vcpus=1))
    xlib.contexts[(5, 0)] = context()
    regs = hv.vcpu_registers(5, 0)
    with pytest.raises(NoSuchVcpu):
        hv.set_vcpu_registers(5, 3, regs)
    assert not [c for c in xlib.calls if c[0] == "xc_vcpu_setcontext"]
    for err in (errno.EINVAL, errno.EOPNOTSUPP):
        xlib.errors["xc_vcpu_setcontext"] = err
        with pytest.raises(VcpuContextRejected):
            hv.set_vcpu_registers(5, 0, regs)


# --------------------------------------------------------------------------- memory


def test_read_populated_and_find():
    hv, _, flib = make(raw_info(5))
    p2m = pv_guest(flib, 40, holes={9})
    flib.put(p2m[3], b"hello", offset=8)
    flib.put(p2m[4], b"MA", offset=PAGE - 2)
    flib.put(p2m[5], b"RK")
    assert hv.populated_pfns(5) == [p for p in range(40) if p != 9]
    assert hv.read_pfn(5, 3)[8:13] == b"hello"
    pages = hv.read_pfns(5, [3, 4, 5])
    assert [len(p) for p in pages] == [PAGE] * 3 and pages[2][:2] == b"RK"
    assert hv.find(5, b"MARK") == [(4, PAGE - 2)]
    with pytest.raises(PfnNotPresent):
        hv.read_pfn(5, 9)


def test_read_pfns_in_batches():
    hv, _, flib = make(raw_info(5))
    hv.batch_pages = 2
    p2m = pv_guest(flib, 8)
    for pfn in range(5):
        flib.put(p2m[pfn], bytes([pfn + 1]))
    assert [p[0] for p in hv.read_pfns(5, [0, 1, 2, 3, 4])] == [1, 2, 3, 4, 5]


def test_write_pfn_goes_through_a_writable_mapping():
    hv, _, flib = make(raw_info(5))
    p2m = pv_guest(flib, 8)
    hv.write_pfn(5, 6, b"xenpbr", offset=100)
    assert flib.pages[p2m[6]].raw[100:106] == b"xenpbr"
    assert hv.read_pfn(5, 6)[100:106] == b"xenpbr"
    with pytest.raises(ValueError):
        hv.write_pfn(5, 6, b"xy", offset=PAGE - 1)


def test_hvm_memory_is_not_pv():
    hv, _, _ = make(raw_info(5, DomainFlags.HVM_GUEST))
    with pytest.raises(NotPVGuest):
        hv.read_pfn(5, 0)
