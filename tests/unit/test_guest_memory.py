"""Unit tests for the PV P2M walker and GuestMemory over a synthetic machine-memory image.

The image mimics what a 64-bit Linux PV guest publishes (see xg_sr_save_x86_pv.c,
Xen 4.17): a shared_info page whose ``arch`` part (offset 3088) points at a 3-level
frame-list-list and/or a linear p2m list mapped by 4-level page tables.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from types import SimpleNamespace

import pytest

from xenpbr.ctypes_libxc._errcheck import FrameMapError
from xenpbr.ctypes_libxc.foreignmemory import ForeignMemory
from xenpbr.ctypes_libxc.xenctrl_structs import DomainFlags
from xenpbr.hypervisor.guest_memory import (
    FOREIGN_FRAME_BIT,
    IDENTITY_FRAME_BIT,
    INVALID_MFN,
    GuestMemory,
    NotPVGuest,
    P2MError,
    P2MInconsistent,
    P2MLookup,
    P2MUnavailable,
    PfnNotPresent,
    UnsupportedGuest,
    walk_p2m,
)

PAGE = 4096
ARCH = 3088  # offsetof(struct shared_info, arch) on x86_64, Xen 4.17
PTE_TABLE = 0x67  # present | rw | user | accessed | dirty
PTE_LEAF = 0x25 | (1 << 63)  # present | user | accessed, NX set (must be masked off)
P2M_VADDR_BASE = 0xFFFFC90000000000  # a Linux vmalloc address, 1 GiB aligned


class Image:
    """Machine memory: mfn -> bytearray page, handing out fresh mfns."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self._next = 0x1000
        self.reads: list[int] = []  # sizes of read_frames calls

    def alloc(self) -> int:
        self._next += 3  # not contiguous, so mfn order != pfn order
        self.pages[self._next] = bytearray(PAGE)
        return self._next

    def put_u64(self, mfn: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.pages[mfn], index * 8, value)

    def put_u64s(self, mfn: int, values) -> None:
        for index, value in enumerate(values):
            self.put_u64(mfn, index, value)

    def read_frames(self, mfns):
        self.reads.append(len(mfns))
        return [bytes(self.pages[m]) for m in mfns]


class Guest:
    """A PV guest laid out in an Image: data pages, p2m pages, shared_info."""

    def __init__(self, max_pfn: int, holes=(), identity=(), foreign=(), data_pfns=None):
        self.image = Image()
        self.max_pfn = max_pfn
        self.expected = []
        wanted = range(max_pfn) if data_pfns is None else data_pfns
        for pfn in range(max_pfn):
            if pfn in holes:
                self.expected.append(INVALID_MFN)
            elif pfn in identity:
                self.expected.append(IDENTITY_FRAME_BIT | pfn)
            elif pfn in foreign:
                self.expected.append(FOREIGN_FRAME_BIT | 0x77)
            elif pfn in wanted:
                self.expected.append(self.image.alloc())
            else:
                self.expected.append(0x500000 + pfn)  # RAM we never read
        self.leaves = []
        for start in range(0, max_pfn, 512):
            leaf = self.image.alloc()
            chunk = self.expected[start:start + 512]
            self.image.put_u64s(leaf, chunk + [INVALID_MFN] * (512 - len(chunk)))
            self.leaves.append(leaf)
        self.shinfo = self.image.alloc()
        self.set_arch(max_pfn=max_pfn)

    @property
    def normalised(self):
        return [INVALID_MFN if e & (3 << 62) else e for e in self.expected]

    def set_arch(self, **fields) -> None:
        names = ["max_pfn", "pfn_to_mfn_frame_list_list", "nmi_reason", "p2m_cr3",
                 "p2m_vaddr", "p2m_generation"]
        for name, value in fields.items():
            self.image.put_u64(self.shinfo, ARCH // 8 + names.index(name), value)

    def build_tree(self, extra_missing_fl_entries: int = 0) -> int:
        """frame list list -> frame list pages -> leaves; returns the fll mfn."""
        fl_entries = list(self.leaves)
        if extra_missing_fl_entries:  # Linux-style shared "p2m_missing" page
            missing = self.image.alloc()
            self.image.put_u64s(missing, [INVALID_MFN] * 512)
            fl_entries += [missing] * extra_missing_fl_entries
        fll = self.image.alloc()
        fl_pages = []
        for start in range(0, len(fl_entries), 512):
            fl_page = self.image.alloc()
            self.image.put_u64s(fl_page, fl_entries[start:start + 512])
            fl_pages.append(fl_page)
        self.image.put_u64s(fll, fl_pages)
        self.set_arch(pfn_to_mfn_frame_list_list=fll)
        return fll

    def build_linear(self, vaddr: int) -> int:
        """Map the leaves at vaddr through fresh 4-level page tables; returns the root."""
        root = self.image.alloc()
        for i, leaf in enumerate(self.leaves):
            table = root
            va = vaddr + i * PAGE
            for shift in (39, 30, 21):
                index = (va >> shift) & 511
                pte = struct.unpack_from("<Q", self.image.pages[table], index * 8)[0]
                if not pte & 1:
                    new = self.image.alloc()
                    pte = (new << 12) | PTE_TABLE
                    self.image.put_u64(table, index, pte)
                table = (pte & 0x000FFFFFFFFFF000) >> 12
            self.image.put_u64(table, (va >> 12) & 511, (leaf << 12) | PTE_LEAF)
        self.set_arch(p2m_cr3=root << 12, p2m_vaddr=vaddr)
        return root


# The p2m list starts at L2 index 511, L1 index 510 of a 1 GiB-aligned region, so its
# pages cross an L1-table boundary, an L2-table boundary and an L3 entry boundary.
STRADDLING_VADDR = P2M_VADDR_BASE + 511 * (1 << 21) + 510 * PAGE


# --------------------------------------------------------------------------- tree walk


def test_tree_walk_small_guest_with_holes():
    guest = Guest(1000, holes={3, 600}, identity={10}, foreign={11}, data_pfns=())
    guest.build_tree()
    table = walk_p2m(guest.image.read_frames, guest.shinfo)
    assert table.method == "tree"
    assert table.entries == guest.normalised
    assert len(table.entries) == 1000
    assert [table.entries[p] for p in (3, 10, 11, 600)] == [INVALID_MFN] * 4
    assert table.valid == 996


def test_tree_walk_two_frame_list_pages_and_shared_missing_page():
    # 512*512 + 700 entries need two fll entries; the second frame list page mostly
    # points at one shared all-invalid page, like Linux's p2m_missing.
    max_pfn = 512 * 512 + 700
    guest = Guest(max_pfn, holes=set(range(512 * 512, max_pfn)), data_pfns=())
    guest.leaves = guest.leaves[:512]  # the tail is all holes: use the shared page
    guest.build_tree(extra_missing_fl_entries=2)
    table = walk_p2m(guest.image.read_frames, guest.shinfo, batch=64)
    assert table.entries == guest.normalised
    assert max(guest.image.reads) <= 64  # leaves are read in bounded batches


def test_tree_walk_rejects_bad_frames():
    guest = Guest(100, data_pfns=())
    fll = guest.build_tree()
    fl_page = struct.unpack_from("<Q", guest.image.pages[fll])[0]
    guest.image.put_u64(fl_page, 0, 0)
    with pytest.raises(P2MError, match="bad mfn 0x0 at index 0 of the p2m frame list"):
        walk_p2m(guest.image.read_frames, guest.shinfo)


def test_walk_without_published_p2m():
    guest = Guest(100, data_pfns=())
    with pytest.raises(P2MUnavailable):
        walk_p2m(guest.image.read_frames, guest.shinfo)  # fll 0, p2m_cr3 0
    guest.build_tree()
    guest.set_arch(max_pfn=0)
    with pytest.raises(P2MUnavailable):
        walk_p2m(guest.image.read_frames, guest.shinfo)
    guest.set_arch(max_pfn=100, pfn_to_mfn_frame_list_list=INVALID_MFN)
    with pytest.raises(P2MUnavailable):
        walk_p2m(guest.image.read_frames, guest.shinfo, method="tree")


def test_tree_too_large():
    guest = Guest(10, data_pfns=())
    guest.build_tree()
    guest.set_arch(max_pfn=512 ** 3 + 1)
    with pytest.raises(P2MError, match="too large"):
        walk_p2m(guest.image.read_frames, guest.shinfo)


# --------------------------------------------------------------------------- linear walk


def test_linear_walk_crosses_page_table_boundaries_and_agrees_with_tree():
    guest = Guest(1400, holes={5}, identity={1399}, data_pfns=())  # 3 p2m pages
    guest.build_tree()
    guest.build_linear(STRADDLING_VADDR)
    linear = walk_p2m(guest.image.read_frames, guest.shinfo)  # auto prefers linear
    tree = walk_p2m(guest.image.read_frames, guest.shinfo, method="tree")
    assert linear.method == "linear" and tree.method == "tree"
    assert linear.entries == tree.entries == guest.normalised


def test_linear_walk_rejects_unmapped_and_bad_addresses():
    guest = Guest(600, data_pfns=())
    root = guest.build_linear(P2M_VADDR_BASE)
    guest.image.put_u64(root, (P2M_VADDR_BASE >> 39) & 511, 0)  # drop the L4 entry
    with pytest.raises(P2MError, match="not mapped at level 4"):
        walk_p2m(guest.image.read_frames, guest.shinfo)
    for vaddr in (0x0000800000000000, 0xFFFF800000001000, P2M_VADDR_BASE + 8):
        guest.set_arch(p2m_vaddr=vaddr)  # non-canonical, inside Xen, unaligned
        with pytest.raises(P2MError, match="bad virtual p2m address range"):
            walk_p2m(guest.image.read_frames, guest.shinfo)


def test_linear_walk_generation_checks():
    guest = Guest(600, data_pfns=())
    guest.build_linear(P2M_VADDR_BASE)
    guest.set_arch(p2m_generation=3)
    with pytest.raises(P2MInconsistent, match="odd"):
        walk_p2m(guest.image.read_frames, guest.shinfo)
    with pytest.raises(P2MInconsistent, match="odd"):
        P2MLookup(guest.image.read_frames, guest.shinfo)
    guest.set_arch(p2m_generation=4)
    lookup = P2MLookup(guest.image.read_frames, guest.shinfo)
    guest.set_arch(p2m_generation=6)  # remapped after the lookup read shared_info
    with pytest.raises(P2MInconsistent, match="changed"):
        lookup.lookup([1])
    guest.set_arch(p2m_generation=4)
    reads = 0

    def bumping_reader(mfns):
        nonlocal reads
        reads += 1
        if reads == 2:  # the guest remaps its p2m after we read shared_info
            guest.set_arch(p2m_generation=6)
        return guest.image.read_frames(mfns)

    with pytest.raises(P2MInconsistent, match="changed"):
        walk_p2m(bumping_reader, guest.shinfo)


def test_linear_method_requires_p2m_cr3():
    guest = Guest(10, data_pfns=())
    guest.build_tree()
    with pytest.raises(P2MUnavailable):
        walk_p2m(guest.image.read_frames, guest.shinfo, method="linear")
    with pytest.raises(ValueError):
        walk_p2m(guest.image.read_frames, guest.shinfo, method="bogus")


# --------------------------------------------------------------------------- GuestMemory


class FakeFmemLib:
    """libxenforeignmemory stand-in over an Image; some mfns fail with EFAULT."""

    def __init__(self, image: Image, bad=()):
        self.image = image
        self.bad = set(bad)
        self.buffers = {}
        self.map_sizes = []

    def xenforeignmemory_open(self, logger, flags):
        return "fmem"

    def xenforeignmemory_close(self, handle):
        return 0

    def xenforeignmemory_map(self, handle, domid, prot, count, arr, err):
        self.map_sizes.append(count)
        buf = ctypes.create_string_buffer(count * PAGE)
        for i in range(count):
            if arr[i] in self.bad or arr[i] not in self.image.pages:
                err[i] = -errno.EFAULT
            else:
                ctypes.memmove(ctypes.addressof(buf) + i * PAGE, bytes(self.image.pages[arr[i]]), PAGE)
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def xenforeignmemory_unmap(self, handle, address, count):
        del self.buffers[address]
        return 0


class FakeXc:
    def __init__(self, shinfo: int, hvm=False, width=8):
        # the raw xc_domaininfo_t fields GuestMemory reads (the binding decodes nothing)
        self.info = SimpleNamespace(flags=int(DomainFlags.HVM_GUEST) if hvm else 0,
                                    shared_info_frame=shinfo)
        self.width = width

    def domain_getinfo(self, domid):
        return self.info

    def domain_guest_width(self, domid):
        return self.width


MARKER = b"XENPBR-MARKER"


def make_memory(guest: Guest, bad=(), **kwargs):
    lib = FakeFmemLib(guest.image, bad)
    fmem = ForeignMemory(lib)
    return GuestMemory(FakeXc(guest.shinfo), fmem, 7, **kwargs), lib


def write(guest: Guest, pfn: int, offset: int, data: bytes) -> None:
    """Write guest-physical bytes starting at (pfn, offset), spilling into pfn+1."""
    for i, byte in enumerate(data):
        p, o = divmod(pfn * PAGE + offset + i, PAGE)
        guest.image.pages[guest.expected[p]][o] = byte


def test_guest_memory_p2m_and_map_pfns():
    guest = Guest(40, holes={9})
    guest.build_tree()
    write(guest, 3, 0, b"page-three")
    memory, lib = make_memory(guest)
    assert memory.p2m() == guest.normalised and memory.p2m_method_used == "tree"
    with memory.map_pfns([3, 4]) as mapping:
        assert bytes(mapping.memoryview[:10]) == b"page-three"
        assert mapping.frames == (guest.expected[3], guest.expected[4])
    assert memory.read_pfn(3)[:10] == b"page-three"
    with pytest.raises(PfnNotPresent, match="pfn 0x9"):
        memory.map_pfns([9])
    with pytest.raises(PfnNotPresent):
        memory.pfn_to_mfn(40)
    assert not lib.buffers


def test_guest_memory_map_error_names_pfn():
    guest = Guest(20)
    guest.build_tree()
    memory, _ = make_memory(guest, bad={guest.expected[6]})
    memory.p2m()
    with pytest.raises(FrameMapError) as info:
        memory.map_pfns([5, 6])
    assert info.value.pfn == 6 and info.value.frame == guest.expected[6]
    assert "pfn 0x6" in str(info.value)


def test_find_markers_across_pages_and_batches():
    guest = Guest(64, holes={11, 30})
    guest.build_tree()
    write(guest, 5, 100, MARKER)  # plain
    write(guest, 7, PAGE - 4, MARKER)  # straddles pfn 7 -> 8 (consecutive)
    write(guest, 10, PAGE - 4, MARKER[:4])  # pfn 11 is a hole: no match across it
    write(guest, 12, 0, MARKER[4:])
    write(guest, 15, PAGE - 6, MARKER)  # straddles 15 -> 16, a batch boundary below
    write(guest, 40, 5, MARKER)  # in an unmappable frame: skipped, no crash
    write(guest, 63, PAGE - len(MARKER), MARKER)  # last byte of guest memory
    memory, lib = make_memory(guest, bad={guest.expected[40]}, batch_pages=8)
    hits = memory.find(MARKER)
    assert hits == [(5, 100), (7, PAGE - 4), (15, PAGE - 6), (63, PAGE - len(MARKER))]
    assert max(lib.map_sizes) == 8  # bounded memory: never more than one batch mapped
    assert not lib.buffers
    assert memory.find(MARKER, limit=2) == hits[:2]


def test_find_overlapping_and_validation():
    guest = Guest(4)
    guest.build_tree()
    write(guest, 2, 0, b"aaaa")
    memory, _ = make_memory(guest)
    assert memory.find(b"aaa") == [(2, 0), (2, 1)]
    with pytest.raises(ValueError):
        memory.find(b"")
    with pytest.raises(ValueError):
        memory.find(b"x" * (PAGE + 1))


def test_find_uses_linear_p2m_when_published():
    guest = Guest(1400, holes={5})
    guest.build_linear(STRADDLING_VADDR)
    write(guest, 1300, 17, MARKER)
    memory, _ = make_memory(guest, batch_pages=300)
    assert memory.find(MARKER) == [(1300, 17)]
    assert memory.p2m_method_used == "linear"


def test_guest_memory_rejects_non_pv_and_32bit():
    guest = Guest(4)
    fmem = ForeignMemory(FakeFmemLib(guest.image))
    with pytest.raises(NotPVGuest):
        GuestMemory(FakeXc(guest.shinfo, hvm=True), fmem, 1)
    with pytest.raises(UnsupportedGuest, match="32-bit"):
        GuestMemory(FakeXc(guest.shinfo, width=4), fmem, 1)
    fmem.close()


# --------------------------------------------------------------------------- lookup


def test_lookup_agrees_with_the_whole_walk_for_every_pfn_in_any_order():
    guest = Guest(1400, holes={5, 700}, identity={1399}, foreign={12}, data_pfns=())
    guest.build_tree()
    guest.build_linear(STRADDLING_VADDR)
    pfns = [1398, 3, 700, 1024, 0, 5, 511, 512, 1400, -1, 12, 2000]
    for method in ("tree", "linear"):
        whole = walk_p2m(guest.image.read_frames, guest.shinfo, method=method).entries
        lookup = P2MLookup(guest.image.read_frames, guest.shinfo, method=method)
        assert lookup.method == method
        assert lookup.lookup(pfns) == [whole[p] if 0 <= p < 1400 else INVALID_MFN for p in pfns]
        assert lookup.lookup(range(1400)) == whole == guest.normalised


def test_mapping_a_few_pfns_reads_only_the_p2m_pages_they_need():
    # a 40-page P2M (80 MiB guest): three pfns in one P2M page need that page, the four
    # page-table levels above it and shared_info twice (the generation check), not 40
    guest = Guest(40 * 512, data_pfns={20000, 20001, 20002, 30})
    guest.build_linear(P2M_VADDR_BASE)
    write(guest, 20001, 0, b"region")
    memory, lib = make_memory(guest)
    with memory.map_pfns([20000, 20001, 20002]) as mapping:
        assert bytes(mapping.memoryview[PAGE:PAGE + 6]) == b"region"
    assert lib.map_sizes == [1, 1, 1, 1, 1, 1, 1, 3]
    assert memory.p2m_method_used == "linear"
    memory.read_pfn(20002)  # the same P2M page: kept, nothing walked again
    memory.read_pfn(30)  # another P2M page: its page-table path is walked again
    assert lib.map_sizes[8:] == [1, 1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(PfnNotPresent, match="pfn 0x5000"):
        memory.map_pfns([20000, 40 * 512])
    assert not lib.buffers


def test_lookup_checks_only_what_it_reads_but_checks_it():
    guest = Guest(3 * 512, data_pfns=())
    fll = guest.build_tree()
    fl_page = struct.unpack_from("<Q", guest.image.pages[fll])[0]
    guest.image.put_u64(fl_page, 2, 0)  # the third P2M page's frame is bad
    lookup = P2MLookup(guest.image.read_frames, guest.shinfo)
    assert lookup.lookup([0, 600]) == [guest.normalised[0], guest.normalised[600]]
    with pytest.raises(P2MError, match="bad mfn 0x0 at index 0 of the p2m frame list"):
        lookup.lookup([1100])


def test_a_restored_domain_is_read_through_its_vcpus_page_tables() -> None:
    # as Xen's restore leaves shared_info: the frame list zeroed, the linear root the
    # saved guest's (a frame this domain does not own); the vCPU's cr3 is the new root
    guest = Guest(1400, data_pfns={1300})
    root = guest.build_linear(STRADDLING_VADDR)
    guest.set_arch(p2m_cr3=0x7777 << 12, pfn_to_mfn_frame_list_list=0)
    write(guest, 1300, 0, b"after-restore")
    stale, _ = make_memory(guest)
    with pytest.raises(FrameMapError):
        stale.read_pfn(1300)
    memory, _ = make_memory(guest, p2m_root=root)
    assert memory.read_pfn(1300)[:13] == b"after-restore"
    assert memory.p2m_method_used == "linear"
