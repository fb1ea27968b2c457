"""libxc record bodies: parse and emit, one pair per record type.

Implements the "Records" chapter of ``libxc-migration-stream.pandoc``
(Revision 3, Xen RELEASE-4.17.7) with the layouts of
``tools/libs/guest/xg_sr_stream_format.h``. :data:`CODECS` is the registry the
reader/writer use. Content checks mirror Xen's ``verify-stream-v2``
(``xen/migration/libxc.py``); semantic checks that need domain state (vCPU
blob sizes, p2m frame counts) are left to Xen's restore.

PAGE_DATA bodies are never held whole when read: page contents stream through
``ReadContext.on_page`` one 4 KiB page at a time. When writing, a source that has
``WriteContext.get_pages`` serves one record's pages at once (at most 1024 pages, 4 MiB);
otherwise ``WriteContext.get_page`` is called per page.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from construct import Struct

from xenpbr.stream import format as fmt
from xenpbr.stream.codec import EMPTY, Codec, ReadContext, Record, WriteContext
from xenpbr.stream.errors import RecordError
from xenpbr.stream.framing import BodyReader, BytesLike, write_record

_BIG_ENDIAN_HOST = sys.byteorder == "big"


# --------------------------------------------------------------- PAGE_DATA


class PageEntry(NamedTuple):
    """One pfn of a PAGE_DATA record with its 4-bit PFINFO type."""

    pfn: int
    type_bits: int

    @property
    def has_data(self) -> bool:
        """True if the record carries 4 KiB of contents for this pfn."""
        return fmt.page_type_has_data(self.type_bits)


def _words_from_le(raw: bytes) -> array:
    words = array("Q")
    words.frombytes(raw)
    if _BIG_ENDIAN_HOST:
        words.byteswap()
    return words


def _words_to_le(words: array) -> bytes:
    if not _BIG_ENDIAN_HOST:
        return words.tobytes()
    swapped = array("Q", words)
    swapped.byteswap()
    return swapped.tobytes()


@dataclass(frozen=True, slots=True)
class PageDataRecord:
    """A PAGE_DATA batch: the exact pfn words (type << 60 | pfn), no contents.

    Keeping the raw words (8 bytes per page) preserves batch boundaries, order
    and type bits exactly while staying small (1 MiB for a 512 MiB guest).
    """

    words: array
    rtype: ClassVar[int] = fmt.REC_PAGE_DATA

    @classmethod
    def from_pages(cls, pages: Iterable[tuple[int, int]]) -> PageDataRecord:
        """Build a batch from ``(pfn, type_bits)`` pairs (validated)."""
        words = array("Q")
        for pfn, type_bits in pages:
            if not 0 <= pfn <= fmt.PAGE_DATA_PFN_MASK:
                raise ValueError(f"pfn {pfn:#x} out of range")
            if type_bits not in fmt.PAGE_TYPE_NAMES:
                raise ValueError(f"invalid page type {type_bits:#x} for pfn {pfn:#x}")
            words.append(type_bits << fmt.PAGE_DATA_TYPE_SHIFT | pfn)
        if not words:
            raise ValueError("a PAGE_DATA record needs at least one pfn")
        return cls(words)

    @property
    def count(self) -> int:
        """Number of pfns in the batch (the record's ``count`` field)."""
        return len(self.words)

    def __iter__(self) -> Iterator[PageEntry]:
        for word in self.words:
            yield PageEntry(word & fmt.PAGE_DATA_PFN_MASK, word >> fmt.PAGE_DATA_TYPE_SHIFT)

    @property
    def pages(self) -> list[PageEntry]:
        """``(pfn, type_bits)`` for every pfn, in record order."""
        return list(self)

    @property
    def data_pfns(self) -> list[int]:
        """Pfns whose contents follow in the record, in order."""
        shift, mask, no_data = (fmt.PAGE_DATA_TYPE_SHIFT, fmt.PAGE_DATA_PFN_MASK,
                                fmt.PAGE_TYPES_WITHOUT_DATA)
        return [w & mask for w in self.words if w >> shift not in no_data]

    @property
    def body_length(self) -> int:
        """Body length on the wire."""
        return self.body_length_with(len(self.data_pfns))

    def body_length_with(self, data_pages: int) -> int:
        """Body length on the wire when ``data_pages`` of its pfns carry contents."""
        return (fmt.PAGE_DATA_HEADER.sizeof() + fmt.PFN_ENTRY_SIZE * self.count
                + fmt.PAGE_SIZE * data_pages)


def _check_pfn_words(body: BodyReader, words: array) -> int:
    """Validate every pfn word; return how many pages carry data."""
    with_data = 0
    for i, word in enumerate(words):
        if word & fmt.PAGE_DATA_RESERVED_MASK:
            raise body.error(f"reserved bits set in pfn[{i}]: {word:#018x}")
        type_bits = word >> fmt.PAGE_DATA_TYPE_SHIFT
        if type_bits in fmt.PAGE_TYPES_INVALID:
            raise body.error(f"invalid page type {type_bits:#x} in pfn[{i}]: {word:#018x}")
        with_data += fmt.page_type_has_data(type_bits)
    return with_data


def parse_page_data(body: BodyReader, ctx: ReadContext) -> PageDataRecord:
    """Parse a PAGE_DATA record, streaming its pages to ``ctx.on_page``."""
    hdr = _parse_struct(body, fmt.PAGE_DATA_HEADER, "page data header")
    if hdr.count == 0:
        raise body.error("PAGE_DATA count is 0 (spec: strictly > 0)")
    if hdr.reserved1:
        raise body.error(f"reserved field set: {hdr.reserved1:#x}")
    words = _words_from_le(body.read(fmt.PFN_ENTRY_SIZE * hdr.count, "pfn array"))
    with_data = _check_pfn_words(body, words)
    expected = fmt.PAGE_DATA_HEADER.sizeof() + len(words) * fmt.PFN_ENTRY_SIZE \
        + with_data * fmt.PAGE_SIZE
    if body.length != expected:
        raise body.error(f"length {body.length} does not match {hdr.count} pfns with "
                         f"{with_data} data pages (expected {expected})")
    _stream_pages(body, ctx, words)
    ctx.pages_with_data += with_data
    ctx.pages_without_data += len(words) - with_data
    return PageDataRecord(words)


def _stream_pages(body: BodyReader, ctx: ReadContext, words: array) -> None:
    view = memoryview(ctx.page_buffer)
    readonly = view.toreadonly()
    for word in words:
        type_bits = word >> fmt.PAGE_DATA_TYPE_SHIFT
        if not fmt.page_type_has_data(type_bits):
            continue
        body.readinto(view, f"page pfn {word & fmt.PAGE_DATA_PFN_MASK:#x}")
        if ctx.on_page is not None:
            ctx.on_page(word & fmt.PAGE_DATA_PFN_MASK, type_bits, readonly)


def emit_page_data(rec: Record, ctx: WriteContext) -> None:
    """Emit a PAGE_DATA record, pulling contents from ``ctx.get_pages`` (one call for
    the record) or else ``ctx.get_page`` (one call per page)."""
    assert isinstance(rec, PageDataRecord)
    header = fmt.PAGE_DATA_HEADER.build({"count": rec.count, "reserved1": 0})
    if ctx.get_pages is None:
        write_record(ctx.sink, rec.rtype, rec.body_length,
                     _page_chunks(rec, ctx, header))
        return
    pfns = rec.data_pfns
    write_record(ctx.sink, rec.rtype, rec.body_length_with(len(pfns)),
                 (header, _words_to_le(rec.words), _fetch_pages(ctx, pfns)))


def _fetch_pages(ctx: WriteContext, pfns: list[int]) -> BytesLike:
    if not pfns:
        return b""
    assert ctx.get_pages is not None
    data = ctx.get_pages(pfns)
    if len(data) != fmt.PAGE_SIZE * len(pfns):
        raise RecordError(f"get_pages({len(pfns)} pfns from {pfns[0]:#x}) returned "
                          f"{len(data)} bytes, expected {fmt.PAGE_SIZE * len(pfns)}",
                          offset=ctx.sink.offset, record="libxc record PAGE_DATA")
    ctx.pages_written += len(pfns)
    return data


def _page_chunks(rec: PageDataRecord, ctx: WriteContext, header: bytes) -> Iterator[BytesLike]:
    yield header
    yield _words_to_le(rec.words)
    for entry in rec:
        if entry.has_data:
            yield _fetch_page(ctx, entry)


def _fetch_page(ctx: WriteContext, entry: PageEntry) -> BytesLike:
    data = ctx.get_page(entry.pfn)
    if len(data) != fmt.PAGE_SIZE:
        raise RecordError(f"get_page({entry.pfn:#x}) returned {len(data)} bytes, "
                          f"expected {fmt.PAGE_SIZE}", offset=ctx.sink.offset,
                          record="libxc record PAGE_DATA")
    ctx.pages_written += 1
    return data


# ------------------------------------------------------------ x86 PV state


@dataclass(frozen=True, slots=True)
class X86PvInfoRecord:
    """X86_PV_INFO: guest width in bytes and page-table levels."""

    guest_width: int
    pt_levels: int
    rtype: ClassVar[int] = fmt.REC_X86_PV_INFO


def parse_x86_pv_info(body: BodyReader, ctx: ReadContext) -> X86PvInfoRecord:
    """Parse X86_PV_INFO."""
    _require_length(body, fmt.X86_PV_INFO.sizeof())
    raw = _parse_struct(body, fmt.X86_PV_INFO, "body")
    if raw.guest_width not in fmt.X86_PV_GUEST_WIDTHS:
        raise body.error(f"guest_width {raw.guest_width} not in {fmt.X86_PV_GUEST_WIDTHS}")
    if raw.pt_levels not in fmt.X86_PV_PT_LEVELS:
        raise body.error(f"pt_levels {raw.pt_levels} not in {fmt.X86_PV_PT_LEVELS}")
    _require_zero(body, raw.reserved1 | raw.reserved2)
    return X86PvInfoRecord(raw.guest_width, raw.pt_levels)


def emit_x86_pv_info(rec: Record, ctx: WriteContext) -> None:
    """Emit X86_PV_INFO."""
    assert isinstance(rec, X86PvInfoRecord)
    _emit_bytes(ctx, rec.rtype, fmt.X86_PV_INFO.build({
        "guest_width": rec.guest_width, "pt_levels": rec.pt_levels,
        "reserved1": 0, "reserved2": 0}))


@dataclass(frozen=True, slots=True)
class X86PvP2mFramesRecord:
    """X86_PV_P2M_FRAMES: pfns of the guest's p2m frames for pfns start..end."""

    start_pfn: int
    end_pfn: int
    p2m_pfns: tuple[int, ...]
    rtype: ClassVar[int] = fmt.REC_X86_PV_P2M_FRAMES


def parse_x86_pv_p2m_frames(body: BodyReader, ctx: ReadContext) -> X86PvP2mFramesRecord:
    """Parse X86_PV_P2M_FRAMES."""
    hdr_size = fmt.X86_PV_P2M_FRAMES_HEADER.sizeof()
    if body.length < hdr_size or body.length % 8:
        raise body.error(f"length must be >= {hdr_size} and a multiple of 8")
    hdr = _parse_struct(body, fmt.X86_PV_P2M_FRAMES_HEADER, "p2m frames header")
    frames = _words_from_le(body.read_rest())
    return X86PvP2mFramesRecord(hdr.start_pfn, hdr.end_pfn, tuple(frames))


def emit_x86_pv_p2m_frames(rec: Record, ctx: WriteContext) -> None:
    """Emit X86_PV_P2M_FRAMES."""
    assert isinstance(rec, X86PvP2mFramesRecord)
    hdr = fmt.X86_PV_P2M_FRAMES_HEADER.build({"start_pfn": rec.start_pfn,
                                              "end_pfn": rec.end_pfn})
    _emit_bytes(ctx, rec.rtype, hdr + _words_to_le(array("Q", rec.p2m_pfns)))


@dataclass(frozen=True, slots=True)
class X86PvVcpuRecord:
    """X86_PV_VCPU_{BASIC,EXTENDED,XSAVE,MSRS}: a per-vCPU domctl blob."""

    rtype: int
    vcpu_id: int
    context: bytes


def parse_x86_pv_vcpu(body: BodyReader, ctx: ReadContext) -> X86PvVcpuRecord:
    """Parse any of the four X86_PV_VCPU_* records."""
    hdr_size = fmt.X86_PV_VCPU_HEADER.sizeof()
    if body.length < hdr_size:
        raise body.error(f"length must be at least {hdr_size}")
    hdr = _parse_struct(body, fmt.X86_PV_VCPU_HEADER, "vcpu header")
    _require_zero(body, hdr.reserved1)
    if body.length == hdr_size:  # libxc spec, Errata 1 (Xen 4.6 - 4.8)
        ctx.log.warning("%s: empty vCPU context", body.frame.describe())
    return X86PvVcpuRecord(body.frame.rtype, hdr.vcpu_id, body.read_rest())


def emit_x86_pv_vcpu(rec: Record, ctx: WriteContext) -> None:
    """Emit any of the four X86_PV_VCPU_* records."""
    assert isinstance(rec, X86PvVcpuRecord)
    hdr = fmt.X86_PV_VCPU_HEADER.build({"vcpu_id": rec.vcpu_id, "reserved1": 0})
    write_record(ctx.sink, rec.rtype, len(hdr) + len(rec.context), (hdr, rec.context))


# -------------------------------------------------------- shared x86 state


@dataclass(frozen=True, slots=True)
class SharedInfoRecord:
    """SHARED_INFO: the shared info page, exactly one page."""

    data: bytes
    rtype: ClassVar[int] = fmt.REC_SHARED_INFO


def parse_shared_info(body: BodyReader, ctx: ReadContext) -> SharedInfoRecord:
    """Parse SHARED_INFO."""
    _require_length(body, fmt.SHARED_INFO_SIZE)
    return SharedInfoRecord(body.read_rest())


def emit_shared_info(rec: Record, ctx: WriteContext) -> None:
    """Emit SHARED_INFO."""
    assert isinstance(rec, SharedInfoRecord)
    _emit_bytes(ctx, rec.rtype, rec.data)


@dataclass(frozen=True, slots=True)
class X86TscInfoRecord:
    """X86_TSC_INFO: XEN_DOMCTL_{get,set}tscinfo."""

    mode: int
    khz: int
    nsec: int
    incarnation: int
    rtype: ClassVar[int] = fmt.REC_X86_TSC_INFO


def parse_x86_tsc_info(body: BodyReader, ctx: ReadContext) -> X86TscInfoRecord:
    """Parse X86_TSC_INFO."""
    _require_length(body, fmt.X86_TSC_INFO.sizeof())
    raw = _parse_struct(body, fmt.X86_TSC_INFO, "body")
    _require_zero(body, raw.reserved1)
    return X86TscInfoRecord(raw.mode, raw.khz, raw.nsec, raw.incarnation)


def emit_x86_tsc_info(rec: Record, ctx: WriteContext) -> None:
    """Emit X86_TSC_INFO."""
    assert isinstance(rec, X86TscInfoRecord)
    _emit_bytes(ctx, rec.rtype, fmt.X86_TSC_INFO.build({
        "mode": rec.mode, "khz": rec.khz, "nsec": rec.nsec,
        "incarnation": rec.incarnation, "reserved1": 0}))


class CpuidLeaf(NamedTuple):
    """``xen_cpuid_leaf_t``."""

    leaf: int
    subleaf: int
    a: int
    b: int
    c: int
    d: int


class MsrEntry(NamedTuple):
    """``xen_msr_entry_t``."""

    idx: int
    flags: int
    val: int


@dataclass(frozen=True, slots=True)
class X86CpuidPolicyRecord:
    """X86_CPUID_POLICY: the domain's serialised CPUID policy."""

    leaves: tuple[CpuidLeaf, ...]
    rtype: ClassVar[int] = fmt.REC_X86_CPUID_POLICY


@dataclass(frozen=True, slots=True)
class X86MsrPolicyRecord:
    """X86_MSR_POLICY: the domain's serialised MSR policy."""

    entries: tuple[MsrEntry, ...]
    rtype: ClassVar[int] = fmt.REC_X86_MSR_POLICY


def _parse_array(body: BodyReader, item: Struct, what: str) -> list:
    size = item.sizeof()
    if body.length == 0 or body.length % size:
        raise body.error(f"length must be a non-zero multiple of {size} ({what})")
    raw = body.read_rest()
    return [item.parse(raw[i:i + size]) for i in range(0, len(raw), size)]


def parse_x86_cpuid_policy(body: BodyReader, ctx: ReadContext) -> X86CpuidPolicyRecord:
    """Parse X86_CPUID_POLICY."""
    items = _parse_array(body, fmt.X86_CPUID_LEAF, "xen_cpuid_leaf_t")
    return X86CpuidPolicyRecord(tuple(
        CpuidLeaf(i.leaf, i.subleaf, i.a, i.b, i.c, i.d) for i in items))


def parse_x86_msr_policy(body: BodyReader, ctx: ReadContext) -> X86MsrPolicyRecord:
    """Parse X86_MSR_POLICY."""
    items = _parse_array(body, fmt.X86_MSR_ENTRY, "xen_msr_entry_t")
    return X86MsrPolicyRecord(tuple(MsrEntry(i.idx, i.flags, i.val) for i in items))


def emit_x86_cpuid_policy(rec: Record, ctx: WriteContext) -> None:
    """Emit X86_CPUID_POLICY."""
    assert isinstance(rec, X86CpuidPolicyRecord)
    _emit_bytes(ctx, rec.rtype, b"".join(
        fmt.X86_CPUID_LEAF.build(leaf._asdict()) for leaf in rec.leaves))


def emit_x86_msr_policy(rec: Record, ctx: WriteContext) -> None:
    """Emit X86_MSR_POLICY."""
    assert isinstance(rec, X86MsrPolicyRecord)
    _emit_bytes(ctx, rec.rtype, b"".join(
        fmt.X86_MSR_ENTRY.build(entry._asdict()) for entry in rec.entries))


# -------------------------------------------------------------- HVM state


@dataclass(frozen=True, slots=True)
class HvmContextRecord:
    """HVM_CONTEXT: opaque XEN_DOMCTL_gethvmcontext blob."""

    data: bytes
    rtype: ClassVar[int] = fmt.REC_HVM_CONTEXT


def parse_hvm_context(body: BodyReader, ctx: ReadContext) -> HvmContextRecord:
    """Parse HVM_CONTEXT."""
    if not body.length:
        raise body.error("zero-length HVM context")
    return HvmContextRecord(body.read_rest())


def emit_hvm_context(rec: Record, ctx: WriteContext) -> None:
    """Emit HVM_CONTEXT."""
    assert isinstance(rec, HvmContextRecord)
    _emit_bytes(ctx, rec.rtype, rec.data)


@dataclass(frozen=True, slots=True)
class HvmParamsRecord:
    """HVM_PARAMS: ``(index, value)`` pairs."""

    params: tuple[tuple[int, int], ...]
    rtype: ClassVar[int] = fmt.REC_HVM_PARAMS


def parse_hvm_params(body: BodyReader, ctx: ReadContext) -> HvmParamsRecord:
    """Parse HVM_PARAMS."""
    hdr_size, entry_size = fmt.HVM_PARAMS_HEADER.sizeof(), fmt.HVM_PARAMS_ENTRY.sizeof()
    if body.length < hdr_size:
        raise body.error(f"length must be at least {hdr_size}")
    hdr = _parse_struct(body, fmt.HVM_PARAMS_HEADER, "params header")
    _require_zero(body, hdr.reserved1)
    if body.length != hdr_size + hdr.count * entry_size:
        raise body.error(f"length does not match count {hdr.count}")
    raw = body.read_rest()
    entries = (fmt.HVM_PARAMS_ENTRY.parse(raw[i:i + entry_size])
               for i in range(0, len(raw), entry_size))
    return HvmParamsRecord(tuple((e.index, e.value) for e in entries))


def emit_hvm_params(rec: Record, ctx: WriteContext) -> None:
    """Emit HVM_PARAMS."""
    assert isinstance(rec, HvmParamsRecord)
    hdr = fmt.HVM_PARAMS_HEADER.build({"count": len(rec.params), "reserved1": 0})
    _emit_bytes(ctx, rec.rtype, hdr + b"".join(
        fmt.HVM_PARAMS_ENTRY.build({"index": i, "value": v}) for i, v in rec.params))


# ------------------------------------------------- known but unsupported


def _unsupported(reason: str) -> Codec:
    def parse(body: BodyReader, ctx: ReadContext) -> Record:
        raise body.error(reason)

    def emit(rec: Record, ctx: WriteContext) -> None:
        raise RecordError(reason, offset=ctx.sink.offset,
                          record=f"libxc record {fmt.libxc_record_name(rec.rtype)}")

    return Codec(parse, emit)


# ----------------------------------------------------------------- helpers


def _parse_struct(body: BodyReader, struct: Struct, what: str):
    return struct.parse(body.read(struct.sizeof(), what))


def _require_length(body: BodyReader, expected: int) -> None:
    if body.length != expected:
        raise body.error(f"length must be exactly {expected}")


def _require_zero(body: BodyReader, reserved: int) -> None:
    if reserved:
        raise body.error(f"reserved field(s) set: {reserved:#x}")


def _emit_bytes(ctx: WriteContext, rtype: int, body: bytes) -> None:
    write_record(ctx.sink, rtype, len(body), (body,))


_VCPU = Codec(parse_x86_pv_vcpu, emit_x86_pv_vcpu)

CODECS: dict[int, Codec] = {
    fmt.REC_END: EMPTY,
    fmt.REC_PAGE_DATA: Codec(parse_page_data, emit_page_data),
    fmt.REC_X86_PV_INFO: Codec(parse_x86_pv_info, emit_x86_pv_info),
    fmt.REC_X86_PV_P2M_FRAMES: Codec(parse_x86_pv_p2m_frames, emit_x86_pv_p2m_frames),
    fmt.REC_X86_PV_VCPU_BASIC: _VCPU,
    fmt.REC_X86_PV_VCPU_EXTENDED: _VCPU,
    fmt.REC_X86_PV_VCPU_XSAVE: _VCPU,
    fmt.REC_X86_PV_VCPU_MSRS: _VCPU,
    fmt.REC_SHARED_INFO: Codec(parse_shared_info, emit_shared_info),
    fmt.REC_X86_TSC_INFO: Codec(parse_x86_tsc_info, emit_x86_tsc_info),
    fmt.REC_HVM_CONTEXT: Codec(parse_hvm_context, emit_hvm_context),
    fmt.REC_HVM_PARAMS: Codec(parse_hvm_params, emit_hvm_params),
    fmt.REC_TOOLSTACK: _unsupported("TOOLSTACK is deprecated and rejected by Xen 4.17"),
    fmt.REC_VERIFY: EMPTY,
    fmt.REC_CHECKPOINT: _unsupported("checkpointed (Remus/COLO) streams are not "
                                      "supported; 'xl save' writes plain streams"),
    fmt.REC_CHECKPOINT_DIRTY_PFN_LIST: _unsupported(
        "CHECKPOINT_DIRTY_PFN_LIST only travels on the COLO back channel"),
    fmt.REC_STATIC_DATA_END: EMPTY,
    fmt.REC_X86_CPUID_POLICY: Codec(parse_x86_cpuid_policy, emit_x86_cpuid_policy),
    fmt.REC_X86_MSR_POLICY: Codec(parse_x86_msr_policy, emit_x86_msr_policy),
}
"""Registry: libxc record type -> (parse, emit)."""
