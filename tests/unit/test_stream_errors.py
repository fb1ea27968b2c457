"""Malformed input raises StreamError/RecordError naming the offset and record."""

from __future__ import annotations

import io
import struct

import pytest

from tests.unit.streams import synth
from xenpbr.errors import XenpbrError
from xenpbr.stream import ReadLimits, RecordError, StreamError, read_stream
from xenpbr.stream import format as fmt

XL_LEN = len(synth.xl_header())
SPEC = synth.PvStreamSpec(nr_pfns=200, batch=64)  # pfns 0-63 are NOTAB


@pytest.fixture(scope="module")
def good():
    return synth.build_pv_stream(SPEC)


def read(data: bytes, **kwargs):
    return read_stream(io.BytesIO(data), **kwargs)


def patched(data: bytes, offset: int, fmt_: str, *values) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt_, buf, offset, *values)
    return bytes(buf)


def expect(exc_type, data, *, offset, record, match=None, **kwargs):
    with pytest.raises(exc_type, match=match) as info:
        read(data, **kwargs)
    err = info.value
    assert isinstance(err, XenpbrError)
    assert err.offset == offset, str(err)
    assert record in (err.record or ""), str(err)
    assert f"{offset:#x}" in str(err) and record in str(err)
    return err


def test_good_stream_parses(good):
    data, _ = good
    assert read(data).libxc.domain_header.xen_minor == 17


# ---------------------------------------------------------------- headers


def test_wrong_xl_magic(good):
    data, _ = good
    expect(StreamError, b"Xen saved domain, xl format\n \0 X" + data[32:],
           offset=0, record="xl header", match="bad magic")


def test_legacy_xl_stream_rejected(good):
    data, _ = good
    expect(StreamError, patched(data, 36, "<I", 1), offset=0, record="xl header",
           match="legacy")


def test_wrong_libxl_ident(good):
    data, _ = good
    expect(StreamError, patched(data, XL_LEN, ">Q", 0x4C6962786C466D75),
           offset=XL_LEN, record="libxl header", match="bad ident")


def test_big_endian_libxl_rejected(good):
    data, _ = good
    expect(StreamError, patched(data, XL_LEN + 12, ">I", 1), offset=XL_LEN,
           record="libxl header", match="big-endian")


def test_wrong_libxc_marker_and_id(good):
    data, _ = good
    ihdr = XL_LEN + 16 + 8
    expect(StreamError, patched(data, ihdr, ">Q", 0xFFFFFFFF00000000), offset=ihdr,
           record="libxc image header", match="legacy")
    expect(StreamError, patched(data, ihdr + 8, ">I", 0x58454E47), offset=ihdr,
           record="libxc image header", match="bad id")


def test_bad_domain_header(good):
    data, _ = good
    dhdr = XL_LEN + 16 + 8 + 24
    expect(StreamError, patched(data, dhdr + 4, "<H", 16), offset=dhdr,
           record="libxc domain header", match="page_shift")


# ---------------------------------------------------------------- framing


@pytest.mark.parametrize("cut,offset,record", [
    (40, 0, "xl header"),
    (100, 48, "xl header optional data"),
    (XL_LEN + 5, XL_LEN, "libxl header"),
    (XL_LEN + 16 + 3, XL_LEN + 16, "libxl record #0"),
])
def test_truncated_headers(good, cut, offset, record):
    data, _ = good
    expect(StreamError, data[:cut], offset=offset, record=record, match="truncated")


def test_truncated_inside_page(good):
    data, layout = good
    first_pd = layout.first("libxc", fmt.REC_PAGE_DATA)
    cut = first_pd + 8 + 8 + 64 * 8 + 4096 + 100  # inside the 2nd page of batch 0
    err = expect(StreamError, data[:cut], offset=first_pd + 8 + 8 + 64 * 8 + 4096,
                 record="libxc record #5 PAGE_DATA", match="truncated")
    assert "page pfn 0x1" in str(err)


def test_truncated_before_libxl_end(good):
    data, _ = good
    expect(StreamError, data[:-8], offset=len(data) - 8, record="libxl record #1",
           match="truncated: needed 8 bytes for record header")


def test_non_zero_padding(good):
    data, layout = good
    ext = layout.first("libxc", fmt.REC_X86_PV_VCPU_EXTENDED)
    pad = ext + 8 + 108  # body is 8 + 100 bytes, 4 bytes of padding follow
    bad = patched(data, pad + 2, "<B", 0x55)
    expect(StreamError, bad, offset=pad, record="X86_PV_VCPU_EXTENDED", match="non-zero padding")


def test_unknown_mandatory_libxc_record():
    data, layout = synth.build_pv_stream(synth.PvStreamSpec(
        nr_pfns=8, extra_libxc=[synth.record(0x13, b"new")]))
    off = layout.first("libxc", 0x13)
    expect(StreamError, data, offset=off, record="UNKNOWN_MANDATORY", match="unknown mandatory")


def test_unknown_mandatory_libxl_record():
    data, layout = synth.build_pv_stream(synth.PvStreamSpec(
        nr_pfns=8, extra_libxl=[synth.record(0x6)]))
    off = layout.first("libxl", 0x6)
    expect(StreamError, data, offset=off, record="libxl record #1 UNKNOWN_MANDATORY")


def test_oversized_record_length(good):
    data, layout = good
    si = layout.first("libxc", fmt.REC_SHARED_INFO)
    expect(StreamError, patched(data, si + 4, "<I", 0xFFFFFFF0), offset=si,
           record="SHARED_INFO", match="exceeds the maximum")
    # the bound is configurable; a tight one rejects the first 64-page batch
    expect(StreamError, data, offset=layout.first("libxc", fmt.REC_PAGE_DATA),
           record="PAGE_DATA", match="exceeds", limits=ReadLimits(max_record_length=200_000))


def test_oversized_xl_optional_data(good):
    data, _ = good
    expect(StreamError, patched(data, 44, "<I", 1 << 30), offset=0, record="xl header",
           match="optional data length")


def test_trailing_garbage(good):
    data, _ = good
    with pytest.raises(StreamError, match="trailing data") as info:
        read(data + b"\0")
    assert info.value.offset == len(data)
    assert read(data + b"junk", require_eof=False).format == "xl"


# ---------------------------------------------------------------- content


def page_data_offsets(layout):
    off = layout.first("libxc", fmt.REC_PAGE_DATA)
    return off, off + 8, off + 16  # record, body (count), pfn[0]


def test_page_data_count_zero(good):
    data, layout = good
    rec, body, _ = page_data_offsets(layout)
    expect(RecordError, patched(data, body, "<I", 0), offset=rec, record="PAGE_DATA",
           match="count is 0")


def test_page_data_reserved_pfn_bits(good):
    data, layout = good
    rec, _, pfn0 = page_data_offsets(layout)
    expect(RecordError, patched(data, pfn0 + 8, "<Q", (1 << 52) | 1), offset=rec,
           record="PAGE_DATA", match=r"reserved bits set in pfn\[1\]")


def test_page_data_invalid_type(good):
    data, layout = good
    rec, _, pfn0 = page_data_offsets(layout)
    expect(RecordError, patched(data, pfn0, "<Q", 5 << 60), offset=rec, record="PAGE_DATA",
           match=r"invalid page type 0x5 in pfn\[0\]")


def test_page_data_length_mismatch(good):
    data, layout = good
    rec, _, pfn0 = page_data_offsets(layout)
    # turning a data page into XTAB makes the declared length 4096 too long
    expect(RecordError, patched(data, pfn0, "<Q", 0xF << 60), offset=rec, record="PAGE_DATA",
           match="does not match")


def test_page_data_count_beyond_body(good):
    data, layout = good
    rec, body, _ = page_data_offsets(layout)
    expect(RecordError, patched(data, body, "<I", 100000), offset=rec, record="PAGE_DATA",
           match="body too short for pfn array")


def test_bad_pv_info(good):
    data, layout = good
    info = layout.first("libxc", fmt.REC_X86_PV_INFO)
    expect(RecordError, patched(data, info + 8, "<B", 5), offset=info, record="X86_PV_INFO",
           match="guest_width 5")


def test_shared_info_wrong_length():
    data, layout = synth.build_pv_stream(synth.PvStreamSpec(
        nr_pfns=8, extra_libxc=[synth.record(fmt.REC_SHARED_INFO, b"\0" * 100)]))
    off = [o for f, t, o in layout.offsets if t == fmt.REC_SHARED_INFO][-1]
    expect(RecordError, data, offset=off, record="SHARED_INFO", match="exactly 4096")


def test_reserved_tsc_field(good):
    data, layout = good
    tsc = layout.first("libxc", fmt.REC_X86_TSC_INFO)
    expect(RecordError, patched(data, tsc + 8 + 20, "<I", 1), offset=tsc,
           record="X86_TSC_INFO", match="reserved")


@pytest.mark.parametrize("rtype,match", [(fmt.REC_CHECKPOINT, "Remus/COLO"),
                                         (fmt.REC_TOOLSTACK, "deprecated")])
def test_unsupported_known_records(rtype, match):
    data, layout = synth.build_pv_stream(synth.PvStreamSpec(
        nr_pfns=8, extra_libxc=[synth.record(rtype)]))
    expect(RecordError, data, offset=layout.first("libxc", rtype),
           record=fmt.LIBXC_REC_NAMES[rtype], match=match)


def test_libxc_context_with_body(good):
    data, layout = good
    ctx = layout.first("libxl", fmt.LIBXL_REC_LIBXC_CONTEXT)
    expect(RecordError, patched(data, ctx + 4, "<I", 8), offset=ctx,
           record="libxl record #0 LIBXC_CONTEXT", match="empty body")


def test_bad_format_argument(good):
    with pytest.raises(ValueError):
        read(good[0], stream_format="xen")
