"""x86-64 instruction boundaries and operand fields, by Capstone.

A text fault must land on an instruction the CPU will decode where the compiler put it,
and an operand fault must change an operand, not the opcode: both need the instruction
stream decoded. Capstone (Debian's ``python3-capstone``, or the ``faults`` extra) reports
each instruction's length and where its ModRM byte, displacement and immediate sit;
Capstone 4.0.2 and 5 agree on those fields. It is imported only when a fault needs it,
so dom0 runs every other xenpbr command without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xenpbr.errors import XenpbrError


class DecoderMissing(XenpbrError):
    """Capstone is not installed."""


@dataclass(frozen=True)
class Instruction:
    address: int
    raw: bytes
    text: str  # "mov qword ptr [rsp + 8], rax"
    modrm_offset: int  # 0 when there is none (offset 0 is always a prefix or opcode)
    disp_offset: int
    disp_size: int
    imm_offset: int
    imm_size: int

    @property
    def operand_fields(self) -> list[str]:
        """Which operand encodings this instruction has: ``modrm``, ``disp``, ``imm``."""
        fields = []
        if self.modrm_offset:
            fields.append("modrm")
        if self.disp_offset and self.disp_size:
            fields.append("disp")
        if self.imm_offset and self.imm_size:
            fields.append("imm")
        return fields


def _capstone() -> Any:
    try:
        import capstone
    except ImportError:
        raise DecoderMissing("text and operand faults decode x86 instructions with "
                             "Capstone: apt install python3-capstone (or pip install "
                             "'xenpbr[faults]')") from None
    return capstone


class Decoder:
    """Decodes 64-bit x86 code, with the encoding details operand faults need."""

    def __init__(self) -> None:
        capstone = _capstone()
        self._cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._cs.detail = True

    def instructions(self, code: bytes, address: int) -> Iterator[Instruction]:
        """Instructions from *address* on, stopping at the first byte that is not one."""
        for insn in self._cs.disasm(code, address):
            yield Instruction(insn.address, bytes(insn.bytes),
                              f"{insn.mnemonic} {insn.op_str}".strip(),
                              insn.modrm_offset, insn.disp_offset, insn.disp_size,
                              insn.imm_offset, insn.imm_size)

    def one(self, code: bytes, address: int) -> str:
        """The text of the instruction at the start of *code* (``(bad)`` if none)."""
        for insn in self.instructions(code, address):
            return insn.text
        return "(bad)"
