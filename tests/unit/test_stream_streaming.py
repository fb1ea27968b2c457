"""Page data streams through the codec: memory stays bounded for big guests."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest

from tests.unit.streams import synth
from xenpbr.stream import read_stream, write_stream

NR_PFNS = 24 * 1024  # a 96 MiB guest: far more page data than the memory bound below
MEMORY_BOUND = 6 << 20


def content(pfn: int) -> bytes:
    """Cheap, distinct-per-pfn contents (with the synth zero pages mixed in)."""
    if pfn % 5 == 3:
        return bytes(synth.PAGE)
    return pfn.to_bytes(8, "little") * (synth.PAGE // 8)


SPEC = synth.PvStreamSpec(nr_pfns=NR_PFNS, content=content)


class HashingSink:
    """Write-only file object that keeps nothing but a running hash."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)


@pytest.fixture(scope="module")
def expected():
    digest, size = hashlib.sha256(), 0
    for chunk in synth.iter_pv_stream(SPEC):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def test_reader_streams_pages_with_bounded_memory(expected):
    calls = []
    page_hash = hashlib.sha256()

    def on_page(pfn: int, type_bits: int, data: memoryview) -> None:
        assert len(data) == synth.PAGE and data.readonly
        calls.append(pfn)
        page_hash.update(data)

    source = synth.ChunkReader(synth.iter_pv_stream(SPEC))
    tracemalloc.start()
    try:
        stream = read_stream(source, on_page=on_page)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    data_pfns = [p for p in range(NR_PFNS) if synth.has_data(synth.pv_page_type(p, NR_PFNS))]
    assert calls == data_pfns  # the visitor saw every data page, in stream order
    ref = hashlib.sha256()
    for pfn in data_pfns:
        ref.update(content(pfn))
    assert page_hash.hexdigest() == ref.hexdigest()
    assert expected[1] > 10 * MEMORY_BOUND
    assert peak < MEMORY_BOUND, f"peak {peak} bytes while parsing {expected[1]} bytes"
    # the model keeps 8 bytes of metadata per pfn and no page contents
    batches = list(stream.libxc.page_data_records())
    assert len(batches) == NR_PFNS // 1024
    assert sum(b.words.itemsize * len(b.words) for b in batches) == 8 * NR_PFNS


def test_writer_streams_pages_with_bounded_memory(expected):
    stream = read_stream(synth.ChunkReader(synth.iter_pv_stream(SPEC)))
    requested = []

    def get_page(pfn: int) -> bytes:
        requested.append(pfn)
        return content(pfn)

    sink = HashingSink()
    tracemalloc.start()
    try:
        written = write_stream(sink, stream, get_page)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (sink.hash.hexdigest(), sink.size) == expected and written == expected[1]
    assert requested == sorted(requested) and len(requested) == len(set(requested))
    assert peak < MEMORY_BOUND, f"peak {peak} bytes while writing {written} bytes"
