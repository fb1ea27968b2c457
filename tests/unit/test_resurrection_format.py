"""The region format codec (xenpbr.guestproto.resurrection) against its spec.

Round trips, every reason token reachable, and fuzzing: arbitrary bytes from a hostile
guest never raise anything but :class:`RegionFormatError` with a documented reason.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpbr.guestproto import resurrection as fmt
from xenpbr.guestproto.resurrection import (
    PAGE_SIZE,
    REASONS,
    RegionFormatError,
    encode_directory,
    encode_header,
    encode_record,
    encode_region,
    encode_registration,
    parse_directory,
    parse_header,
    parse_registration,
    parse_slots,
)
from xenpbr.resurrection.model import Registration

ROOT = Path(__file__).resolve().parents[2]
apps = st.from_regex(fmt.APP_NAME, fullmatch=True).filter(lambda s: not s.endswith("\n"))
keys = st.binary(min_size=1, max_size=40)


def reason(exc: pytest.ExceptionInfo[RegionFormatError]) -> str:
    return exc.value.reason


def area_for(header: fmt.RegionHeader, slots: dict[int, bytes]) -> bytes:
    area = bytearray(header.record_area_size)
    for index, record in slots.items():
        area[index * header.slot_size:index * header.slot_size + len(record)] = record
    return bytes(area)


@given(apps, st.integers(0, fmt.MAX_U64), st.integers(3, 2000),
       st.sampled_from([64, 128, 256, 4096, 65536]))
def test_header_round_trips(app: str, generation: int, pages: int, slot_size: int) -> None:
    page = encode_header(app, generation, pages, slot_size)
    assert len(page) == PAGE_SIZE
    header = parse_header(page)
    assert (header.app, header.generation, header.page_count, header.slot_size) == (
        app, generation, pages, slot_size)
    assert header.slot_count * slot_size <= header.record_area_size < (
        header.slot_count + 1) * slot_size


@pytest.mark.parametrize("offset,expected", [(0, "magic"), (8, "version"), (12, "header-crc"),
                                             (30, "header-crc"), (124, "header-crc")])
def test_header_corruption_is_detected_with_its_reason(offset: int, expected: str) -> None:
    page = bytearray(encode_header("kv", 1, 10, 256))
    page[offset] ^= 0x01
    with pytest.raises(RegionFormatError) as exc:
        parse_header(bytes(page))
    assert reason(exc) == expected


def resealed(page: bytes, offset: int, fmt_: str, value: int) -> bytes:
    """A header with one field changed and a fresh CRC (a guest lying consistently)."""
    data = bytearray(page)
    struct.pack_into(fmt_, data, offset, value)
    struct.pack_into("<I", data, 124, fmt.crc(bytes(data[:124])))
    return bytes(data)


@pytest.mark.parametrize("offset,fmt_,value", [
    (12, "<I", 100000), (12, "<I", 2), (60, "<I", 100), (64, "<I", 10**6), (56, "<I", 7),
    (10, "<H", 64), (70, "<I", 1)])
def test_consistent_lies_in_the_header_are_out_of_bounds(offset: int, fmt_: str,
                                                         value: int) -> None:
    with pytest.raises(RegionFormatError) as exc:
        parse_header(resealed(encode_header("kv", 1, 10, 256), offset, fmt_, value))
    assert reason(exc) == "bounds"


def test_bad_app_name_in_header_is_refused() -> None:
    page = bytearray(encode_header("kv", 1, 10, 256))
    page[24:26] = b"K/"
    struct.pack_into("<I", page, 124, fmt.crc(bytes(page[:124])))
    with pytest.raises(RegionFormatError) as exc:
        parse_header(bytes(page))
    assert reason(exc) == "bounds"


@given(st.binary(min_size=0, max_size=PAGE_SIZE))
def test_arbitrary_header_bytes_raise_only_format_errors(data: bytes) -> None:
    for page in (data, fmt.REGION_MAGIC + b"\x01\x00" + data):
        try:
            parse_header(page)
        except RegionFormatError as exc:
            assert exc.reason in REASONS


@given(st.lists(st.integers(1, fmt.MAX_PFN), min_size=3, max_size=1200, unique=True))
@settings(max_examples=30)
def test_directory_round_trips(pfns: list[int]) -> None:
    header = parse_header(encode_header("kv", 1, len(pfns), 256))
    dir_pfns = pfns[1:1 + header.dir_pages]
    assert parse_directory(encode_directory(pfns), header, pfns[0], dir_pfns) == tuple(pfns)


def test_directory_rejections() -> None:
    pfns = [10, 11, 12, 13]
    header = parse_header(encode_header("kv", 1, 4, 256))
    pages = encode_directory(pfns)
    with pytest.raises(RegionFormatError) as exc:
        parse_directory(pages, header, 99, [11])
    assert reason(exc) == "directory"
    with pytest.raises(RegionFormatError) as exc:
        parse_directory(encode_directory([10, 11, 12, 11]), header, 10, [11])
    assert reason(exc) == "overlap"
    with pytest.raises(RegionFormatError) as exc:
        parse_directory(encode_directory([10, 11, 12, 13, 14]), header, 10, [11])
    assert reason(exc) == "directory"  # a non-zero unused entry
    with pytest.raises(RegionFormatError) as exc:
        parse_directory(pages + pages, header, 10, [11])
    assert reason(exc) == "directory"


@given(st.lists(st.tuples(keys, st.binary(max_size=100), st.booleans()), min_size=1,
                max_size=30))
def test_slots_round_trip_and_the_largest_seq_wins(writes: list[tuple[bytes, bytes, bool]]
                                                   ) -> None:
    header = parse_header(encode_header("kv", 1, 5, 256))
    slots = {i: encode_record(i + 1, k, v, tombstone=t) for i, (k, v, t) in enumerate(writes)}
    records, rejections = parse_slots(area_for(header, slots), header)
    assert rejections == []
    latest = {}
    for seq, (k, v, t) in enumerate(writes, 1):
        latest[k] = (seq, v, t)
    assert {r.key: (r.seq, r.value, r.tombstone) for r in records} == latest
    assert [r.seq for r in records] == sorted(r.seq for r in records)


def test_each_record_fault_has_its_reason_and_keeps_the_older_version() -> None:
    header = parse_header(encode_header("kv", 1, 3, 256))
    good = encode_record(1, b"k", b"old")
    newer = bytearray(encode_record(2, b"k", b"new"))
    newer[-1] ^= 0xFF
    torn = bytearray(encode_record(3, b"t", b"v"))
    torn[:4] = b"\0\0\0\1"
    bad_flags = bytearray(encode_record(4, b"f", b"v"))
    struct.pack_into("<H", bad_flags, 18, 6)
    struct.pack_into("<I", bad_flags, 4, fmt.crc(bytes(bad_flags[8:])))
    too_long = bytearray(encode_record(5, b"l", b"v"))
    struct.pack_into("<I", too_long, 20, 10**6)
    dup_seq = encode_record(1, b"d", b"v")
    area = area_for(header, {0: good, 1: bytes(newer), 2: bytes(torn), 3: bytes(bad_flags),
                             4: bytes(too_long), 5: dup_seq})
    records, rejections = parse_slots(area, header)
    assert [(r.key, r.value) for r in records] == [(b"k", b"old")]
    got = {(r.slot, r.reason, r.seq, r.key) for r in rejections}
    assert got == {(1, "crc", 2, b"k"), (2, "torn", 3, b"t"), (3, "flags", 4, b"f"),
                   (4, "length", 5, None), (5, "seq", 1, b"d")}


@given(st.binary(min_size=0, max_size=3 * 256))
def test_arbitrary_slot_bytes_never_raise(data: bytes) -> None:
    header = parse_header(encode_header("kv", 1, 3, 256))
    area = (data + bytes(header.record_area_size))[:header.record_area_size]
    for prefix in (b"", fmt.RECORD_MAGIC):
        records, rejections = parse_slots(prefix + area[len(prefix):], header)
        assert all(r.reason in REASONS for r in rejections)
        assert all(1 <= len(r.key) <= fmt.MAX_KEY_LEN for r in records)


@given(apps, st.integers(0, fmt.MAX_U64), st.integers(3, fmt.MAX_PAGES),
       st.integers(0, fmt.MAX_PFN - 40))
def test_registration_round_trips(app: str, generation: int, pages: int, pfn: int) -> None:
    dirs = tuple(pfn + 1 + i for i in range(fmt.dir_pages_for(pages)))
    reg = Registration(app, generation, pages, pfn, dirs)
    text = encode_registration(reg)
    assert len(text) <= fmt.MAX_REGISTRATION_BYTES
    assert parse_registration(app, text.encode()) == reg


@pytest.mark.parametrize("raw,expected", [
    (b"2 1 10 5 6", "version"), (b"1 1 10 5", "registration"), (b"1 1 10 5 6,7", "registration"),
    (b"1 -1 10 5 6", "registration"), (b"1 1 2 5 6", "registration"),
    (b"1 1 10 5 5", "registration"), (b"1 1 99999 5 6", "registration"),
    (b"1 1 10 5 \xff", "registration"), (b"1 1 10 5 6 " + b"0" * 2000, "registration"),
    (b"1 1 10 5 +6", "registration"), (b"1 1 10 5 " + b"9" * 20, "registration")])
def test_bad_registrations_are_refused(raw: bytes, expected: str) -> None:
    with pytest.raises(RegionFormatError) as exc:
        parse_registration("kv", raw)
    assert reason(exc) == expected


@given(st.text(max_size=20), st.binary(max_size=300))
def test_arbitrary_registrations_raise_only_format_errors(app: str, raw: bytes) -> None:
    try:
        parse_registration(app, raw)
    except RegionFormatError as exc:
        assert exc.reason in REASONS


def test_encode_region_is_what_the_parsers_read() -> None:
    pfns = list(range(500, 510))
    pages = encode_region("kv", 7, pfns, 128, {3: encode_record(9, b"k", b"v")})
    header = parse_header(pages[0])
    assert parse_directory(pages[1:2], header, 500, [501]) == tuple(pfns)
    records, _ = parse_slots(b"".join(pages[2:]), header)
    assert [(r.seq, r.key, r.value) for r in records] == [(9, b"k", b"v")]


def test_every_reason_token_is_documented() -> None:
    doc = (ROOT / "docs/resurrection.md").read_text()
    section = doc.split("## Reason tokens", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z-]+)` \|", section, re.M))
    assert documented == set(REASONS)
