"""Byte-identical round trips: write_stream(read_stream(s)) == s."""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import threading

import pytest

from tests.unit.streams import synth
from tests.unit.streams.handbuilt import build_model_by_hand
from xenpbr.stream import (
    EmulatorRecord,
    HvmContextRecord,
    HvmParamsRecord,
    InMemoryPages,
    OpaqueRecord,
    RecordError,
    Stream,
    X86CpuidPolicyRecord,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuRecord,
    X86TscInfoRecord,
    read_stream,
    write_stream,
)
from xenpbr.stream import format as fmt
from xenpbr.stream.headers import DomainHeader, ImageHeader

PV_417_ORDER = (["X86_PV_INFO", "X86_CPUID_POLICY", "X86_MSR_POLICY", "STATIC_DATA_END",
                 "X86_PV_P2M_FRAMES", "PAGE_DATA", "PAGE_DATA", "X86_TSC_INFO", "SHARED_INFO"]
                + ["X86_PV_VCPU_BASIC", "X86_PV_VCPU_EXTENDED", "X86_PV_VCPU_XSAVE",
                   "X86_PV_VCPU_MSRS"] * 2 + ["END"])


def parse(data: bytes, **kwargs):
    pages = InMemoryPages()
    stream = read_stream(io.BytesIO(data), on_page=pages.on_page, **kwargs)
    return stream, pages


def regenerate(stream: Stream, pages: InMemoryPages) -> bytes:
    out = io.BytesIO()
    n = write_stream(out, stream, pages.get_page)
    assert n == len(out.getvalue())
    return out.getvalue()


@pytest.fixture(scope="module")
def pv_stream():
    data, _ = synth.build_pv_stream()
    stream, pages = parse(data)
    return data, stream, pages


def test_pv_roundtrip_is_byte_identical(pv_stream):
    data, stream, pages = pv_stream
    assert regenerate(stream, pages) == data


def test_pv_structure(pv_stream):
    _, stream, _ = pv_stream
    assert stream.format == "xl"
    assert stream.xl_header.config_json == synth.CONFIG_JSON
    assert stream.libxl.record_names == ["LIBXC_CONTEXT", "END"]
    image = stream.libxc
    assert image.image_header == ImageHeader(3, 0)
    assert image.domain_header == DomainHeader(fmt.DHDR_TYPE_X86_PV, 4, 17)
    assert image.record_names == PV_417_ORDER
    assert image.records[0] == X86PvInfoRecord(8, 4)
    assert isinstance(image.records[1], X86CpuidPolicyRecord) and len(image.records[1].leaves) == 5
    p2m = image.records[4]
    assert isinstance(p2m, X86PvP2mFramesRecord) and (p2m.start_pfn, p2m.end_pfn) == (0, 1499)
    assert len(p2m.p2m_pfns) == 3
    tsc = image.records[7]
    assert tsc == X86TscInfoRecord(0, 2_494_000, 123_456_789_012, 1)
    ext = image.records[10]
    assert isinstance(ext, X86PvVcpuRecord) and ext.rtype == fmt.REC_X86_PV_VCPU_EXTENDED
    assert (ext.vcpu_id, len(ext.context)) == (0, 100)


def test_page_data_batches_and_types(pv_stream):
    _, stream, pages = pv_stream
    batches = list(stream.libxc.page_data_records())
    assert [b.count for b in batches] == [1024, 476]  # exact batch sizes kept
    entries = [e for b in batches for e in b]
    assert [e.pfn for e in entries] == list(range(1500))
    assert {e.pfn: e.type_bits for e in entries} == {p: synth.pv_page_type(p, 1500) for p in range(1500)}
    no_data = {e.pfn for e in entries if not e.has_data}
    assert len(no_data) == 12  # 10 XTAB + BROKEN + XALLOC
    assert set(pages.pages) == set(range(1500)) - no_data
    assert pages.pages[3] == bytes(4096)  # a zero page is delivered like any other
    assert all(pages.pages[p] == synth.page_content(p) for p in pages.pages)
    assert pages.types[100] == fmt.PAGE_TYPE_L4TAB | fmt.PAGE_TYPE_LPINTAB


@pytest.mark.parametrize("with_xl,with_libxl,stream_format",
                         [(False, True, "libxl"), (False, False, "libxc")])
def test_bare_layers_roundtrip(with_xl, with_libxl, stream_format):
    data, _ = synth.build_pv_stream(synth.PvStreamSpec(nr_pfns=300, with_xl=with_xl,
                                                       with_libxl=with_libxl))
    stream, pages = parse(data, stream_format=stream_format)
    assert stream.format == stream_format
    assert regenerate(stream, pages) == data


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_odd_batch_sizes_are_preserved(batch):
    data, _ = synth.build_pv_stream(synth.PvStreamSpec(nr_pfns=200, batch=batch))
    stream, pages = parse(data)
    counts = [r.count for r in stream.libxc.page_data_records()]
    assert counts == [min(batch, 200 - s) for s in range(0, 200, batch)]
    assert regenerate(stream, pages) == data


def test_unknown_optional_records_round_trip(caplog):
    spec = synth.PvStreamSpec(
        nr_pfns=64,
        extra_libxc=[synth.record(0x80000123, b"thirteen byte")],
        extra_libxl=[synth.record(0x80000007, b"x" * 3), synth.record(0x80000008)])
    data, _ = synth.build_pv_stream(spec)
    with caplog.at_level(logging.WARNING):
        stream, pages = parse(data)
    assert stream.libxc.records[-2] == OpaqueRecord(0x80000123, b"thirteen byte")
    assert stream.libxl.records[1:3] == [OpaqueRecord(0x80000007, b"xxx"),
                                         OpaqueRecord(0x80000008, b"")]
    assert sum("unknown optional record" in r.message for r in caplog.records) == 3
    assert regenerate(stream, pages) == data


def hvm_stream_bytes() -> bytes:
    """An HVM-shaped libxl stream: exercises the HVM and emulator codecs."""
    params = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 1, 0xFEFFF, 17, 0xFEFFE)
    entries = [(p, synth.NOTAB) for p in range(5)] + [(5, synth.XTAB)]
    libxc = (synth.image_header() + synth.domain_header(gtype=2)
             + synth.record(synth.CPUID_POLICY, synth.cpuid_policy())
             + synth.record(synth.STATIC_DATA_END)
             + b"".join(synth.page_data_record(entries))
             + synth.record(synth.TSC_INFO, struct.pack("<IIQII", 1, 1, 2, 3, 0))
             + synth.record(0x0A, params) + synth.record(0x09, b"\x5a" * 1021)
             + synth.record(synth.END))
    xenstore = struct.pack("<II", 2, 0) + b"physmap/1/start_addr\0f0000000\0"
    return (synth.libxl_header() + synth.record(synth.LIBXC_CONTEXT) + libxc
            + synth.record(synth.EMU_XENSTORE, xenstore)
            + synth.record(synth.EMU_CONTEXT, struct.pack("<II", 2, 0), b"QEVM" * 301)
            + synth.record(synth.LIBXL_END))


def test_hvm_and_emulator_records_round_trip():
    data = hvm_stream_bytes()
    stream, pages = parse(data, stream_format="libxl")
    assert stream.libxl.record_names == ["LIBXC_CONTEXT", "EMULATOR_XENSTORE_DATA",
                                         "EMULATOR_CONTEXT", "END"]
    assert stream.libxc.records[4] == HvmParamsRecord(((1, 0xFEFFF), (17, 0xFEFFE)))
    assert stream.libxc.records[5] == HvmContextRecord(b"\x5a" * 1021)
    emu = stream.libxl.records[2]
    assert isinstance(emu, EmulatorRecord) and emu.emulator_id == fmt.EMULATOR_QEMU_UPSTREAM
    assert regenerate(stream, pages) == data


def test_model_pickles_without_page_contents(pv_stream):
    """The page-free model can be persisted (e.g. pickled) and regenerated later."""
    data, stream, pages = pv_stream
    blob = pickle.dumps(stream)
    assert len(blob) < len(data) // 100
    assert regenerate(pickle.loads(blob), pages) == data


def test_on_record_sees_every_record_in_order(pv_stream):
    data, _, _ = pv_stream
    seen = []
    read_stream(io.BytesIO(data), on_record=lambda fam, rec: seen.append((fam, rec.rtype)))
    libxc = [(f, t) for f, t in seen if f == "libxc"]
    assert [fmt.libxc_record_name(t) for _, t in libxc] == PV_417_ORDER
    assert seen[-2:] == [("libxl", fmt.LIBXL_REC_LIBXC_CONTEXT), ("libxl", fmt.LIBXL_REC_END)]


def test_writer_accepts_hand_built_model():
    stream, contents = build_model_by_hand()
    out = io.BytesIO()
    write_stream(out, stream, contents.__getitem__)
    assert out.getvalue() == synth.build_pv_stream()[0]


def test_xl_header_variants_round_trip():
    data, _ = synth.build_pv_stream(synth.PvStreamSpec(nr_pfns=8))
    libxl_part = data[len(synth.xl_header()):]
    for config in (b"", b"{}\0", b"odd\0"):
        variant = synth.xl_header(config) + libxl_part
        stream, pages = parse(variant)
        assert stream.xl_header.config_json == config
        assert regenerate(stream, pages) == variant
    # extra optional data after the config: xl ignores it, we keep it verbatim
    hdr = bytearray(synth.xl_header(b"{}\0"))
    struct.pack_into("<I", hdr, 44, struct.unpack_from("<I", hdr, 44)[0] + 5)
    variant = bytes(hdr) + b"extra" + libxl_part
    stream, pages = parse(variant)
    assert stream.xl_header.optional_data.endswith(b"extra")
    assert regenerate(stream, pages) == variant


def test_writer_rejects_bad_models():
    stream, contents = build_model_by_hand()
    stream.libxc.records.pop()  # drop END
    with pytest.raises(ValueError, match="END"):
        write_stream(io.BytesIO(), stream, contents.__getitem__)
    stream, contents = build_model_by_hand()
    with pytest.raises(RecordError, match=r"get_page\(0x0\) returned 10 bytes"):
        write_stream(io.BytesIO(), stream, lambda pfn: b"short page")


def test_fifo_in_and_out(tmp_path, pv_stream):
    """Reader and writer work on FIFOs (sequential I/O only, as with xl save/restore)."""
    data, stream, _ = pv_stream
    fifo = tmp_path / "save.fifo"
    os.mkfifo(fifo)

    def produce():
        with open(fifo, "wb") as f:
            f.write(data)

    producer = threading.Thread(target=produce)
    producer.start()
    with open(fifo, "rb") as f:
        from_fifo, fifo_pages = parse_file(f)
    producer.join()
    assert from_fifo == stream

    received = bytearray()

    def consume():
        with open(fifo, "rb") as f:
            received.extend(f.read())

    consumer = threading.Thread(target=consume)
    consumer.start()
    with open(fifo, "wb") as f:
        write_stream(f, from_fifo, fifo_pages.get_page)
    consumer.join()
    assert bytes(received) == data


def parse_file(f):
    pages = InMemoryPages()
    return read_stream(f, on_page=pages.on_page), pages


def test_non_seekable_chunked_input():
    layout = synth.Layout()
    reader = synth.ChunkReader(synth.iter_pv_stream(synth.PvStreamSpec(nr_pfns=300), layout))
    stream, pages = parse_file(reader)
    assert reader.max_chunk <= 16 * 1024
    assert regenerate(stream, pages) == synth.build_pv_stream(synth.PvStreamSpec(nr_pfns=300))[0]
