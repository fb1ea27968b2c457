"""The narrow hypervisor interface the rest of xenpbr uses, and its value types.

Why a narrow interface: the phase controller, recovery and the daemon need only a dozen
things from Xen (the domain list and each domain's state and shutdown reason,
pause/unpause/destroy/shutdown, vCPU registers, guest frames by pfn). Putting them behind
one abstract class lets the same code run over libxc in dom0
(:class:`~xenpbr.hypervisor.libxc.LibxcHypervisor`) and over an in-memory fake in unit
tests (:class:`~xenpbr.hypervisor.fake.FakeHypervisor`). Both raise the *same* exception
types in the same situations; that is part of the interface and is listed in
``docs/hypervisor.md``.

Exceptions: :class:`DomainNotFound` (re-exported from the ctypes binding, so there is one
class whatever the layer) for a domid that does not exist or vanished; the guest-memory
errors of :mod:`xenpbr.hypervisor.guest_memory` (:class:`PfnNotPresent`, :class:`NotPVGuest`, ...);
the :class:`HypervisorError` subclasses below for the errno cases callers must tell
apart; and :class:`~xenpbr.ctypes_libxc.XenCallError` for anything else libxc reports.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from xenpbr.ctypes_libxc._errcheck import DomainNotFound, XenCallError
from xenpbr.ctypes_libxc.xenctrl_structs import (
    DOMID_FIRST_RESERVED,
    ShutdownReason,
    VcpuFlags,
)
from xenpbr.errors import XenpbrError
from xenpbr.hypervisor.guest_memory import PAGE_SIZE

log = logging.getLogger(__name__)

__all__ = [
    "CONTROL_DOMID",
    "PAGE_SIZE",
    "ControlDomainRefused",
    "DomainNotFound",
    "DomainState",
    "Hypervisor",
    "HypervisorError",
    "NoSuchVcpu",
    "NotPaused",
    "PauseLimitReached",
    "ShutdownReason",
    "VcpuContextRejected",
    "VcpuFlags",
    "VcpuNotInitialised",
    "VcpuRegisters",
    "XenCallError",
    "check_domid",
]

CONTROL_DOMID = 0  # dom0: where xenpbr runs; never paused, shut down or destroyed by us
MAX_PAUSE_COUNT = 255  # xen/common/domain.c: toolstack pause count limit (EOVERFLOW)


# --------------------------------------------------------------------------- errors


class HypervisorError(XenpbrError):
    """A hypervisor operation failed in a way callers are expected to handle.

    ``domid`` names the domain; ``errno`` is the errno libxc reported (``None`` when the
    refusal is xenpbr's own policy).
    """

    def __init__(self, message: str, *, domid: int | None = None,
                 errno: int | None = None) -> None:
        super().__init__(message)
        self.domid = domid
        self.errno = errno


class ControlDomainRefused(HypervisorError):
    """xenpbr refuses to pause, shut down, destroy or write into the control domain.

    Doing so would stop the toolstack (and for shutdown, reboot the host): it is always
    a bug in the caller, never something to retry.
    """


class NotPaused(HypervisorError):
    """``unpause`` without a matching ``pause`` (Xen: EINVAL, pause count would go < 0)."""


class PauseLimitReached(HypervisorError):
    """The domain already holds 255 toolstack pauses (Xen: EOVERFLOW); a pause leaks."""


class NoSuchVcpu(HypervisorError):
    """The vCPU id is beyond the domain's vCPUs (Xen: EINVAL)."""


class VcpuNotInitialised(HypervisorError):
    """The vCPU exists but the guest never brought it up (Xen: ENODATA)."""


class VcpuContextRejected(HypervisorError):
    """Xen refused a new vCPU context (EINVAL/EOPNOTSUPP from setvcpucontext)."""


# --------------------------------------------------------------------------- values


def check_domid(domid: int) -> int:
    """Reject domids that can never name a real domain before any hypercall."""
    if not isinstance(domid, int) or isinstance(domid, bool):
        raise TypeError(f"domid must be an int, not {type(domid).__name__}")
    if not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"domid {domid} out of range 0..{DOMID_FIRST_RESERVED - 1}")
    return domid


def refuse_control_domain(domid: int, operation: str) -> None:
    """Policy shared by every implementation: never act destructively on dom0."""
    if check_domid(domid) == CONTROL_DOMID:
        raise ControlDomainRefused(
            f"refusing to {operation} domain 0 (the control domain running xenpbr): "
            "this is a bug in the caller", domid=domid)


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


@dataclass(frozen=True)
class DomainState:
    """One domain as the hypervisor reports it at one instant (it may go stale at once).

    ``shutdown_reason`` is set only while ``shutdown`` is; it is ``None`` also for a
    shutdown code Xen does not define (a guest may pass any code), which is then kept in
    ``shutdown_code``. The hypervisor knows no domain *names* (libxl keeps them in
    xenstore), so there is none here.

    This is the one typed record of a domain: :mod:`xenpbr.hypervisor.libxc` decodes
    Xen's raw ``xc_domaininfo_t`` into it once, :mod:`xenpbr.hypervisor.fake` builds it
    directly. Fields only a diagnostic needs (``shared_info_frame``, ``cpupool``,
    ``ssidref``, the HAP/debugged/xs_domain bits, ...) are not here: no caller decides
    anything on them and the fake could only invent them; the dom0 diagnostic
    (:mod:`xenpbr.hypervisor.selfcheck`) prints them from the raw struct.
    """

    domid: int
    uuid: UUID
    running: bool
    blocked: bool
    paused: bool
    shutdown: bool
    dying: bool
    shutdown_reason: ShutdownReason | None
    shutdown_code: int | None
    hvm: bool
    memory_pages: int
    max_memory_pages: int
    vcpus_online: int
    max_vcpu_id: int | None
    cpu_time_ns: int

    @property
    def crashed(self) -> bool:
        return self.shutdown and self.shutdown_reason == ShutdownReason.CRASH

    @property
    def memory_mib(self) -> float:
        return self.memory_pages * PAGE_SIZE / (1 << 20)

    @property
    def xl_state(self) -> str:
        """``xl list``'s State column as xl prints it, handy in logs and lab comparisons:
        ``r b p s``, the shutdown reason letter (``c`` crash, ``w`` watchdog, ``r`` reboot,
        ``s`` suspend, ``S`` soft reset, ``-`` poweroff, ``?`` unknown code), ``d``."""
        return xl_state_column(self.running, self.blocked, self.paused, self.shutdown,
                               self.shutdown_code, self.dying)


@dataclass(frozen=True)
class VcpuRegisters:
    """The registers of one x86_64 vCPU (``vcpu_guest_context``), decoded.

    ``cr3`` is what Xen stores in ``ctrlreg[3]``: for a PV guest a *machine* address.
    ``raw`` is the whole context as Xen returned it (FPU state, trap table, GDT frames
    ...) when the implementation has it; :meth:`Hypervisor.set_vcpu_registers` writes
    the named fields over ``raw`` if present, else over the vCPU's current context.
    Use :func:`dataclasses.replace` to change registers.
    """

    vcpu: int
    rip: int
    rsp: int
    rflags: int
    cr3: int
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    cs: int = 0
    ss: int = 0
    cr0: int = 0
    cr2: int = 0
    cr4: int = 0
    kernel_ss: int = 0
    kernel_sp: int = 0
    fs_base: int = 0
    gs_base_kernel: int = 0
    gs_base_user: int = 0
    flags: VcpuFlags = VcpuFlags(0)
    raw: bytes | None = field(default=None, repr=False, compare=False)

    GENERAL = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9",
               "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags", "cs", "ss")

    @property
    def online(self) -> bool:
        return bool(self.flags & VcpuFlags.ONLINE)

    @property
    def in_kernel(self) -> bool:
        return bool(self.flags & VcpuFlags.IN_KERNEL)

    def replace(self, **changes: Any) -> VcpuRegisters:
        """A copy with *changes* (shorthand for :func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- interface


def check_page_write(pfn: int, data: bytes, offset: int) -> None:
    """Refuse writes that would spill out of one page before touching guest memory."""
    if pfn < 0:
        raise ValueError(f"pfn must be >= 0, not {pfn}")
    if offset < 0 or offset + len(data) > PAGE_SIZE:
        raise ValueError(f"write of {len(data)} bytes at offset {offset} does not fit in "
                         f"one {PAGE_SIZE}-byte page")


class Hypervisor(abc.ABC):
    """What xenpbr needs from Xen. Implementations own their handles: use ``with``.

    Nothing here pauses a domain implicitly; wrap anything that must see a consistent
    guest in :meth:`paused`.
    """

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:  # noqa: B027 - a no-op default is right for handle-less fakes
        """Release handles; idempotent."""

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- domains --------------------------------------------------------------------------

    @abc.abstractmethod
    def list_domains(self) -> list[DomainState]:
        """Every domain that exists now, dying ones included, in domid order."""

    @abc.abstractmethod
    def domain_state(self, domid: int) -> DomainState:
        """The state of *domid*; :class:`DomainNotFound` if it does not exist."""

    @abc.abstractmethod
    def pause(self, domid: int) -> None:
        """Add one toolstack pause (they nest; :class:`PauseLimitReached` at 255)."""

    @abc.abstractmethod
    def unpause(self, domid: int) -> None:
        """Drop one toolstack pause (:class:`NotPaused` if none is held)."""

    @abc.abstractmethod
    def destroy(self, domid: int) -> None:
        """Kill *domid* (it may linger as ``dying`` while its memory is still mapped)."""

    @abc.abstractmethod
    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        """Shut *domid* down with *reason*, as if the guest had (first reason sticks)."""

    @contextlib.contextmanager
    def paused(self, domid: int) -> Iterator[None]:
        """Hold *domid* paused for the ``with`` block so its state stays still.

        If the domain vanishes inside the block the unpause is skipped (logged), so the
        block's own exception is the one that propagates.
        """
        self.pause(domid)
        try:
            yield
        finally:
            try:
                self.unpause(domid)
            except DomainNotFound:
                log.info("domain %d vanished while paused; nothing to unpause", domid)

    # -- vCPUs ----------------------------------------------------------------------------

    @abc.abstractmethod
    def vcpu_registers(self, domid: int, vcpu: int) -> VcpuRegisters:
        """Registers of *vcpu* (pause the domain first for a stable answer)."""

    @abc.abstractmethod
    def set_vcpu_registers(self, domid: int, vcpu: int, regs: VcpuRegisters) -> None:
        """Load *regs* into *vcpu*; pause the domain around it."""

    # -- guest memory (64-bit PV: by guest pfn through the guest's P2M) ----------------------

    @abc.abstractmethod
    def populated_pfns(self, domid: int) -> list[int]:
        """Guest pfns that have RAM behind them, ascending."""

    @abc.abstractmethod
    def read_pfns(self, domid: int, pfns: Sequence[int]) -> list[bytes]:
        """Copies of the given guest pages, in order (:class:`PfnNotPresent` for holes)."""

    def read_pfn(self, domid: int, pfn: int) -> bytes:
        return self.read_pfns(domid, [pfn])[0]

    @abc.abstractmethod
    def write_pfn(self, domid: int, pfn: int, data: bytes, offset: int = 0) -> None:
        """Write *data* into guest page *pfn* at *offset* (must fit in the page)."""

    @abc.abstractmethod
    def find(self, domid: int, marker: bytes, limit: int | None = None) -> list[tuple[int, int]]:
        """``(pfn, offset)`` of each occurrence of *marker* in guest-physical order."""
