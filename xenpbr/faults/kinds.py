"""The fault kinds: each picks a target in the guest kernel and the bytes to put there.

The first three are the paper's (Rio/Nooks style): one integer on a kernel stack, one
bit of an instruction, one operand of an instruction. ``hang`` is not random: it puts
``jmp .`` at the entry of the PV idle routine, the next idle vCPU spins there with
events masked, and the kernel stops making progress without crashing, which is how a
watchdog or a dom0 liveness check is proven to work. The functions are pure over
:class:`~xenpbr.faults.kernel_memory.KernelMemory`, so tests run them on synthetic
memory; :mod:`xenpbr.faults.inject` does the pausing and writing.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from xenpbr.errors import XenpbrError
from xenpbr.faults.decode import Decoder, Instruction
from xenpbr.faults.kernel_memory import KernelMemory
from xenpbr.faults.symbols import KernelSymbols
from xenpbr.hypervisor.base import VcpuRegisters

#: x86-64 kernel stacks are THREAD_SIZE (16 KiB without KASAN) and aligned to it, on
#: vmalloc (VMAP_STACK) or in the image (the boot vCPU's idle task): the top of the
#: stack an rsp points into is the next 16 KiB boundary.
THREAD_SIZE = 16 * 1024
#: Longest function prefix decoded to pick an instruction in it.
MAX_DECODE = 4096
#: Tries at a random function before a kind gives up (a function of padding only, or
#: one whose instructions have no operand field, is skipped).
TRIES = 64
#: The PV idle routine (``pv_ops.irq.safe_halt``), then the generic one.
IDLE_ROUTINES = ("xen_safe_halt", "default_idle")
JMP_SELF = b"\xeb\xfe"
INT3 = b"\xcc"


class FaultKind(str, enum.Enum):
    CRASH = "crash"  # sysrq c: a clean panic, through xl
    STACK = "stack"
    TEXT = "text"
    OPERAND = "operand"
    HANG = "hang"

    @property
    def memory(self) -> bool:
        """Whether the kind writes guest memory from dom0 (all but ``crash``)."""
        return self is not FaultKind.CRASH


class NoTarget(XenpbrError):
    """No place to put the fault was found (say why)."""


@dataclass(frozen=True)
class Change:
    """Exactly what a fault changed in the guest."""

    kind: FaultKind
    address: int
    symbol: str  # name+offset
    old: bytes
    new: bytes
    target: str  # where and why there, in words
    before: str = ""  # the instruction before and after (text and operand kinds)
    after: str = ""

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "address": f"{self.address:#x}",
                "symbol": self.symbol, "old": self.old.hex(), "new": self.new.hex(),
                "target": self.target, "before": self.before, "after": self.after}


def flip_bit(data: bytes, rng: random.Random) -> bytes:
    """*data* with one random bit inverted."""
    bit = rng.randrange(len(data) * 8)
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def stack_fault(memory: KernelMemory, vcpu: VcpuRegisters, symbols: KernelSymbols,
                rng: random.Random) -> Change:
    """One bit of one live 8-byte word on the kernel stack the vCPU is running on.

    A random thread's stack would need the guest's ``task_struct`` layout to find (the
    kernel ships no debug info dom0 could read), so the thread is the one on the vCPU:
    the live words are those between its ``rsp`` and the top of its stack.
    """
    if not vcpu.in_kernel:
        raise NoTarget(f"vCPU {vcpu.vcpu} is in user mode: no live kernel stack")
    low = vcpu.rsp & ~7
    top = (vcpu.rsp | (THREAD_SIZE - 1)) + 1
    words = (top - low) // 8
    if words < 1:
        raise NoTarget(f"vCPU {vcpu.vcpu}: empty stack at rsp {vcpu.rsp:#x}")
    slot = rng.randrange(words)
    address = low + slot * 8
    old = memory.read(address, 8)
    return Change(FaultKind.STACK, address, symbols.locate(address), old, flip_bit(old, rng),
                  f"kernel stack of the thread on vCPU {vcpu.vcpu} (rip "
                  f"{symbols.locate(vcpu.rip)}), word {slot} of {words} live above rsp "
                  f"{vcpu.rsp:#x}")


def _instructions(memory: KernelMemory, decoder: Decoder, symbols: KernelSymbols,
                  rng: random.Random) -> tuple[str, list[Instruction]]:
    function = symbols.random_function(rng)
    code = memory.read(function.address, min(function.size, MAX_DECODE))
    # the int3 padding up to the next symbol is never run: a fault there would be silent
    # by construction, so it is not part of the function
    code = code.rstrip(INT3)
    instructions = list(decoder.instructions(code, function.address))
    while instructions and _padding(instructions[-1]):  # alignment NOPs after the end
        instructions.pop()
    return function.name, instructions


def _padding(insn: Instruction) -> bool:
    return insn.text.startswith("nop") or insn.text == "int3"


def text_fault(memory: KernelMemory, decoder: Decoder, symbols: KernelSymbols,
               rng: random.Random) -> Change:
    """One bit of one instruction of a random kernel function."""
    for _ in range(TRIES):
        name, instructions = _instructions(memory, decoder, symbols, rng)
        if not instructions:
            continue
        insn = rng.choice(instructions)
        new = flip_bit(insn.raw, rng)
        return _instruction_change(FaultKind.TEXT, insn, new, decoder, symbols,
                                   f"instruction of {name}, one bit flipped")
    raise NoTarget(f"no decodable instruction in {TRIES} random kernel functions")


def operand_fault(memory: KernelMemory, decoder: Decoder, symbols: KernelSymbols,
                  rng: random.Random) -> Change:
    """One operand of one instruction of a random kernel function: the register of its
    ModRM byte replaced by another, or one bit of its displacement or immediate."""
    for _ in range(TRIES):
        name, instructions = _instructions(memory, decoder, symbols, rng)
        candidates = [i for i in instructions if i.operand_fields]
        if not candidates:
            continue
        insn = rng.choice(candidates)
        field = rng.choice(insn.operand_fields)
        new = _new_operand(insn, field, rng)
        return _instruction_change(FaultKind.OPERAND, insn, new, decoder, symbols,
                                   f"{_FIELD_WORDS[field]} of an instruction of {name}")
    raise NoTarget(f"no instruction with an operand in {TRIES} random kernel functions")


_FIELD_WORDS = {"modrm": "register operand (ModRM reg field)", "disp": "displacement",
                "imm": "immediate"}


def _new_operand(insn: Instruction, field: str, rng: random.Random) -> bytes:
    raw = bytearray(insn.raw)
    if field == "modrm":
        reg = (raw[insn.modrm_offset] >> 3) & 7
        new_reg = (reg + rng.randrange(1, 8)) % 8
        raw[insn.modrm_offset] = (raw[insn.modrm_offset] & 0xC7) | (new_reg << 3)
        return bytes(raw)
    offset, size = ((insn.disp_offset, insn.disp_size) if field == "disp"
                    else (insn.imm_offset, insn.imm_size))
    raw[offset:offset + size] = flip_bit(bytes(raw[offset:offset + size]), rng)
    return bytes(raw)


def _instruction_change(kind: FaultKind, insn: Instruction, new: bytes, decoder: Decoder,
                        symbols: KernelSymbols, target: str) -> Change:
    return Change(kind, insn.address, symbols.locate(insn.address), insn.raw, new, target,
                  insn.text, decoder.one(new + b"\x90" * 15, insn.address))


def hang_fault(memory: KernelMemory, symbols: KernelSymbols) -> Change:
    """``jmp .`` at the entry of the idle routine: a hard lockup at the next idle."""
    for name in IDLE_ROUTINES:
        try:
            address = symbols.address(name)
        except XenpbrError:
            continue
        old = memory.read(address, len(JMP_SELF))
        return Change(FaultKind.HANG, address, symbols.locate(address), old, JMP_SELF,
                      f"entry of {name}: the next vCPU to go idle spins there with "
                      "events masked and the kernel stops without crashing",
                      before="", after="jmp .")
    raise NoTarget(f"the symbol map has none of {', '.join(IDLE_ROUTINES)}")


def choose_vcpu(vcpus: Sequence[VcpuRegisters], rng: random.Random) -> VcpuRegisters:
    """A random online vCPU that is running kernel code (its stack has live frames)."""
    in_kernel = [v for v in vcpus if v.online and v.in_kernel]
    if not in_kernel:
        raise NoTarget("no vCPU is in kernel mode now (all in user space)")
    return rng.choice(in_kernel)


__all__ = ["Change", "FaultKind", "NoTarget", "choose_vcpu", "hang_fault",
           "operand_fault", "stack_fault", "text_fault"]
