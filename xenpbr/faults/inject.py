"""``xenpbr inject``: refuse what must not be touched, then alter a paused guest kernel.

Order matters: every refusal comes before the guest is paused (nothing changed), the
symbol map is checked against the running kernel (``linux_banner``) before anything is
written, the write is read back, and the guest is unpaused whatever happened. The
record (what changed, where, old and new bytes) is stored with the domain's state
before the command answers, so a recovery that follows can be explained.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xenpbr.errors import XenpbrError
from xenpbr.faults.decode import Decoder
from xenpbr.faults.kernel_memory import Frames, KernelMemory
from xenpbr.faults.kinds import (
    Change,
    FaultKind,
    choose_vcpu,
    hang_fault,
    operand_fault,
    stack_fault,
    text_fault,
)
from xenpbr.faults.symbols import KernelSymbols, SymbolMapError
from xenpbr.hypervisor.base import DomainState, Hypervisor, VcpuRegisters

log = logging.getLogger(__name__)

BANNER_SYMBOL = "linux_banner"
BANNER = b"Linux version "


class InjectionRefused(XenpbrError):
    """The injection was refused before anything in the guest changed."""


class InjectionFailed(XenpbrError):
    """The write did not read back as written (the guest was unpaused)."""


@dataclass(frozen=True)
class Injection:
    domain: str
    domid: int
    kind: FaultKind
    seed: int
    injected_at: float  # wall clock, when the guest was unpaused with the fault in it
    change: Change | None = None
    paused_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "domid": self.domid, "fault": self.kind.value,
                "seed": self.seed, "injected_at": self.injected_at,
                "paused_s": round(self.paused_s, 6),
                "change": None if self.change is None else self.change.to_json(),
                "provoked": None}


def check_running(state: DomainState, name: str) -> None:
    """Refuse dom0, and a domain that is not running (paused, shut down, dying)."""
    if state.domid == 0:
        raise InjectionRefused("refusing to inject a fault into dom0")
    if state.hvm:
        raise InjectionRefused(f"{name} is HVM/PVH: only 64-bit PV guests are supported")
    if state.shutdown or state.dying:
        raise InjectionRefused(f"{name} (domain {state.domid}) is not running "
                               f"({state.xl_state}): nothing to inject into")
    if state.paused:
        raise InjectionRefused(f"{name} (domain {state.domid}) is paused (someone holds "
                               "it, perhaps a capture): refusing to change it under them")


def online_vcpus(hypervisor: Hypervisor, domid: int) -> list[VcpuRegisters]:
    """The registers of each online vCPU of *domid* (paused by the caller)."""
    max_id = hypervisor.domain_state(domid).max_vcpu_id or 0
    vcpus = [hypervisor.vcpu_registers(domid, v) for v in range(max_id + 1)]
    online = [v for v in vcpus if v.online]
    if not online:
        raise InjectionRefused(f"domain {domid} has no online vCPU")
    return online


def read_now(hypervisor: Hypervisor, frames: Callable[[int], Frames], name: str,
             domid: int, address: int, size: int) -> bytes:
    """The *size* bytes at kernel *address* of running domain *domid* now, read with
    the guest paused (no half-written word is seen), for ``xenpbr fault-check``."""
    check_running(hypervisor.domain_state(domid), name)
    mapped = frames(domid)
    with hypervisor.paused(domid):
        return KernelMemory(mapped, online_vcpus(hypervisor, domid)[0].cr3).read(address, size)


class Injector:
    """Alters one paused domain's kernel. *frames* gives a domain's machine frames
    (:meth:`LibxcHypervisor.machine_frames`); *decoder* is built only for the kinds that
    decode instructions."""

    def __init__(self, hypervisor: Hypervisor, frames: Callable[[int], Frames],
                 symbols: KernelSymbols,
                 decoder: Callable[[], Decoder] = Decoder) -> None:
        self.hypervisor = hypervisor
        self.frames = frames
        self.symbols = symbols
        self.decoder = decoder

    def inject(self, name: str, domid: int, kind: FaultKind, seed: int) -> Injection:
        if not kind.memory:
            raise ValueError(f"{kind.value} is not a memory fault")
        check_running(self.hypervisor.domain_state(domid), name)
        decoder = self.decoder() if kind in (FaultKind.TEXT, FaultKind.OPERAND) else None
        rng = random.Random(seed)
        frames = self.frames(domid)
        t0 = time.monotonic()
        with self.hypervisor.paused(domid):
            vcpus = self._vcpus(domid)
            vcpu = choose_vcpu(vcpus, rng) if kind is FaultKind.STACK else vcpus[0]
            memory = KernelMemory(frames, vcpu.cr3)
            self._check_symbols(memory)
            change = self._choose(kind, memory, vcpu, decoder, rng)
            memory.write(change.address, change.new)
            if memory.read(change.address, len(change.new)) != change.new:
                raise InjectionFailed(f"{name}: the write at {change.symbol} did not read "
                                      "back; the guest may hold part of it")
            log.warning("%s: %s fault injected at %s (%#x): %s -> %s; %s", name, kind.value,
                        change.symbol, change.address, change.old.hex(), change.new.hex(),
                        change.target)
        return Injection(name, domid, kind, seed, time.time(), change,
                         time.monotonic() - t0)

    def _vcpus(self, domid: int) -> list[VcpuRegisters]:
        return online_vcpus(self.hypervisor, domid)

    def _check_symbols(self, memory: KernelMemory) -> None:
        """The map must be this kernel's: its ``linux_banner`` must say so in memory."""
        address = self.symbols.address(BANNER_SYMBOL)
        seen = memory.read(address, len(BANNER))
        if seen != BANNER:
            raise SymbolMapError(
                f"{self.symbols.source} is not the running kernel's: {BANNER_SYMBOL} at "
                f"{address:#x} reads {seen!r}, not {BANNER!r}; pass the map of the kernel "
                "the guest booted (its /proc/kallsyms, read as root)")

    def _choose(self, kind: FaultKind, memory: KernelMemory, vcpu: VcpuRegisters,
                decoder: Decoder | None, rng: random.Random) -> Change:
        if kind is FaultKind.STACK:
            return stack_fault(memory, vcpu, self.symbols, rng)
        if kind is FaultKind.HANG:
            return hang_fault(memory, self.symbols)
        assert decoder is not None
        if kind is FaultKind.TEXT:
            return text_fault(memory, decoder, self.symbols, rng)
        return operand_fault(memory, decoder, self.symbols, rng)
