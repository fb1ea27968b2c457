"""The :class:`~xenpbr.hypervisor.base.Hypervisor` interface over libxenctrl and
libxenforeignmemory (the ctypes bindings in :mod:`xenpbr.ctypes_libxc`).

This module is translation only: the raw ``xc_domaininfo_t`` -> :class:`DomainState`
(decoded here, once),
``vcpu_guest_context`` <-> :class:`VcpuRegisters`, and the errnos a caller must tell
apart -> specific exceptions (read from Xen 4.17's ``xen/common/domctl.c`` and
``domain.c``: EINVAL on unpause below zero, EOVERFLOW past 255 pauses, EINVAL/ENODATA
from getvcpucontext). Guest frames are reached through
:class:`~xenpbr.hypervisor.guest_memory.GuestMemory`, which walks the guest's P2M afresh for each
call: a running guest may change its P2M (ballooning), and a stale table would map the
wrong machine frames.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from xenpbr.ctypes_libxc._errcheck import XenCallError
from xenpbr.ctypes_libxc.foreignmemory import ForeignMemory
from xenpbr.ctypes_libxc.xenctrl import XenCtrl
from xenpbr.ctypes_libxc.xenctrl_structs import (
    XEN_DOMINF_SHUTDOWNMASK,
    XEN_DOMINF_SHUTDOWNSHIFT,
    XEN_INVALID_MAX_VCPU_ID,
    DomainFlags,
    ShutdownReason,
    VcpuContextX86_64,
    VcpuFlags,
    XcDomainInfo,
)
from xenpbr.hypervisor.guest_memory import INVALID_MFN, PAGE_SHIFT, GuestMemory, MachineFrames
from xenpbr.hypervisor.base import (
    MAX_PAUSE_COUNT,
    PAGE_SIZE,
    DomainState,
    Hypervisor,
    NoSuchVcpu,
    NotPaused,
    PauseLimitReached,
    VcpuContextRejected,
    VcpuNotInitialised,
    VcpuRegisters,
    check_domid,
    check_page_write,
    refuse_control_domain,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
LIST_BATCH = 1024  # domains per getinfolist hypercall


def shutdown_code_of(flags: int) -> int:
    """The guest-supplied shutdown code in ``XEN_DOMINF`` flags bits 16-23 (meaningful
    only while the SHUTDOWN bit is set; a running domain carries 0xff there)."""
    return (flags >> XEN_DOMINF_SHUTDOWNSHIFT) & XEN_DOMINF_SHUTDOWNMASK


def domain_state_from_info(raw: XcDomainInfo) -> DomainState:
    """Decode a raw ``xc_domaininfo_t`` (what the binding returns) into a DomainState.

    The ``XEN_DOMINF_*`` bits become bools; the shutdown code is read only while the
    SHUTDOWN bit is set, and one Xen does not define (a guest may pass any) is kept as
    ``shutdown_code`` with ``shutdown_reason=None``; the UUID is the 16 handle bytes;
    ``max_vcpu_id`` is ``None`` for a domain without vcpus (``XEN_INVALID_MAX_VCPU_ID``).
    """
    flags = DomainFlags(raw.flags & 0x1FF)
    shutdown = bool(flags & DomainFlags.SHUTDOWN)
    code = shutdown_code_of(raw.flags) if shutdown else None
    known: ShutdownReason | None = None
    if code is not None:
        with contextlib.suppress(ValueError):  # guest-supplied: keep unknown codes raw
            known = ShutdownReason(code)
    return DomainState(
        domid=raw.domain,
        uuid=uuid.UUID(bytes=bytes(raw.handle)),
        running=bool(flags & DomainFlags.RUNNING),
        blocked=bool(flags & DomainFlags.BLOCKED),
        paused=bool(flags & DomainFlags.PAUSED),
        shutdown=shutdown,
        dying=bool(flags & DomainFlags.DYING),
        shutdown_reason=known,
        shutdown_code=code,
        hvm=bool(flags & DomainFlags.HVM_GUEST),
        memory_pages=raw.tot_pages,
        max_memory_pages=raw.max_pages,
        vcpus_online=raw.nr_online_vcpus,
        max_vcpu_id=None if raw.max_vcpu_id == XEN_INVALID_MAX_VCPU_ID else raw.max_vcpu_id,
        cpu_time_ns=raw.cpu_time,
    )


def registers_from_context(vcpu: int, ctx: VcpuContextX86_64) -> VcpuRegisters:
    """Decode the fields xenpbr uses from a raw 64-bit ``vcpu_guest_context``."""
    regs = ctx.user_regs
    general = {name: getattr(regs, name) for name in VcpuRegisters.GENERAL}
    return VcpuRegisters(
        vcpu=vcpu,
        cr0=ctx.ctrlreg[0],
        cr2=ctx.ctrlreg[2],
        cr3=ctx.ctrlreg[3],
        cr4=ctx.ctrlreg[4],
        kernel_ss=ctx.kernel_ss,
        kernel_sp=ctx.kernel_sp,
        fs_base=ctx.fs_base,
        gs_base_kernel=ctx.gs_base_kernel,
        gs_base_user=ctx.gs_base_user,
        flags=VcpuFlags(ctx.flags),
        raw=bytes(ctx),
        **general,
    )


def context_from_registers(regs: VcpuRegisters, base: VcpuContextX86_64) -> VcpuContextX86_64:
    """*base* (a copy) with every field :class:`VcpuRegisters` names overwritten."""
    ctx = VcpuContextX86_64.from_buffer_copy(bytes(base))
    for name in VcpuRegisters.GENERAL:
        setattr(ctx.user_regs, name, getattr(regs, name))
    for index, name in ((0, "cr0"), (2, "cr2"), (3, "cr3"), (4, "cr4")):
        ctx.ctrlreg[index] = getattr(regs, name)
    for name in ("kernel_ss", "kernel_sp", "fs_base", "gs_base_kernel", "gs_base_user"):
        setattr(ctx, name, getattr(regs, name))
    ctx.flags = int(regs.flags)
    return ctx


class LibxcHypervisor(Hypervisor):
    """:class:`Hypervisor` over an open :class:`XenCtrl` and :class:`ForeignMemory`.

    By default both handles are opened here (honouring *libdir* / ``XENPBR_LIBDIR``);
    tests inject objects with the same methods. Either way this object owns them and
    closes them in :meth:`close`.
    """

    def __init__(self, xc: Any = None, fmem: Any = None, *, libdir: str | None = None,
                 batch_pages: int = 256, p2m_method: str = "auto") -> None:
        self._xc = xc if xc is not None else XenCtrl(libdir=libdir)
        try:
            self._fmem = fmem if fmem is not None else ForeignMemory(libdir=libdir)
        except BaseException:
            self._xc.close()
            raise
        self.batch_pages = batch_pages
        self.p2m_method = p2m_method
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in (self._fmem, self._xc):
            handle.close()
        log.debug("libxc hypervisor handles closed")

    # -- domains --------------------------------------------------------------------------

    def list_domains(self) -> list[DomainState]:
        out: list[DomainState] = []
        first = 0
        while True:
            batch = self._xc.domain_getinfolist(first, LIST_BATCH)
            out.extend(domain_state_from_info(info) for info in batch)
            if len(batch) < LIST_BATCH:
                return out
            first = batch[-1].domain + 1

    def domain_state(self, domid: int) -> DomainState:
        return domain_state_from_info(self._xc.domain_getinfo(check_domid(domid)))

    def pause(self, domid: int) -> None:
        refuse_control_domain(domid, "pause")
        self._mapped(domid, "pause", self._xc.domain_pause, domid, errors={
            errno_mod.EOVERFLOW: (PauseLimitReached, f"domain {domid} already holds "
                                  f"{MAX_PAUSE_COUNT} toolstack pauses: a caller pauses "
                                  "without unpausing (check `xl list` state 'p')"),
        })

    def unpause(self, domid: int) -> None:
        refuse_control_domain(domid, "unpause")
        self._mapped(domid, "unpause", self._xc.domain_unpause, domid, errors={
            errno_mod.EINVAL: (NotPaused, f"domain {domid} holds no toolstack pause: "
                               "unpause without a matching pause"),
        })

    def destroy(self, domid: int) -> None:
        refuse_control_domain(domid, "destroy")
        log.info("destroying domain %d", domid)
        self._xc.domain_destroy(domid)

    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        refuse_control_domain(domid, "shut down")
        reason = ShutdownReason(reason)
        log.info("shutting domain %d down (%s)", domid, reason.name.lower())
        self._xc.domain_shutdown(domid, reason)

    # -- vCPUs ----------------------------------------------------------------------------

    def _vcpu_errors(self, domid: int, vcpu: int) -> dict[int, tuple[type, str]]:
        return {
            errno_mod.EINVAL: (NoSuchVcpu, f"domain {domid} has no vcpu {vcpu}"),
            errno_mod.ENODATA: (VcpuNotInitialised, f"vcpu {vcpu} of domain {domid} was "
                                "never brought up by the guest"),
        }

    def vcpu_registers(self, domid: int, vcpu: int) -> VcpuRegisters:
        check_domid(domid)
        ctx = self._mapped(domid, "vcpu_getcontext", self._xc.vcpu_getcontext, domid, vcpu,
                           errors=self._vcpu_errors(domid, vcpu))
        return registers_from_context(vcpu, ctx)

    def set_vcpu_registers(self, domid: int, vcpu: int, regs: VcpuRegisters) -> None:
        refuse_control_domain(domid, "set vcpu registers of")
        self._check_vcpu_exists(domid, vcpu)
        if regs.raw is not None:
            base = VcpuContextX86_64.from_buffer_copy(regs.raw)
        else:
            base = self._mapped(domid, "vcpu_getcontext", self._xc.vcpu_getcontext, domid,
                                vcpu, errors=self._vcpu_errors(domid, vcpu))
        ctx = context_from_registers(regs, base)
        rejected = (VcpuContextRejected, f"Xen rejected the new context of vcpu {vcpu} of "
                    f"domain {domid} (bad selectors, cr3 or flags?)")
        self._mapped(domid, "vcpu_setcontext", self._xc.vcpu_setcontext, domid, vcpu, ctx,
                     errors={errno_mod.EINVAL: rejected, errno_mod.EOPNOTSUPP: rejected})

    def _check_vcpu_exists(self, domid: int, vcpu: int) -> None:
        """setvcpucontext answers EINVAL for both a bad vcpu id and a bad context; look
        first so the two are reported apart."""
        max_id = self.domain_state(domid).max_vcpu_id
        if max_id is None or not 0 <= vcpu <= max_id:
            raise NoSuchVcpu(f"domain {domid} has no vcpu {vcpu}", domid=domid,
                             errno=errno_mod.EINVAL)

    # -- guest memory ---------------------------------------------------------------------

    def guest_memory(self, domid: int) -> GuestMemory:
        """One domain's memory by pfn, its P2M walked once (so a caller reading many frames
        of one domain, as resurrection's extraction does, keeps and reuses it)."""
        return GuestMemory(self._xc, self._fmem, check_domid(domid),
                           batch_pages=self.batch_pages, p2m_method=self.p2m_method)

    def machine_frames(self, domid: int) -> MachineFrames:
        """One domain's frames by MFN, for walks of its own page tables (the fault
        injector's); refuses dom0, whose memory xenpbr never writes."""
        refuse_control_domain(domid, "map the machine frames of")
        return MachineFrames(self._fmem, domid)

    def populated_pfns(self, domid: int) -> list[int]:
        table = self.guest_memory(domid).p2m()
        return [pfn for pfn, mfn in enumerate(table) if mfn != INVALID_MFN]

    def read_pfns(self, domid: int, pfns: Sequence[int]) -> list[bytes]:
        return self._read_through(self.guest_memory(domid), pfns)

    def read_restored_pfns(self, domid: int, pfns: Sequence[int]) -> list[bytes]:
        """Pages of a domain restored and not yet run (a restore's read-back of the pages
        it left to Xen, :mod:`xenpbr.images.allocate_only`). Its shared_info still names
        the *saved* guest's P2M (Xen's restore copies it and zeroes the frame list), so
        the linear P2M is walked from vCPU 0's cr3, which the restore set to the new
        domain's page-table root."""
        root = self.vcpu_registers(domid, 0).cr3 >> PAGE_SHIFT
        return self._read_through(
            GuestMemory(self._xc, self._fmem, check_domid(domid), batch_pages=self.batch_pages,
                        p2m_method=self.p2m_method, p2m_root=root), pfns)

    def _read_through(self, memory: GuestMemory, pfns: Sequence[int]) -> list[bytes]:
        out: list[bytes] = []
        for start in range(0, len(pfns), self.batch_pages):
            chunk = pfns[start:start + self.batch_pages]
            with memory.map_pfns(chunk) as mapping:
                view = mapping.memoryview
                out.extend(bytes(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                           for i in range(len(chunk)))
        return out

    def write_pfn(self, domid: int, pfn: int, data: bytes, offset: int = 0) -> None:
        refuse_control_domain(domid, "write memory of")
        check_page_write(pfn, data, offset)
        with self.guest_memory(domid).map_pfns([pfn], writable=True) as mapping:
            mapping.memoryview[offset:offset + len(data)] = data

    def find(self, domid: int, marker: bytes, limit: int | None = None) -> list[tuple[int, int]]:
        return self.guest_memory(domid).find(marker, limit)

    # -- errno mapping --------------------------------------------------------------------

    def _mapped(self, domid: int, what: str, call: Callable[..., T], *args: Any,
                errors: dict[int, tuple[type, str]]) -> T:
        """Run *call*; turn the errnos listed in *errors* into their specific exception.

        ESRCH is already :class:`DomainNotFound` (the binding maps it); other errnos
        stay :class:`XenCallError`, which names the C function and errno.
        """
        try:
            return call(*args)
        except XenCallError as exc:
            if exc.errno not in errors or type(exc) is not XenCallError:
                raise
            cls, message = errors[exc.errno]
            log.debug("%s(%d) failed: %s", what, domid, exc)
            raise cls(message, domid=domid, errno=exc.errno) from exc

