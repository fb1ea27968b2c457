"""Read a PV guest's memory by guest pfn: P2M walk, pfn-range mapping, marker search.

A PV guest has no second-stage translation: its "physical" frame numbers (pfns) are the
guest's own bookkeeping, and foreign mapping from dom0 takes *machine* frames (MFNs). The
guest publishes its pfn->mfn table (the P2M) in its shared_info page, and Xen's save code
(``tools/libs/guest/xg_sr_save_x86_pv.c``, Xen 4.17: ``map_p2m``, ``map_p2m_tree``,
``map_p2m_list``) finds it in one of two ways, both implemented here:

* **tree** - ``arch.pfn_to_mfn_frame_list_list`` is the MFN of a page of MFNs ("frame
  list list", fll) of pages of MFNs ("frame list", fl) of P2M pages: 3 levels, 512
  entries per page on a 64-bit guest.
* **linear** - ``arch.p2m_cr3`` is a page-table root and ``arch.p2m_vaddr`` the virtual
  address of the P2M as one array; we walk the guest's 4-level page tables to find its
  pages. ``arch.p2m_generation`` is odd while the guest edits the mapping.

Like Xen we prefer the linear list when ``p2m_cr3`` is set. ``arch.max_pfn`` is the
number of P2M entries. An entry of ``~0`` (Linux's ``INVALID_P2M_ENTRY``) is a hole;
Linux also tags non-RAM entries with ``FOREIGN_FRAME_BIT`` (bit 63) or
``IDENTITY_FRAME_BIT`` (bit 62). All three are reported as :data:`INVALID_MFN`, which
matches the save code's effect (such entries fail its M2P check and are not saved).

The walk only needs "give me the contents of these MFNs" (:data:`ReadFrames`), so tests
feed it a synthetic memory image. Only 64-bit PV guests are supported.

It lives in :mod:`xenpbr.hypervisor` because it is a typed facility *over* two bindings
(foreignmemory for the frames, xenctrl's shared_info layout for the P2M root), the same
layer as :class:`~xenpbr.hypervisor.libxc.LibxcHypervisor` that uses it; it is its own
module because the P2M walk is independent of domain control and is tested on its own.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from xenpbr.ctypes_libxc._errcheck import FrameMapError
from xenpbr.ctypes_libxc.foreignmemory import XC_PAGE_SIZE, Mapping
from xenpbr.ctypes_libxc.xenctrl_structs import (
    ArchSharedInfoX86_64,
    DomainFlags,
    SharedInfoX86_64,
)
from xenpbr.errors import XenpbrError

log = logging.getLogger(__name__)

PAGE_SIZE = XC_PAGE_SIZE
PAGE_SHIFT = 12
GUEST_WIDTH = 8  # bytes per P2M entry / page-table entry on a 64-bit guest
FPP = PAGE_SIZE // GUEST_WIDTH  # frames (entries) per page: 512

INVALID_MFN = (1 << 64) - 1  # ~0UL: INVALID_P2M_ENTRY (Linux), INVALID_MFN (libxc)
FOREIGN_FRAME_BIT = 1 << 63  # Linux arch/x86/include/asm/xen/page.h
IDENTITY_FRAME_BIT = 1 << 62
_NOT_RAM = FOREIGN_FRAME_BIT | IDENTITY_FRAME_BIT

PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7
PTE_FRAME_MASK = 0x000FFFFFFFFFF000  # xg_sr_common_x86_pv.h: bits 12-51
HYPERVISOR_VIRT_START_X86_64 = 0xFFFF800000000000  # xg_sr_common_x86_pv.h
HYPERVISOR_VIRT_END_X86_64 = 0xFFFF87FFFFFFFFFF
_LEVEL_SHIFTS = (39, 30, 21, 12)  # L4, L3, L2, L1 index shifts

_ARCH_OFFSET = SharedInfoX86_64.arch.offset  # 3088
_PAGE_ENTRIES = struct.Struct(f"<{FPP}Q")

# Contents of the given MFNs, one PAGE_SIZE bytes object per frame, in order.
ReadFrames = Callable[[Sequence[int]], Sequence[bytes]]


class GuestMemoryError(XenpbrError):
    """Base for errors reading a guest's memory through its P2M."""


class NotPVGuest(GuestMemoryError):
    """The domain is HVM/PVH: its frames are GFNs and need no P2M walk."""


class UnsupportedGuest(GuestMemoryError):
    """The guest is not a 64-bit PV guest (32-bit PV uses different layouts)."""


class P2MError(GuestMemoryError):
    """The guest's P2M is malformed or out of range."""


class P2MUnavailable(P2MError):
    """The guest has not published a P2M (still booting, or not a Linux-like PV kernel)."""


class P2MInconsistent(P2MError):
    """The guest changed its P2M mapping while we walked it; pause it and retry."""


class PfnNotPresent(GuestMemoryError):
    """A guest pfn has no machine frame behind it (hole, identity or foreign entry)."""

    def __init__(self, domid: int, pfn: int) -> None:
        super().__init__(f"pfn {pfn:#x} of domain {domid} has no RAM behind it in the P2M")
        self.domid = domid
        self.pfn = pfn


@dataclass(frozen=True)
class P2MTable:
    """A walked P2M: ``entries[pfn]`` is the MFN or :data:`INVALID_MFN`."""

    entries: list[int]
    method: str  # "tree" or "linear"

    @property
    def valid(self) -> int:
        return sum(1 for mfn in self.entries if mfn != INVALID_MFN)


def _entries(page: bytes) -> tuple[int, ...]:
    return _PAGE_ENTRIES.unpack_from(page)


def _normalise(entry: int) -> int:
    """Map holes and non-RAM entries to :data:`INVALID_MFN`."""
    return INVALID_MFN if entry == INVALID_MFN or entry & _NOT_RAM else entry


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read_batched(read_frames: ReadFrames, mfns: Sequence[int], batch: int) -> Iterator[bytes]:
    for chunk in _chunks(mfns, batch):
        yield from read_frames(chunk)


def read_arch_shared_info(read_frames: ReadFrames, shared_info_mfn: int) -> ArchSharedInfoX86_64:
    """The ``arch`` part of the guest's shared_info page."""
    page = read_frames([shared_info_mfn])[0]
    return ArchSharedInfoX86_64.from_buffer_copy(page, _ARCH_OFFSET)


def _check_frames(mfns: Iterable[int], what: str) -> None:
    for index, mfn in enumerate(mfns):
        if mfn == 0 or mfn == INVALID_MFN or mfn & _NOT_RAM:
            raise P2MError(f"bad mfn {mfn:#x} at index {index} of the p2m {what}")


def _read_leaves(read_frames: ReadFrames, leaves: Sequence[int], count: int, batch: int) -> list[int]:
    """Decode *count* P2M entries from the P2M pages *leaves*, *batch* pages at a time."""
    out: list[int] = []
    for page in _read_batched(read_frames, leaves, batch):
        out.extend(map(_normalise, _entries(page)))
    del out[count:]
    return out


def _p2m_frames(max_pfn: int) -> int:
    if max_pfn <= 0:
        raise P2MUnavailable("shared_info.arch.max_pfn is 0: the guest has not published a p2m")
    return (max_pfn - 1) // FPP + 1


def _frame_list_list(read_frames: ReadFrames, arch: ArchSharedInfoX86_64) -> tuple[int, ...]:
    """The tree's top page: the MFNs of the frame-list pages the P2M needs (unchecked)."""
    fll_mfn = arch.pfn_to_mfn_frame_list_list
    if fll_mfn in (0, INVALID_MFN):
        raise P2MUnavailable(f"no p2m frame list list (pfn_to_mfn_frame_list_list={fll_mfn:#x})")
    fll_entries = (_p2m_frames(arch.max_pfn) - 1) // FPP + 1
    if fll_entries > FPP:
        raise P2MError(f"max_pfn {arch.max_pfn:#x} too large for the p2m tree")
    return _entries(read_frames([fll_mfn])[0])[:fll_entries]


def walk_tree(read_frames: ReadFrames, arch: ArchSharedInfoX86_64, batch: int = 256) -> list[int]:
    """Walk the 3-level frame-list-list P2M (``map_p2m_tree``)."""
    fll = _frame_list_list(read_frames, arch)
    fl_entries = _p2m_frames(arch.max_pfn)
    _check_frames(fll, "frame list list")
    fl: list[int] = []
    for page in _read_batched(read_frames, fll, batch):
        fl.extend(_entries(page))
    del fl[fl_entries:]
    _check_frames(fl, "frame list")
    return _read_leaves(read_frames, fl, arch.max_pfn, batch)


def _canonical(vaddr: int) -> bool:
    top = vaddr >> 47
    return top == 0 or top == (1 << 17) - 1


def _check_p2m_range(start: int, end: int) -> None:
    if (
        start % PAGE_SIZE
        or not (_canonical(start) and _canonical(end))
        or end < start
        or end >= 1 << 64
        or (start <= HYPERVISOR_VIRT_END_X86_64 and end > HYPERVISOR_VIRT_START_X86_64)
    ):
        raise P2MError(f"bad virtual p2m address range {start:#x}-{end:#x}")


def _pte_frame(pte: int, vaddr: int, shift: int) -> int:
    level = (shift - 3) // 9
    if not pte & PTE_PRESENT:
        raise P2MError(f"p2m vaddr {vaddr:#x} not mapped at level {level} (pte {pte:#x})")
    if shift in (30, 21) and pte & PTE_PSE:
        raise P2MError(f"p2m vaddr {vaddr:#x} uses a superpage at level {level}")
    frame = (pte & PTE_FRAME_MASK) >> PAGE_SHIFT
    if frame == 0:
        raise P2MError(f"p2m vaddr {vaddr:#x}: frame 0 at level {level}")
    return frame


def _walk_level(read_frames: ReadFrames, tables: list[int], vaddrs: Sequence[int], shift: int,
                batch: int) -> list[int]:
    """For each P2M page at ``vaddrs[i]``, follow its entry in page table ``tables[i]``."""
    distinct = list(dict.fromkeys(tables))
    pages = dict(zip(distinct, _read_batched(read_frames, distinct, batch)))
    out = []
    for table, va in zip(tables, vaddrs):
        (pte,) = struct.unpack_from("<Q", pages[table], ((va >> shift) & (FPP - 1)) * 8)
        out.append(_pte_frame(pte, va, shift))
    return out


def _linear_leaves(read_frames: ReadFrames, arch: ArchSharedInfoX86_64, indices: Sequence[int],
                   batch: int) -> list[int]:
    """The MFNs of P2M pages ``indices`` of the linear list, through the guest's page
    tables (every level's distinct tables read once)."""
    vaddrs = [arch.p2m_vaddr + index * PAGE_SIZE for index in indices]
    tables = [arch.p2m_cr3 >> PAGE_SHIFT] * len(indices)  # xen_cr3_to_pfn for 64-bit
    _check_frames(tables[:1], "cr3")
    for shift in _LEVEL_SHIFTS:
        tables = _walk_level(read_frames, tables, vaddrs, shift, batch)
    return tables


def _check_linear(arch: ArchSharedInfoX86_64) -> int:
    """Check the linear list's published range and generation; returns its page count."""
    nr_frames = _p2m_frames(arch.max_pfn)
    _check_p2m_range(arch.p2m_vaddr, arch.p2m_vaddr + nr_frames * PAGE_SIZE - 1)
    if arch.p2m_generation & 1:
        raise P2MInconsistent("guest is updating its p2m mapping (odd p2m_generation)")
    return nr_frames


def walk_linear(read_frames: ReadFrames, arch: ArchSharedInfoX86_64, batch: int = 256) -> list[int]:
    """Walk the linear P2M list through the guest's page tables (``map_p2m_list``)."""
    nr_frames = _check_linear(arch)
    leaves = _linear_leaves(read_frames, arch, range(nr_frames), batch)
    return _read_leaves(read_frames, leaves, arch.max_pfn, batch)


def _choose_method(arch: ArchSharedInfoX86_64, method: str) -> str:
    """Resolve "auto" as Xen does (the linear list when ``p2m_cr3`` is set)."""
    if method == "auto":
        method = "linear" if arch.p2m_cr3 else "tree"
    if method not in ("tree", "linear"):
        raise ValueError(f"unknown p2m method {method!r}")
    if method == "linear" and not arch.p2m_cr3:
        raise P2MUnavailable("guest has no linear p2m list (p2m_cr3 is 0)")
    return method


def _check_generation(read_frames: ReadFrames, shared_info_mfn: int, before: int) -> None:
    """A changed generation count means the guest remapped its P2M under us."""
    if read_arch_shared_info(read_frames, shared_info_mfn).p2m_generation != before:
        raise P2MInconsistent("p2m_generation changed during the walk; pause the guest")


def _published_arch(read_frames: ReadFrames, shared_info_mfn: int, method: str,
                    p2m_root: int | None) -> tuple[ArchSharedInfoX86_64, str]:
    """shared_info's P2M roots and the method to walk them; with ``p2m_root`` (an MFN)
    the linear list is walked from that page table instead (see :class:`GuestMemory`)."""
    arch = read_arch_shared_info(read_frames, shared_info_mfn)
    if p2m_root is not None:
        arch.p2m_cr3, method = p2m_root << PAGE_SHIFT, "linear"
    return arch, _choose_method(arch, method)


def walk_p2m(read_frames: ReadFrames, shared_info_mfn: int, method: str = "auto",
             batch: int = 256, p2m_root: int | None = None) -> P2MTable:
    """Find and read a 64-bit PV guest's whole P2M; *method* is "auto", "tree" or "linear".

    For the linear list the generation count is re-read afterwards: a change means the
    guest remapped its P2M under us and the answer cannot be trusted.
    """
    arch, method = _published_arch(read_frames, shared_info_mfn, method, p2m_root)
    if method == "tree":
        return P2MTable(walk_tree(read_frames, arch, batch), "tree")
    entries = walk_linear(read_frames, arch, batch)
    _check_generation(read_frames, shared_info_mfn, arch.p2m_generation)
    return P2MTable(entries, "linear")


class P2MLookup:
    """A guest's P2M read only where asked: the P2M pages holding the pfns looked up, and
    the page-table or frame-list pages above them, each read once and kept.

    Why: resurrection reads a few MiB of a crashed guest, and walking the whole P2M first
    costs time that grows with the guest (870 P2M pages decoded at 1.7 GB) on the
    recovery's critical path. A lookup reads the same structures as :func:`walk_p2m`
    and checks them the same way, but only those the pfns need.
    """

    def __init__(self, read_frames: ReadFrames, shared_info_mfn: int, method: str = "auto",
                 batch: int = 256, p2m_root: int | None = None) -> None:
        self._read_frames, self._shared_info_mfn, self._batch = read_frames, shared_info_mfn, batch
        self.arch, self.method = _published_arch(read_frames, shared_info_mfn, method,
                                                 p2m_root)
        self.max_pfn = self.arch.max_pfn
        self._frame_lists: dict[int, tuple[int, ...]] = {}  # tree: fll index -> fl page
        if self.method == "linear":
            _check_linear(self.arch)
        else:
            self._fll = _frame_list_list(read_frames, self.arch)
        self._leaves: dict[int, list[int]] = {}  # P2M page index -> its entries

    def _tree_leaves(self, indices: Sequence[int]) -> list[int]:
        wanted = sorted({index // FPP for index in indices} - self._frame_lists.keys())
        mfns = [self._fll[i] for i in wanted]
        _check_frames(mfns, "frame list list")
        self._frame_lists.update(zip(wanted, map(_entries, _read_batched(
            self._read_frames, mfns, self._batch))))
        leaves = [self._frame_lists[index // FPP][index % FPP] for index in indices]
        _check_frames(leaves, "frame list")
        return leaves

    def _load(self, indices: list[int]) -> None:
        if self.method == "tree":
            leaves = self._tree_leaves(indices)
        else:
            leaves = _linear_leaves(self._read_frames, self.arch, indices, self._batch)
        pages = list(_read_batched(self._read_frames, leaves, self._batch))
        if self.method == "linear":
            _check_generation(self._read_frames, self._shared_info_mfn,
                              self.arch.p2m_generation)
        for index, page in zip(indices, pages):
            self._leaves[index] = list(map(_normalise, _entries(page)))

    def lookup(self, pfns: Sequence[int]) -> list[int]:
        """The MFN behind each pfn, or :data:`INVALID_MFN` (holes, non-RAM, out of range)."""
        inside = [pfn for pfn in pfns if 0 <= pfn < self.max_pfn]
        missing = sorted({pfn // FPP for pfn in inside} - self._leaves.keys())
        if missing:
            self._load(missing)
        return [self._leaves[pfn // FPP][pfn % FPP] if 0 <= pfn < self.max_pfn
                else INVALID_MFN for pfn in pfns]


def _find_all(data: bytes, marker: bytes) -> Iterator[int]:
    pos = data.find(marker)
    while pos >= 0:
        yield pos
        pos = data.find(marker, pos + 1)


def _runs(pfns: Sequence[int], pages: Sequence[bytes | None]) -> Iterator[tuple[int, bytes]]:
    """Group readable pages of consecutive pfns into (first pfn, joined bytes)."""
    run: list[bytes] = []
    first = prev = -1
    for pfn, page in zip(pfns, pages):
        if run and (page is None or pfn != prev + 1):
            yield first, b"".join(run)
            run = []
        if page is not None:
            if not run:
                first = pfn
            run.append(page)
        prev = pfn
    if run:
        yield first, b"".join(run)


class _Scanner:
    """Marker search over pages in guest-physical order, matching across page edges."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.hits: list[tuple[int, int]] = []
        self._tail = b""
        self._tail_end = -1  # guest-physical address just after the carried tail

    def feed(self, first_pfn: int, data: bytes) -> None:
        base = first_pfn * PAGE_SIZE
        if base == self._tail_end and self._tail:
            data = self._tail + data
            base -= len(self._tail)
        for pos in _find_all(data, self.marker):
            self.hits.append(divmod(base + pos, PAGE_SIZE))
        keep = len(self.marker) - 1
        self._tail = data[len(data) - keep:] if keep else b""
        self._tail_end = base + len(data)


class GuestMemory:
    """Guest-pfn view of a running 64-bit PV domain's memory.

    *xc* is a :class:`~xenpbr.ctypes_libxc.xenctrl.XenCtrl` (or anything with
    ``domain_getinfo``, answering the raw ``xc_domaininfo_t``, and ``domain_guest_width``)
    and *fmem* a
    :class:`~xenpbr.ctypes_libxc.foreignmemory.ForeignMemory` (or anything with its
    ``map``). Pause the domain around anything that must be consistent: nothing here does.
    """

    def __init__(self, xc: Any, fmem: Any, domid: int, *, batch_pages: int = 256,
                 p2m_method: str = "auto", p2m_root: int | None = None) -> None:
        info = xc.domain_getinfo(domid)
        if info.flags & DomainFlags.HVM_GUEST:
            raise NotPVGuest(f"domain {domid} is HVM/PVH: map its GFNs directly")
        width = xc.domain_guest_width(domid)
        if width != GUEST_WIDTH:
            raise UnsupportedGuest(f"domain {domid} is a {width * 8}-bit PV guest; "
                                   "only 64-bit PV guests are supported")
        if batch_pages < 1:
            raise ValueError("batch_pages must be positive")
        self.domid = domid
        self.shared_info_mfn = info.shared_info_frame
        self.batch_pages = batch_pages
        self.p2m_method = p2m_method
        self.p2m_method_used: str | None = None
        self._fmem = fmem
        self._table: list[int] | None = None
        self._lookup: P2MLookup | None = None
        # a page-table root (MFN) to walk the linear P2M from instead of shared_info's:
        # a domain restored and not yet run has the *saved* guest's there (Xen's restore
        # copies shared_info's arch part and zeroes the frame list), its vCPU's cr3 is new
        self.p2m_root = p2m_root

    def _read_frames(self, mfns: Sequence[int]) -> list[bytes]:
        with self._fmem.map(self.domid, mfns) as mapping:
            view = mapping.memoryview
            return [bytes(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(len(mfns))]

    def _read_frames_partial(self, mfns: Sequence[int]) -> list[bytes | None]:
        """Like ``_read_frames`` but unmappable frames come back as None (never touched)."""
        with self._fmem.map(self.domid, mfns, partial=True) as mapping:
            view = mapping.memoryview
            return [None if i in mapping.errors else bytes(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                    for i in range(len(mfns))]

    def p2m(self) -> list[int]:
        """Walk the P2M now; ``result[pfn]`` is the MFN or :data:`INVALID_MFN`.

        The result is also kept for :meth:`map_pfns` and :meth:`find`, which only walk
        when nothing is kept yet; call this again after the guest may have changed it.
        """
        table = walk_p2m(self._read_frames, self.shared_info_mfn, self.p2m_method,
                         self.batch_pages, self.p2m_root)
        self._table, self.p2m_method_used = table.entries, table.method
        log.debug("domain %d p2m: %d entries via %s", self.domid, len(table.entries), table.method)
        return table.entries

    def _p2m(self) -> list[int]:
        return self._table if self._table is not None else self.p2m()

    def pfns_to_mfns(self, pfns: Sequence[int]) -> list[int]:
        """The MFNs behind *pfns*; :class:`PfnNotPresent` names the first hole or non-RAM.

        Uses the whole table when :meth:`p2m` walked it; otherwise reads only the P2M
        pages these pfns need (:class:`P2MLookup`, kept for the next call).
        """
        if self._table is not None:
            table = self._table
            mfns = [table[pfn] if 0 <= pfn < len(table) else INVALID_MFN for pfn in pfns]
        else:
            if self._lookup is None:
                self._lookup = P2MLookup(self._read_frames, self.shared_info_mfn,
                                         self.p2m_method, self.batch_pages, self.p2m_root)
                self.p2m_method_used = self._lookup.method
            mfns = self._lookup.lookup(pfns)
        for pfn, mfn in zip(pfns, mfns):
            if mfn == INVALID_MFN:
                raise PfnNotPresent(self.domid, pfn)
        return mfns

    def pfn_to_mfn(self, pfn: int) -> int:
        """The MFN behind *pfn*; :class:`PfnNotPresent` for holes and non-RAM."""
        return self.pfns_to_mfns([pfn])[0]

    def map_pfns(self, pfns: Sequence[int], writable: bool = False) -> Mapping:
        """Map guest pfns (in the given order) contiguously; use as a context manager."""
        mfns = self.pfns_to_mfns(pfns)
        try:
            return self._fmem.map(self.domid, mfns, writable)
        except FrameMapError as exc:
            if exc.index is None:
                raise
            raise FrameMapError(self.domid, exc.frame, cast(int, exc.errno), index=exc.index,
                                failed=exc.failed, pfn=pfns[exc.index]) from exc

    def read_pfn(self, pfn: int) -> bytes:
        """A copy of one guest page."""
        with self.map_pfns([pfn]) as mapping:
            return bytes(mapping.memoryview)

    def _valid_pfns(self) -> Iterator[int]:
        return (pfn for pfn, mfn in enumerate(self._p2m()) if mfn != INVALID_MFN)

    def _batches(self) -> Iterator[tuple[list[int], list[bytes | None]]]:
        table = self._p2m()
        batch: list[int] = []
        for pfn in self._valid_pfns():
            batch.append(pfn)
            if len(batch) == self.batch_pages:
                yield batch, self._read_frames_partial([table[p] for p in batch])
                batch = []
        if batch:
            yield batch, self._read_frames_partial([table[p] for p in batch])

    def find(self, marker: bytes, limit: int | None = None) -> list[tuple[int, int]]:
        """All (pfn, offset) where *marker* starts, scanning ``batch_pages`` at a time.

        Matches that straddle two pages are found when the pages are pfn-consecutive
        (guest-physically contiguous). Frames that cannot be mapped are skipped and
        counted in the log. Memory use is bounded by the batch size, not guest size.
        """
        if not 0 < len(marker) <= PAGE_SIZE:
            raise ValueError(f"marker must be 1..{PAGE_SIZE} bytes")
        scanner = _Scanner(bytes(marker))
        scanned = skipped = 0
        for pfns, pages in self._batches():
            scanned += len(pfns)
            skipped += sum(page is None for page in pages)
            for first_pfn, data in _runs(pfns, pages):
                scanner.feed(first_pfn, data)
            if limit is not None and len(scanner.hits) >= limit:
                break
        log.info("domain %d: scanned %d pages (%d unmappable), %d hit(s)",
                 self.domid, scanned, skipped, len(scanner.hits))
        return scanner.hits[:limit] if limit is not None else scanner.hits


class MachineFrames:
    """One PV domain's frames by *machine* frame number, read and written one page at a
    time: what a walk of the guest's own page tables needs (a PV guest's page-table
    entries hold MFNs, so its kernel's virtual addresses resolve to MFNs, not pfns).

    Each call maps and unmaps its frame: a fault injector touches a handful of pages
    and must never leave a writable mapping of a guest behind.
    """

    def __init__(self, fmem: Any, domid: int) -> None:
        self._fmem = fmem
        self.domid = domid

    def read(self, mfn: int) -> bytes:
        """A copy of machine frame *mfn* of the domain (:class:`FrameMapError` if it is
        not the domain's)."""
        with self._fmem.map(self.domid, [mfn]) as mapping:
            return bytes(mapping.memoryview)

    def write(self, mfn: int, offset: int, data: bytes) -> None:
        """Write *data* at *offset* of machine frame *mfn* (must fit in the page)."""
        if offset < 0 or offset + len(data) > PAGE_SIZE:
            raise ValueError(f"write of {len(data)} bytes at offset {offset} does not fit "
                             f"in one {PAGE_SIZE}-byte page")
        with self._fmem.map(self.domid, [mfn], True) as mapping:
            mapping.memoryview[offset:offset + len(data)] = data
