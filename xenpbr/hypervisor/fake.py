"""An in-memory :class:`~xenpbr.hypervisor.base.Hypervisor` for unit tests.

:class:`FakeHypervisor` models only behaviour read from Xen 4.17's source
(``xen/common/domain.c``, ``domctl.c``, ``sched/core.c``, ``tools/xenstore/
xenstored_domain.c``); each item is listed in ``docs/hypervisor.md`` and must be confirmed
on real Xen in the lab. Where the fake does not know what Xen does (operations on a dying
domain, dom0's memory), it raises :class:`FakeNotModelled`, an ``AssertionError`` that
xenpbr code cannot mistake for a Xen error, instead of guessing.

Wired to a :class:`~xenpbr.xenstore.FakeXenstoreServer`, it also plays xenstored's part
in domain events:

* creating a domain lays out ``/local/domain/<id>`` and introduces it, which fires
  ``@introduceDomain`` (libxl's ``xs_introduce_domain``);
* every ``VIRQ_DOM_EXC`` Xen would send (a domain finishing its shutdown, except a
  suspend with a suspend event channel; a domain becoming dead; a dead domain's last
  reference going) runs xenstored's ``check_domains``: each introduced domain newly seen
  shut down makes ``@releaseDomain`` fire once, and each introduced domain seen dying or
  gone is released (home removed as libxl does, ``@releaseDomain`` fired).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import uuid as uuid_mod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from xenpbr.ctypes_libxc._errcheck import DomainNotFound
from xenpbr.ctypes_libxc.xenctrl_structs import (
    DOMID_FIRST_RESERVED,
    ShutdownReason,
    VcpuFlags,
)
from xenpbr.hypervisor.guest_memory import NotPVGuest, PfnNotPresent
from xenpbr.hypervisor.base import (
    CONTROL_DOMID,
    MAX_PAUSE_COUNT,
    PAGE_SIZE,
    DomainState,
    Hypervisor,
    NoSuchVcpu,
    NotPaused,
    PauseLimitReached,
    VcpuNotInitialised,
    VcpuRegisters,
    check_domid,
    check_page_write,
    refuse_control_domain,
)
from xenpbr.xenstore.fake import FakeXenstoreServer

log = logging.getLogger(__name__)

__all__ = ["FakeHypervisor", "FakeNotModelled"]

_ZERO_PAGE = bytes(PAGE_SIZE)


class FakeNotModelled(AssertionError):
    """The test asked the fake for behaviour it does not model (unknown on real Xen)."""


@dataclass
class _Domain:
    """One fake domain; mutable, guarded by the FakeHypervisor's lock."""

    domid: int
    uuid: uuid_mod.UUID
    hvm: bool
    nr_pfns: int
    vcpus: int
    suspend_evtchn: bool
    pause_count: int = 0
    shutdown_code: int | None = None
    dying: bool = False
    references: int = 0
    running: bool = False
    blocked: bool = False
    cpu_time_ns: int = 0
    holes: set[int] = field(default_factory=set)
    pages: dict[int, bytes] = field(default_factory=dict)
    registers: dict[int, VcpuRegisters] = field(default_factory=dict)
    introduced: bool = False  # xenstored's view
    shutdown_noticed: bool = False  # xenstored's domain->shutdown

    def state(self) -> DomainState:
        code = self.shutdown_code
        return DomainState(
            domid=self.domid, uuid=self.uuid, running=self.running, blocked=self.blocked,
            paused=self.pause_count > 0, shutdown=code is not None, dying=self.dying,
            shutdown_reason=_known_reason(code), shutdown_code=code, hvm=self.hvm,
            memory_pages=self.nr_pfns - len(self.holes), max_memory_pages=self.nr_pfns,
            vcpus_online=len(self.registers),
            max_vcpu_id=self.vcpus - 1 if self.vcpus else None,
            cpu_time_ns=self.cpu_time_ns,
        )

    def populated(self, pfn: int) -> bool:
        return 0 <= pfn < self.nr_pfns and pfn not in self.holes


def _known_reason(code: int | None) -> ShutdownReason | None:
    if code is None:
        return None
    try:
        return ShutdownReason(code)
    except ValueError:
        return None


class FakeHypervisor(Hypervisor):
    """Domains, pause counts, vCPU registers and guest pages in memory.

    Starts with dom0 (uuid all zeros, running). *xenstore* (a
    :class:`~xenpbr.xenstore.FakeXenstoreServer`) makes it fire the domain watches as
    xenstored does. Thread-safe: a watcher may run in another thread.
    """

    def __init__(self, xenstore: FakeXenstoreServer | None = None) -> None:
        self._lock = threading.RLock()
        self._domains: dict[int, _Domain] = {}
        self._xs = xenstore
        self._rover = 0
        self.virq_count = 0  # VIRQ_DOM_EXC Xen would have sent; tests may check
        dom0 = _Domain(CONTROL_DOMID, uuid_mod.UUID(int=0), False, 0, 1, False,
                       running=True, introduced=True)
        dom0.registers[0] = VcpuRegisters(vcpu=0, rip=0, rsp=0, rflags=0, cr3=0)
        self._domains[CONTROL_DOMID] = dom0

    # ======================================================================= test verbs

    def create_domain(self, domid: int | None = None, *, uuid: uuid_mod.UUID | None = None,
                      name: str | None = None, memory_mib: int = 64, vcpus: int = 1,
                      initialised_vcpus: int | None = None, hvm: bool = False,
                      paused: bool = False, introduce: bool = True,
                      suspend_evtchn: bool = False) -> int:
        """Create a domain as ``xl create`` leaves it (unpaused unless *paused*, as
        ``xl create -p`` / ``xl restore -p``). Returns its domid (next free after the
        last one handed out, like Xen's domid rover)."""
        with self._lock:
            domid = self._allocate_domid(domid)
            dom = _Domain(domid, uuid or uuid_mod.uuid4(), hvm, memory_mib * 256, vcpus,
                          suspend_evtchn, pause_count=1 if paused else 0)
            count = vcpus if initialised_vcpus is None else initialised_vcpus
            for vcpu in range(count):
                dom.registers[vcpu] = VcpuRegisters(vcpu=vcpu, rip=0, rsp=0, rflags=0, cr3=0,
                                                    flags=VcpuFlags.ONLINE)
            self._domains[domid] = dom
            log.debug("fake: created domain %d (%s)", domid, dom.uuid)
            if self._xs is not None:
                self._xs.create_domain(domid, name=name, introduce=introduce)
                dom.introduced = introduce
            return domid

    def _allocate_domid(self, wanted: int | None) -> int:
        if wanted is not None:
            if check_domid(wanted) in self._domains:
                raise ValueError(f"fake: domain {wanted} already exists")
            return wanted
        for _ in range(DOMID_FIRST_RESERVED):
            self._rover = self._rover + 1 if self._rover + 1 < DOMID_FIRST_RESERVED else 1
            if self._rover not in self._domains:
                return self._rover
        raise ValueError("fake: no free domid")

    def crash(self, domid: int) -> None:
        """The guest crashes (Linux PV panic: SCHEDOP_shutdown with SHUTDOWN_crash)."""
        self.guest_shutdown(domid, ShutdownReason.CRASH)

    def watchdog_expire(self, domid: int) -> None:
        """A guest watchdog timer runs out (Xen shuts the domain down, reason watchdog)."""
        self.guest_shutdown(domid, ShutdownReason.WATCHDOG)

    def guest_shutdown(self, domid: int, code: ShutdownReason | int) -> None:
        """The guest shuts itself down with *code* (any 0..255: the guest chooses)."""
        if not 0 <= int(code) <= 255:
            raise ValueError(f"shutdown code {code} does not fit Xen's u8")
        with self._lock:
            self._shutdown(self._live(domid), int(code))

    def resume(self, domid: int, *, xenstore_resume: bool = True) -> None:
        """``xc_domain_resume`` (clears the shutdown; sends no VIRQ) and, as libxl does
        after it, ``xs_resume_domain`` (re-arms xenstored's shutdown notification)."""
        with self._lock:
            dom = self._live(domid)
            dom.shutdown_code = None
            if xenstore_resume:
                dom.shutdown_noticed = False

    def hold_reference(self, domid: int) -> None:
        """Something (e.g. a foreign mapping) keeps a reference: a destroyed domain then
        stays listed as ``dying`` until :meth:`drop_reference`."""
        with self._lock:
            self._get(domid).references += 1

    def drop_reference(self, domid: int) -> None:
        with self._lock:
            dom = self._get(domid)
            dom.references -= 1
            if dom.dying and dom.references <= 0:
                self._reap(dom)

    def set_activity(self, domid: int, *, running: bool, blocked: bool) -> None:
        """Set the ``running``/``blocked`` flags (not modelled: reported as set)."""
        with self._lock:
            dom = self._get(domid)
            dom.running, dom.blocked = running, blocked

    def set_cpu_time(self, domid: int, ns: int) -> None:
        with self._lock:
            self._get(domid).cpu_time_ns = ns

    def add_holes(self, domid: int, pfns: Sequence[int]) -> None:
        """Make *pfns* unpopulated (ballooned out / never populated)."""
        with self._lock:
            dom = self._get(domid)
            dom.holes.update(pfns)
            for pfn in pfns:
                dom.pages.pop(pfn, None)

    def pause_count(self, domid: int) -> int:
        with self._lock:
            return self._get(domid).pause_count

    # ======================================================================= interface

    def list_domains(self) -> list[DomainState]:
        with self._lock:
            return [self._domains[d].state() for d in sorted(self._domains)]

    def domain_state(self, domid: int) -> DomainState:
        with self._lock:
            return self._get(domid).state()

    def pause(self, domid: int) -> None:
        refuse_control_domain(domid, "pause")
        with self._lock:
            dom = self._live(domid)
            if dom.pause_count + 1 > MAX_PAUSE_COUNT:
                raise PauseLimitReached(f"domain {domid} already holds {MAX_PAUSE_COUNT} "
                                        "toolstack pauses", domid=domid, errno=errno.EOVERFLOW)
            dom.pause_count += 1

    def unpause(self, domid: int) -> None:
        refuse_control_domain(domid, "unpause")
        with self._lock:
            dom = self._live(domid)
            if dom.pause_count == 0:
                raise NotPaused(f"domain {domid} holds no toolstack pause", domid=domid,
                                errno=errno.EINVAL)
            dom.pause_count -= 1

    def destroy(self, domid: int) -> None:
        refuse_control_domain(domid, "destroy")
        with self._lock:
            dom = self._get(domid)
            if dom.dying:
                return  # Xen: domain_kill of a dead domain returns 0
            dom.dying = True
            self._virq()
            if dom.references <= 0:
                self._reap(dom)

    def shutdown(self, domid: int, reason: ShutdownReason) -> None:
        refuse_control_domain(domid, "shut down")
        reason = ShutdownReason(reason)
        with self._lock:
            self._shutdown(self._live(domid), int(reason))

    def vcpu_registers(self, domid: int, vcpu: int) -> VcpuRegisters:
        with self._lock:
            dom = self._live(domid)
            self._check_vcpu(dom, vcpu)
            if vcpu not in dom.registers:
                raise VcpuNotInitialised(f"vcpu {vcpu} of domain {domid} was never brought "
                                         "up by the guest", domid=domid, errno=errno.ENODATA)
            return dom.registers[vcpu]

    def set_vcpu_registers(self, domid: int, vcpu: int, regs: VcpuRegisters) -> None:
        refuse_control_domain(domid, "set vcpu registers of")
        with self._lock:
            dom = self._live(domid)
            self._check_vcpu(dom, vcpu)
            dom.registers[vcpu] = dataclasses.replace(regs, vcpu=vcpu)

    def populated_pfns(self, domid: int) -> list[int]:
        with self._lock:
            dom = self._memory(domid)
            return [pfn for pfn in range(dom.nr_pfns) if pfn not in dom.holes]

    def read_pfns(self, domid: int, pfns: Sequence[int]) -> list[bytes]:
        with self._lock:
            dom = self._memory(domid)
            return [self._page(dom, pfn) for pfn in pfns]

    def write_pfn(self, domid: int, pfn: int, data: bytes, offset: int = 0) -> None:
        refuse_control_domain(domid, "write memory of")
        check_page_write(pfn, data, offset)
        with self._lock:
            dom = self._memory(domid)
            page = bytearray(self._page(dom, pfn))
            page[offset:offset + len(data)] = data
            dom.pages[pfn] = bytes(page)

    def find(self, domid: int, marker: bytes, limit: int | None = None) -> list[tuple[int, int]]:
        if not 0 < len(marker) <= PAGE_SIZE:
            raise ValueError(f"marker must be 1..{PAGE_SIZE} bytes")
        with self._lock:
            dom = self._memory(domid)
            hits: list[tuple[int, int]] = []
            for pfn in self._candidate_pfns(dom, marker):
                data = self._page(dom, pfn)
                if dom.populated(pfn + 1):
                    data += self._page(dom, pfn + 1)[:len(marker) - 1]
                hits.extend((pfn, pos) for pos in _find_all(data, marker) if pos < PAGE_SIZE)
                if limit is not None and len(hits) >= limit:
                    return hits[:limit]
            return hits

    # ======================================================================= internals

    def _get(self, domid: int) -> _Domain:
        dom = self._domains.get(check_domid(domid))
        if dom is None:
            raise DomainNotFound(domid, "no such domain")
        return dom

    def _live(self, domid: int) -> _Domain:
        dom = self._get(domid)
        if dom.dying:
            raise FakeNotModelled(f"domain {domid} is dying: what Xen does for this "
                                  "operation on a dying domain is not modelled")
        return dom

    def _memory(self, domid: int) -> _Domain:
        dom = self._live(domid)
        if dom.domid == CONTROL_DOMID:
            raise FakeNotModelled("dom0's memory is not modelled")
        if dom.hvm:
            raise NotPVGuest(f"domain {domid} is HVM/PVH: map its GFNs directly")
        return dom

    @staticmethod
    def _check_vcpu(dom: _Domain, vcpu: int) -> None:
        if not 0 <= vcpu < dom.vcpus:
            raise NoSuchVcpu(f"domain {dom.domid} has no vcpu {vcpu}", domid=dom.domid,
                             errno=errno.EINVAL)

    @staticmethod
    def _page(dom: _Domain, pfn: int) -> bytes:
        if not dom.populated(pfn):
            raise PfnNotPresent(dom.domid, pfn)
        return dom.pages.get(pfn, _ZERO_PAGE)

    @staticmethod
    def _candidate_pfns(dom: _Domain, marker: bytes) -> Iterator[int]:
        """Pages where *marker* can start: written pages and the page before each (a
        match may start in zeros and end in a written page). All pages if the marker is
        all zeros."""
        if not any(marker):
            yield from (p for p in range(dom.nr_pfns) if p not in dom.holes)
            return
        wanted = {p for pfn in dom.pages for p in (pfn - 1, pfn) if dom.populated(p)}
        yield from sorted(wanted)

    def _shutdown(self, dom: _Domain, code: int) -> None:
        """Xen's domain_shutdown: the first code sticks until a resume; finishing the
        shutdown sends VIRQ_DOM_EXC, except a suspend with a suspend event channel."""
        if dom.shutdown_code is not None:
            log.debug("fake: domain %d already shut down (code %d)", dom.domid,
                      dom.shutdown_code)
            return
        dom.shutdown_code = code
        log.debug("fake: domain %d shut down, code %d", dom.domid, code)
        if code == ShutdownReason.SUSPEND and dom.suspend_evtchn:
            return
        self._virq()

    def _reap(self, dom: _Domain) -> None:
        """The last reference to a dead domain went: it leaves the list (another VIRQ)."""
        del self._domains[dom.domid]
        self._virq()

    def _virq(self) -> None:
        """VIRQ_DOM_EXC reached xenstored: run its check_domains().

        Introduced domains newly seen shut down set "notify" (one ``@releaseDomain`` for
        all of them); a dying one is released instead, which fires ``@releaseDomain``
        itself and clears "notify" (as ``notify = 0`` does in xenstored).
        """
        self.virq_count += 1
        if self._xs is None:
            return
        notify = False
        for dom in list(self._domains.values()):
            if not dom.introduced or dom.domid == CONTROL_DOMID:
                continue
            if dom.shutdown_code is not None and not dom.shutdown_noticed:
                dom.shutdown_noticed = True
                notify = True
            if dom.dying:
                self._release(dom)
                notify = False
        if notify:
            self._xs.fire_release_domain()

    def _release(self, dom: _Domain) -> None:
        """xenstored drops the dead domain's connection (firing ``@releaseDomain``); the
        home directory goes too, as libxl removes it around ``xl destroy``."""
        dom.introduced = False
        log.debug("fake xenstored: releasing domain %d", dom.domid)
        if self._xs is not None:
            self._xs.destroy_domain(dom.domid)


def _find_all(data: bytes, marker: bytes) -> Iterator[int]:
    pos = data.find(marker)
    while pos >= 0:
        yield pos
        pos = data.find(marker, pos + 1)

