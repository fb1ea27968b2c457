"""A paused PV guest's kernel memory by *virtual* address, through its own page tables.

A 64-bit PV guest runs on the page tables it built, and Xen only lets it hold machine
frame numbers in them: ``cr3`` (``ctrlreg[3]`` of a vCPU's context) is the machine address
of the top level, and every present entry names the MFN of the next level or of the
page itself. So a kernel address resolves to an MFN by four reads, each a foreign map
of one frame, with no P2M in between. Large pages (1 GiB at level 3, 2 MiB at level 2)
are followed too, though Xen gives PV guests none unless they opt in.

Nothing here pauses the guest: the injector holds it paused around every use, so the
tables cannot change under the walk.
"""

from __future__ import annotations

import struct
from typing import Protocol

from xenpbr.errors import XenpbrError

PAGE_SIZE = 4096
PAGE_SHIFT = 12
PTE_PRESENT = 1 << 0
PTE_RW = 1 << 1
PTE_PSE = 1 << 7
PTE_FRAME = 0x000FFFFFFFFFF000  # bits 12-51
LEVELS = ((4, 39), (3, 30), (2, 21), (1, 12))
_ENTRY = struct.Struct("<Q")


class Frames(Protocol):
    """Machine frames of one domain (:class:`~xenpbr.hypervisor.guest_memory.MachineFrames`)."""

    def read(self, mfn: int) -> bytes: ...

    def write(self, mfn: int, offset: int, data: bytes) -> None: ...


class NotMapped(XenpbrError):
    """The guest has nothing mapped at a virtual address."""


def canonical(vaddr: int) -> bool:
    top = vaddr >> 47
    return 0 <= vaddr < 1 << 64 and top in (0, (1 << 17) - 1)


class KernelMemory:
    """Reads and writes of guest-virtual memory as seen through the page table at *cr3*."""

    def __init__(self, frames: Frames, cr3: int) -> None:
        self.frames = frames
        self.root = (cr3 & PTE_FRAME) >> PAGE_SHIFT

    def translate(self, vaddr: int) -> tuple[int, int]:
        """``(mfn, offset in page)`` behind *vaddr*; :class:`NotMapped` if nothing is."""
        if not canonical(vaddr):
            raise NotMapped(f"{vaddr:#x} is not a canonical x86-64 address")
        table = self.root
        for level, shift in LEVELS:
            index = (vaddr >> shift) & 0x1FF
            (entry,) = _ENTRY.unpack_from(self.frames.read(table), index * 8)
            if not entry & PTE_PRESENT:
                raise NotMapped(f"{vaddr:#x}: level-{level} entry {index} not present")
            frame = (entry & PTE_FRAME) >> PAGE_SHIFT
            if level in (3, 2) and entry & PTE_PSE:
                within = vaddr & ((1 << shift) - 1)
                return frame + (within >> PAGE_SHIFT), within & (PAGE_SIZE - 1)
            table = frame
        return table, vaddr & (PAGE_SIZE - 1)

    def read(self, vaddr: int, size: int) -> bytes:
        """*size* bytes at *vaddr*, across pages if need be."""
        out = bytearray()
        while len(out) < size:
            mfn, offset = self.translate(vaddr + len(out))
            take = min(size - len(out), PAGE_SIZE - offset)
            out += self.frames.read(mfn)[offset:offset + take]
        return bytes(out)

    def read_u64(self, vaddr: int) -> int:
        return int(_ENTRY.unpack(self.read(vaddr, 8))[0])

    def write(self, vaddr: int, data: bytes) -> None:
        """Write *data* at *vaddr* (one page at a time: a write may cross into the next)."""
        done = 0
        while done < len(data):
            mfn, offset = self.translate(vaddr + done)
            take = min(len(data) - done, PAGE_SIZE - offset)
            self.frames.write(mfn, offset, data[done:done + take])
            done += take
