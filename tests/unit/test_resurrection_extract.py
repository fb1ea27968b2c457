"""Extraction (xenpbr.resurrection.extract) over synthetic guest memory.

The fake memory holds regions encoded by the format's own encoder; the hostile cases are
the issue's: pfns outside the guest, huge regions, overlapping regions, a directory that
points at itself, thousands of registrations, a region that changes while read.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpbr.guestproto.resurrection import (
    PAGE_SIZE,
    encode_record,
    encode_region,
    encode_registration,
    REASONS,
)
from xenpbr.ctypes_libxc._errcheck import FrameMapError
from xenpbr.hypervisor.guest_memory import PfnNotPresent
from xenpbr.resurrection.extract import (
    FramesUnreadable,
    GuestMemoryFrames,
    extract,
    read_registrations,
)
from xenpbr.resurrection.model import Caps, Registration
from xenpbr.xenstore.fake import FakeXenstoreServer

DOMID = 7


class FakeMemory:
    """A guest's pages by pfn; reading a pfn it does not hold raises PfnNotPresent."""

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.reads: list[int] = []
        self.after_read: dict[int, bytes] = {}  # pfn -> what it becomes once read

    def place(self, pfns: Sequence[int], pages: Sequence[bytes]) -> None:
        self.pages.update(zip(pfns, pages))

    def read_pfns(self, pfns: Sequence[int]) -> list[bytes]:
        out = []
        for pfn in pfns:
            if pfn not in self.pages:
                raise PfnNotPresent(DOMID, pfn)
            out.append(self.pages[pfn])
            self.reads.append(pfn)
            if pfn in self.after_read:
                self.pages[pfn] = self.after_read.pop(pfn)
        return out


def region(memory: FakeMemory, app: str, pfns: Sequence[int], records: dict[int, bytes],
           generation: int = 1, slot_size: int = 256) -> bytes:
    """Place a region in memory; return its registration value."""
    pages = encode_region(app, generation, pfns, slot_size, records)
    memory.place(pfns, pages)
    ndir = -(-len(pfns) // 512)
    dirs = tuple(pfns[1:1 + ndir])
    return encode_registration(Registration(app, generation, len(pfns), pfns[0],
                                            dirs)).encode()


def puts(*items: tuple[int, bytes, bytes]) -> dict[int, bytes]:
    return {slot: encode_record(seq, key, value) for slot, (seq, key, value) in
            enumerate(items)}


def by_app(result):
    return {a.app: a for a in result.apps}


def test_two_regions_come_back_with_their_winning_records() -> None:
    mem = FakeMemory()
    regs = {"kv": region(mem, "kv", [10, 11, 12, 13], puts((1, b"a", b"1"), (2, b"a", b"2"),
                                                           (3, b"b", b"3"))),
            "log": region(mem, "log", [20, 21, 22], puts((5, b"x", b"y")))}
    result = extract(mem, regs, Caps(), domid=DOMID)
    apps = by_app(result)
    assert [(r.key, r.value) for r in apps["kv"].records] == [(b"a", b"2"), (b"b", b"3")]
    assert [(r.key, r.value) for r in apps["log"].records] == [(b"x", b"y")]
    assert all(a.kept for a in result.apps) and not result.refused
    assert apps["kv"].bytes_read == 4 * PAGE_SIZE + 2 * PAGE_SIZE  # + the re-read


def test_a_pfn_outside_the_guest_refuses_that_region_only() -> None:
    mem = FakeMemory()
    good = region(mem, "good", [10, 11, 12], puts((1, b"k", b"v")))
    bad = region(mem, "bad", [20, 21, 22, 23], puts((1, b"k", b"v")))
    del mem.pages[23]
    apps = by_app(extract(mem, {"good": good, "bad": bad}, Caps(), domid=DOMID))
    assert [r.reason for r in apps["bad"].rejections] == ["pfn"] and not apps["bad"].kept
    assert apps["good"].records and apps["good"].kept


def test_a_registration_naming_foreign_frames_is_refused_before_reading_more() -> None:
    mem = FakeMemory()
    raw = encode_registration(Registration("kv", 1, 3, 999, (998,))).encode()
    result = extract(mem, {"kv": raw}, Caps(), domid=DOMID)
    assert [r.reason for r in result.apps[0].rejections] == ["pfn"]
    assert mem.reads == []


def test_a_huge_region_is_refused_by_the_byte_cap_without_reading_it() -> None:
    mem = FakeMemory()
    pfns = list(range(1000, 1000 + 4096))
    raw = region(mem, "big", pfns, {})
    result = extract(mem, {"big": raw}, Caps(bytes=1 << 20), domid=DOMID)
    assert [r.reason for r in result.apps[0].rejections] == ["cap-bytes"]
    assert len(mem.reads) < 16
    assert result.apps[0].bytes_read <= 1 << 20


def test_a_huge_region_leaves_the_byte_cap_to_the_regions_after_it() -> None:
    mem = FakeMemory()
    huge = region(mem, "a-huge", list(range(1000, 1000 + 4096)), {})
    small = region(mem, "b-small", [10, 11, 12], puts((1, b"k", b"v")))
    result = extract(mem, {"a-huge": huge, "b-small": small}, Caps(bytes=1 << 20),
                     domid=DOMID)
    apps = by_app(result)
    assert [r.reason for r in apps["a-huge"].rejections] == ["cap-bytes"]
    assert apps["a-huge"].bytes_read == 0 and apps["b-small"].kept
    assert [r.key for r in apps["b-small"].records] == [b"k"]


def test_a_page_count_beyond_the_format_is_a_bad_registration() -> None:
    result = extract(FakeMemory(), {"kv": b"1 1 1000000 5 6"}, Caps(), domid=DOMID)
    assert [r.reason for r in result.refused] == ["registration"] and not result.apps


def test_overlapping_regions_refuse_the_second() -> None:
    mem = FakeMemory()
    first = region(mem, "a", [10, 11, 12, 13], puts((1, b"k", b"v")))
    # b's record area claims pfn 13, a page of a's record area
    pages = encode_region("b", 1, [20, 21, 13], 256, {})
    mem.place([20, 21], pages[:2])
    second = encode_registration(Registration("b", 1, 3, 20, (21,))).encode()
    apps = by_app(extract(mem, {"a": first, "b": second}, Caps(), domid=DOMID))
    assert apps["a"].kept and [r.reason for r in apps["b"].rejections] == ["overlap"]


def test_another_regions_frames_are_an_overlap_even_when_the_cap_is_spent() -> None:
    mem = FakeMemory()
    raw = region(mem, "a", [10, 11, 12], puts((1, b"k", b"v")))
    apps = by_app(extract(mem, {"a": raw, "b": raw}, Caps(bytes=5 * 4096), domid=DOMID))
    assert apps["a"].kept
    assert [r.reason for r in apps["b"].rejections] == ["overlap"]


def test_a_region_registered_twice_under_two_names_is_refused_the_second_time() -> None:
    mem = FakeMemory()
    raw = region(mem, "a", [10, 11, 12], puts((1, b"k", b"v")))
    apps = by_app(extract(mem, {"a": raw, "b": raw}, Caps(), domid=DOMID))
    assert apps["a"].kept
    assert apps["b"].rejections[0].reason == "overlap"


def test_a_directory_pointing_at_itself_is_refused() -> None:
    mem = FakeMemory()
    pages = encode_region("kv", 1, [10, 11, 11, 11], 256, {})  # record area = the directory
    mem.place([10, 11], pages[:2])
    raw = encode_registration(Registration("kv", 1, 4, 10, (11,))).encode()
    apps = by_app(extract(mem, {"kv": raw}, Caps(), domid=DOMID))
    assert [r.reason for r in apps["kv"].rejections] == ["overlap"]


def test_a_directory_that_disagrees_with_the_registration_is_refused() -> None:
    mem = FakeMemory()
    pages = encode_region("kv", 1, [10, 12, 13], 256, {})
    mem.place([10, 11, 12, 13], [pages[0], pages[1], pages[1], pages[2]])
    raw = encode_registration(Registration("kv", 1, 3, 10, (11,))).encode()
    apps = by_app(extract(mem, {"kv": raw}, Caps(), domid=DOMID))
    assert [r.reason for r in apps["kv"].rejections] == ["directory"]


def test_thousands_of_registrations_are_bounded_by_the_region_cap() -> None:
    mem = FakeMemory()
    regs = {f"app{i:05}": region(mem, f"app{i:05}", [3 * i + 10, 3 * i + 11, 3 * i + 12],
                                 puts((1, b"k", b"v"))) for i in range(5000)}
    result = extract(mem, regs, Caps(regions=8), domid=DOMID)
    assert len(result.apps) == 8 and all(a.kept for a in result.apps)
    assert len(result.refused) == 4992
    assert {r.reason for r in result.refused} == {"cap-regions"}
    assert len(mem.reads) == 8 * 5


def test_the_time_cap_is_checked_between_reads_and_never_raises() -> None:
    mem = FakeMemory()
    regs = {f"a{i}": region(mem, f"a{i}", [10 * i + 10, 10 * i + 11, 10 * i + 12], {})
            for i in range(4)}
    ticks = iter(range(0, 1000))
    result = extract(mem, regs, Caps(seconds=6), domid=DOMID, clock=lambda: next(ticks))
    assert result.timed_out
    reasons = [r.reason for a in result.apps for r in a.rejections] + [
        r.reason for r in result.refused]
    assert "timeout" in reasons
    assert any(a.kept for a in result.apps)


def test_the_default_time_cap_leaves_a_starved_dom0_time_to_read_a_region() -> None:
    # the LKDTM campaign lost an application's keys twice to a 2 s default on a busy dom0
    mem = FakeMemory()
    regs = {"kv": region(mem, "kv", [10, 11, 12, 13], puts((1, b"k", b"v")))}
    ticks = iter(range(0, 1000))  # one second per look at the clock
    result = extract(mem, regs, Caps(), domid=DOMID, clock=lambda: next(ticks))
    assert not result.timed_out
    assert [r.key for r in by_app(result)["kv"].records] == [b"k"]


def test_a_region_changed_mid_read_is_refused() -> None:
    mem = FakeMemory()
    raw = region(mem, "kv", [10, 11, 12], puts((1, b"k", b"v")))
    mem.after_read[10] = encode_region("kv", 1, [10, 11, 12], 128, {})[0]
    apps = by_app(extract(mem, {"kv": raw}, Caps(), domid=DOMID))
    assert [r.reason for r in apps["kv"].rejections] == ["changed"]
    assert apps["kv"].records == []


def test_a_registration_that_disagrees_with_its_header_is_a_mismatch() -> None:
    mem = FakeMemory()
    region(mem, "kv", [10, 11, 12], {}, generation=4)
    raw = encode_registration(Registration("kv", 5, 3, 10, (11,))).encode()
    apps = by_app(extract(mem, {"kv": raw}, Caps(), domid=DOMID))
    assert [r.reason for r in apps["kv"].rejections] == ["mismatch"]


def test_a_corrupt_record_is_rejected_and_the_rest_kept() -> None:
    mem = FakeMemory()
    raw = region(mem, "kv", [10, 11, 12], puts((1, b"a", b"1"), (2, b"b", b"2")))
    page = bytearray(mem.pages[12])
    page[24] ^= 0x40  # the key of slot 0
    mem.pages[12] = bytes(page)
    app = extract(mem, {"kv": raw}, Caps(), domid=DOMID).apps[0]
    assert app.kept and [(r.key, r.value) for r in app.records] == [(b"b", b"2")]
    assert [(r.reason, r.slot, r.seq) for r in app.rejections] == [("crc", 0, 1)]


@pytest.mark.parametrize("name", ["UPPER", "../x", "", "a" * 40])
def test_bad_application_names_are_refused(name: str) -> None:
    result = extract(FakeMemory(), {name: b"1 1 3 10 11"}, Caps(), domid=DOMID)
    assert [r.reason for r in result.refused] == ["registration"]


def test_read_registrations_is_bounded() -> None:
    server = FakeXenstoreServer()
    server.create_domain(DOMID)
    xs = server.connect(0)
    base = f"/local/domain/{DOMID}/data/xenpbr/resurrect"
    for i in range(12):
        xs.write(f"{base}/app{i:02}", f"1 1 3 {i} {i + 100}")
    found = read_registrations(xs, DOMID, limit=10)
    assert sorted(found) == [f"app{i:02}" for i in range(10)]
    assert found["app03"] == b"1 1 3 3 103"
    (refused,) = found.refused  # one refusal however many there are
    assert (refused.app, refused.reason) == ("2-more", "too-many")
    assert "2 registrations past the first 10 (from 'app10')" in refused.detail
    result = extract(FakeMemory(), found, Caps(regions=10), domid=DOMID)
    assert {r.reason for r in result.refused} == {"too-many"}
    assert read_registrations(xs, DOMID + 1, limit=10) == {}


def test_every_reason_extraction_gives_is_a_documented_token() -> None:
    for token in ("pfn", "overlap", "changed", "mismatch", "cap-bytes", "cap-regions",
                  "timeout", "too-many"):
        assert token in REASONS


def test_guest_memory_frames_maps_the_pfns_in_one_batch() -> None:
    class Mapping:
        def __init__(self, data: bytes) -> None:
            self.memoryview = memoryview(data)

        def __enter__(self) -> "Mapping":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    class Memory:
        calls: list[list[int]] = []

        def map_pfns(self, pfns: Sequence[int], writable: bool = False) -> Mapping:
            self.calls.append(list(pfns))
            return Mapping(b"".join(bytes([p]) * PAGE_SIZE for p in pfns))

    memory = Memory()
    frames = GuestMemoryFrames(memory)  # type: ignore[arg-type]
    assert frames.read_pfns([3, 1]) == [b"\3" * PAGE_SIZE, b"\1" * PAGE_SIZE]
    assert frames.read_pfns([]) == [] and memory.calls == [[3, 1]]


def test_a_frame_xen_refuses_to_map_is_a_pfn_rejection_not_a_crash() -> None:
    class Refusing:
        domid = DOMID

        def map_pfns(self, pfns: Sequence[int], writable: bool = False) -> object:
            raise FrameMapError(DOMID, 0x1234, errno.EPERM, index=0, failed=1, pfn=pfns[0])

    raw = encode_registration(Registration("kv", 1, 3, 10, (11,))).encode()
    frames = GuestMemoryFrames(Refusing())  # type: ignore[arg-type]
    with pytest.raises(FramesUnreadable):
        frames.read_pfns([10])
    result = extract(frames, {"kv": raw}, Caps(), domid=DOMID)
    assert [r.reason for r in result.apps[0].rejections] == ["pfn"]


HISTORY = [(seq, b"k%d" % (seq % 7), b"value %d" % seq) for seq in range(1, 40)]


def history_region(mem: FakeMemory) -> bytes:
    pfns = [50, 51, 52, 53]
    return region(mem, "kv", pfns, {i: encode_record(s, k, v) for i, (s, k, v) in
                                    enumerate(HISTORY)}, slot_size=64)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, PAGE_SIZE - 1),
                          st.integers(1, 255)), min_size=1, max_size=8))
@settings(max_examples=200, deadline=None)
def test_corrupted_memory_never_raises_and_never_returns_a_record_not_put(
        flips: list[tuple[int, int, int]]) -> None:
    mem = FakeMemory()
    raw = history_region(mem)
    for page, offset, mask in flips:
        data = bytearray(mem.pages[50 + page])
        data[offset] ^= mask
        mem.pages[50 + page] = bytes(data)
    result = extract(mem, {"kv": raw}, Caps(), domid=DOMID)
    put = {(s, k, v) for s, k, v in HISTORY}
    for app in result.apps:
        assert all((r.seq, r.key, r.value) in put for r in app.records)
        assert all(r.reason in REASONS for r in app.rejections)


@given(st.dictionaries(st.text(max_size=8), st.binary(max_size=64), max_size=6),
       st.lists(st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE), max_size=4))
@settings(max_examples=100, deadline=None)
def test_arbitrary_registrations_and_pages_never_raise(regs: dict[str, bytes],
                                                       pages: list[bytes]) -> None:
    mem = FakeMemory()
    mem.place(range(1, len(pages) + 1), pages)
    result = extract(mem, regs, Caps(), domid=DOMID)
    rejections = result.refused + [r for a in result.apps for r in a.rejections]
    assert all(r.reason in REASONS for r in rejections)
    assert len(result.apps) + len(result.refused) == len(regs)
