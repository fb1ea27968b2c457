"""Allocate-only pages (:mod:`xenpbr.stream.allocate_only`): zero plain pages become
XALLOC entries without data; everything else of the stream is unchanged, and Xen 4.17's
own verify-stream-v2 accepts the result."""

from __future__ import annotations

import io
import subprocess

import pytest

from tests.unit.streams import synth
from tests.unit.streams.xen_tools import AVAILABLE, MISSING_REASON
from tests.unit.test_stream_xen_verify import verify
from xenpbr.stream import InMemoryPages, read_stream, write_stream
from xenpbr.stream import format as fmt
from xenpbr.stream.allocate_only import allocate_only

ZERO = bytes(fmt.PAGE_SIZE)


def parsed(spec: synth.PvStreamSpec | None = None):
    data, _ = synth.build_pv_stream(spec or synth.PvStreamSpec())
    pages = InMemoryPages()
    stream = read_stream(io.BytesIO(data), on_page=pages.on_page)
    return data, stream, pages


def data_pages(stream) -> list[tuple[int, int]]:
    return [(e.pfn, e.type_bits) for image in stream.libxc_images
            for rec in image.page_data_records() for e in rec if e.has_data]


def zero_flags(stream, pages: InMemoryPages) -> list[bool]:
    return [pages.pages[pfn] == ZERO for pfn, _ in data_pages(stream)]


def test_zero_plain_pages_become_allocate_only_and_the_rest_is_untouched() -> None:
    data, stream, pages = parsed()
    before = data_pages(stream)
    turned, kept = allocate_only(stream, zero_flags(stream, pages))
    assert len(kept) == len(before) and not all(kept)
    gone = {pfn for (pfn, _), k in zip(before, kept) if not k}
    assert gone == {pfn for pfn, t in before if t == synth.NOTAB and pages.pages[pfn] == ZERO}
    after = {e.pfn: e.type_bits for image in turned.libxc_images
             for rec in image.page_data_records() for e in rec}
    assert all(after[pfn] == fmt.PAGE_TYPE_XALLOC for pfn in gone)
    assert data_pages(turned) == [p for p, k in zip(before, kept) if k]
    # the original model is not changed, and still regenerates byte for byte
    assert data_pages(stream) == before
    out = io.BytesIO()
    write_stream(out, stream, pages.get_page)
    assert out.getvalue() == data
    # the turned stream is shorter by exactly the pages left to Xen
    short = io.BytesIO()
    write_stream(short, turned, pages.get_page)
    assert len(short.getvalue()) == len(data) - fmt.PAGE_SIZE * len(gone)


def test_a_zero_page_table_keeps_its_data() -> None:
    _, stream, pages = parsed()
    flags = [True] * len(data_pages(stream))  # as if every page were zero
    turned, kept = allocate_only(stream, flags)
    tables = [(pfn, t) for (pfn, t), k in zip(data_pages(stream), kept) if k]
    assert tables and all(t != synth.NOTAB for _, t in tables)


def test_the_flags_must_match_the_data_pages() -> None:
    _, stream, pages = parsed()
    n = len(data_pages(stream))
    with pytest.raises(ValueError, match="fewer flags"):
        allocate_only(stream, [False] * (n - 1))
    with pytest.raises(ValueError, match="more flags"):
        allocate_only(stream, [False] * (n + 1))


@pytest.mark.skipif(not AVAILABLE, reason=MISSING_REASON)
def test_xens_verifier_accepts_an_allocate_only_stream(tmp_path) -> None:
    _, stream, pages = parsed()
    turned, kept = allocate_only(stream, zero_flags(stream, pages))
    out = tmp_path / "allocate-only.xl"
    with out.open("wb") as f:
        write_stream(f, turned, pages.get_page)
    result: subprocess.CompletedProcess = verify(out, "xl")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("End, length 0")
