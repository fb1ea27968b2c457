"""The guest library (xenpbr_agent.resurrect): what it lays out is what dom0 parses.

Regions are made for real (anonymous mmap, mlock when allowed) with a fake pfn lookup and
the fake xenstore, then read back with the format's parsers and with extraction itself.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from xenpbr.guestproto.resurrection import (
    PAGE_SIZE,
    RECORD_MAGIC,
    parse_directory,
    parse_header,
    parse_registration,
    parse_slots,
)
from xenpbr.resurrection.extract import extract
from xenpbr.resurrection.model import Caps
from xenpbr.xenstore.fake import FakeXenstoreServer
from xenpbr_agent import AgentError
from xenpbr_agent import resurrect
from xenpbr_agent.resurrect import Region, RegionFull, ResurrectError

DOMID = 5
CAN_LOCK = os.geteuid() == 0


def fake_pfns(address: int, count: int) -> Sequence[int]:
    assert address % PAGE_SIZE == 0
    return [0x1000 + 7 * i for i in range(count)]  # scattered, like real frames


@pytest.fixture
def guest_xs():
    server = FakeXenstoreServer()
    server.create_domain(DOMID)
    return server, server.connect(DOMID)


def make(guest_xs, size: int = 3 * PAGE_SIZE, **kwargs) -> Region:
    return Region.create("kv", size, xenstore=guest_xs[1], pfn_lookup=fake_pfns,
                         lock=CAN_LOCK, generation=42, **kwargs)


class Memory:
    def __init__(self, region: Region) -> None:
        self.pages = dict(zip(region.pfns, region.pages()))

    def read_pfns(self, pfns: Sequence[int]) -> list[bytes]:
        return [self.pages[p] for p in pfns]


def test_the_region_parses_as_the_spec_says(guest_xs) -> None:
    region = make(guest_xs)
    seqs = [region.put(b"a", b"1"), region.put(b"b", b"2" * 200), region.put(b"a", b"3")]
    assert seqs == [1, 2, 3]
    pages = region.pages()
    header = parse_header(pages[0])
    assert (header.app, header.generation, header.page_count) == ("kv", 42, len(region.pfns))
    assert header.record_area_size >= 3 * PAGE_SIZE
    pfns = parse_directory(pages[1:1 + header.dir_pages], header, region.pfns[0],
                           region.pfns[1:1 + header.dir_pages])
    assert pfns == region.pfns
    records, rejections = parse_slots(b"".join(pages[header.first_record_page:]), header)
    assert [(r.key, r.value, r.seq) for r in records] == [(b"b", b"2" * 200, 2), (b"a", b"3", 3)]
    assert rejections == []


def test_registration_is_in_xenstore_and_removed_on_close(guest_xs) -> None:
    server, xs = guest_xs
    region = make(guest_xs)
    dom0 = server.connect(0)
    path = f"/local/domain/{DOMID}/data/xenpbr/resurrect/kv"
    reg = parse_registration("kv", dom0.read(path))
    assert reg == region.registration and reg.header_pfn == region.pfns[0]
    region.close()
    assert dom0.read_or(path) is None


def test_dom0_extracts_what_was_put_deleted_and_overwritten(guest_xs) -> None:
    region = make(guest_xs)
    for i in range(100):
        region.put(b"k%d" % (i % 10), b"v%d" % i)
    region.delete(b"k3")
    raw = {"kv": guest_xs[0].connect(0).read(
        f"/local/domain/{DOMID}/data/xenpbr/resurrect/kv")}
    app = extract(Memory(region), raw, Caps(), domid=DOMID).apps[0]
    got = {r.key: (r.value, r.tombstone) for r in app.records}
    assert got[b"k3"] == (b"", True) and app.rejections == []
    assert {k: v for k, (v, t) in got.items() if not t} == {
        b"k%d" % j: b"v%d" % (90 + j) for j in range(10) if j != 3}
    assert region.get(b"k5") == b"v95" and region.get(b"k3") is None
    assert region.get(b"never") is None


def test_slots_are_reused_and_a_full_region_says_so(guest_xs) -> None:
    region = make(guest_xs, size=PAGE_SIZE, slot_size=1024)
    assert region.slot_count == 4
    for i in range(50):
        region.put(b"same", b"x" * i)  # one key: one slot in use at a time, reused
    for i in range(2):
        region.put(b"k%d" % i, b"")
    with pytest.raises(RegionFull):
        region.put(b"one-too-many", b"")  # the last free slot is kept for updates
    region.put(b"same", b"still fits")
    region.delete(b"k0")
    assert region.get(b"same") == b"still fits" and region.get(b"k0") is None


def test_a_crash_in_the_middle_of_a_commit_keeps_the_old_version(guest_xs) -> None:
    region = make(guest_xs)
    region.put(b"k", b"old")
    real = region._memory
    writes: list[int] = []

    class CutAfter:  # stops the commit before its magic is written
        def __setitem__(self, index: slice, value: bytes) -> None:
            writes.append(index.start)
            if bytes(value) == RECORD_MAGIC:  # the commit point, whatever came before
                raise KeyboardInterrupt
            real[index] = value

        def __getitem__(self, index: slice) -> bytes:
            return real[index]

    region._memory = CutAfter()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        region.put(b"k", b"new")
    region._memory = real
    header = parse_header(region.pages()[0])
    records, rejections = parse_slots(b"".join(region.pages()[header.first_record_page:]),
                                      header)
    assert [(r.key, r.value) for r in records] == [(b"k", b"old")]


@pytest.mark.parametrize("key,value", [(b"", b"v"), (b"k" * 256, b""), (b"k", b"v" * 300)])
def test_records_that_do_not_fit_are_refused(guest_xs, key: bytes, value: bytes) -> None:
    with pytest.raises(ResurrectError):
        make(guest_xs).put(key, value)


def test_bad_app_name_is_refused() -> None:
    with pytest.raises(ResurrectError, match="lay out"):
        Region.create("Bad/Name", PAGE_SIZE, register=False, pfn_lookup=fake_pfns, lock=False)


def test_pagemap_without_privilege_is_a_clear_error(tmp_path: Path) -> None:
    pagemap = tmp_path / "pagemap"
    pagemap.write_bytes(struct.pack("<4Q", *[1 << 63] * 4))  # present, pfn hidden
    with pytest.raises(ResurrectError, match="CAP_SYS_ADMIN"):
        resurrect.pagemap_pfns(PAGE_SIZE, 3, str(pagemap))
    pagemap.write_bytes(struct.pack("<2Q", (1 << 63) | 77, (1 << 63) | 78))
    assert resurrect.pagemap_pfns(0, 2, str(pagemap)) == [77, 78]
    assert issubclass(ResurrectError, AgentError)


def test_compaction_setting_is_set_or_warned(tmp_path: Path, caplog) -> None:
    setting = tmp_path / "compact"
    setting.write_text("1\n")
    assert resurrect.keep_locked_pages_in_place(str(setting))
    assert setting.read_text() == "0\n"
    with caplog.at_level(logging.WARNING):
        assert not resurrect.keep_locked_pages_in_place(str(tmp_path / "none" / "x"))
    assert "compact_unevictable_allowed" in caplog.text


@pytest.mark.skipif(not CAN_LOCK, reason="pagemap shows pfns to root only")
def test_real_pagemap_gives_distinct_pfns_for_a_locked_region() -> None:
    region = Region.create("real", 8 * PAGE_SIZE, register=False)
    assert len(set(region.pfns)) == len(region.pfns) and all(region.pfns)
    region.close()
