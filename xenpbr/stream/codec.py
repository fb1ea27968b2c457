"""Record registry plumbing shared by the libxl and libxc record families.

Each family module (:mod:`.libxc_records`, :mod:`.libxl_records`) exposes a
``CODECS`` mapping ``record type -> Codec(parse, emit)``; the reader and writer
loops only consult such a mapping through :func:`codec_for_frame` and
:func:`codec_for_record`. Per the "Records" sections of both specs, records
with bit 31 set are optional: unknown optional records are kept as
:class:`OpaqueRecord` (and round-trip byte for byte); unknown mandatory ones
are rejected, as a Xen restore would.

The codec does not know the stream model (:mod:`.model`): the libxc image nested in a
libxl LIBXC_CONTEXT record travels through :class:`ReadContext` / :class:`WriteContext`
as a type parameter (``ImageT``), filled in by the reader and writer, so the model can
build on the records without the records building on the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from xenpbr.stream import format as fmt
from xenpbr.stream.errors import StreamError
from xenpbr.stream.framing import BodyReader, BytesLike, RecordFrame, Sink, Source, write_record

PageVisitor = Callable[[int, int, memoryview], None]
"""``on_page(pfn, type_bits, data)``: ``type_bits`` is the 4-bit PFINFO nibble
(``format.PAGE_TYPE_*``), ``data`` a read-only 4 KiB view valid only during the
call (copy or hash it, do not keep it)."""
PageSource = Callable[[int], BytesLike]
"""``get_page(pfn) -> 4096 bytes``: supplies page contents when writing."""
PageBatchSource = Callable[[list[int]], BytesLike]
"""``get_pages(pfns) -> 4096 * len(pfns) bytes``: the data pages of one PAGE_DATA
record at once, in record order. Optional: a source that can serve a whole batch
saves the per-page calls, which dominate regeneration in Python (docs/images.md)."""


class Record(Protocol):
    """Anything with a record type; every record dataclass satisfies this."""

    @property
    def rtype(self) -> int: ...


RecordVisitor = Callable[[str, Record], None]
"""``on_record(family, record)``: called after each record is parsed."""

ImageT = TypeVar("ImageT")
"""The nested libxc image type (:class:`.model.LibxcImage`), unknown to the codec."""


@dataclass(slots=True)
class ReadContext(Generic[ImageT]):
    """State shared by the parse functions while reading one stream."""

    src: Source
    log: logging.Logger
    on_page: PageVisitor | None = None
    on_record: RecordVisitor | None = None
    read_libxc: Callable[[], ImageT] | None = None  # nested libxc image
    page_buffer: bytearray = field(default_factory=lambda: bytearray(fmt.PAGE_SIZE))
    pages_with_data: int = 0
    pages_without_data: int = 0


@dataclass(slots=True)
class WriteContext(Generic[ImageT]):
    """State shared by the emit functions while writing one stream."""

    sink: Sink
    log: logging.Logger
    get_page: PageSource
    write_libxc: Callable[[ImageT], None] | None = None
    pages_written: int = 0
    get_pages: PageBatchSource | None = None


class Codec(NamedTuple):
    """How to parse a record body and how to emit a record of one type."""

    parse: Callable[[BodyReader, ReadContext[Any]], Record]
    emit: Callable[[Record, WriteContext[Any]], None]


@dataclass(frozen=True, slots=True)
class EmptyRecord:
    """A record with no body: END, STATIC_DATA_END, VERIFY, CHECKPOINT_END ..."""

    rtype: int


@dataclass(frozen=True, slots=True)
class OpaqueRecord:
    """An unknown optional record, kept verbatim so that it round-trips."""

    rtype: int
    body: bytes


def parse_empty(body: BodyReader, ctx: ReadContext) -> EmptyRecord:
    """Parse a record whose body must be empty."""
    if body.length:
        raise body.error("record must have an empty body")
    return EmptyRecord(body.frame.rtype)


def emit_empty(rec: Record, ctx: WriteContext) -> None:
    """Emit a body-less record."""
    write_record(ctx.sink, rec.rtype, 0, ())


def parse_opaque(body: BodyReader, ctx: ReadContext) -> OpaqueRecord:
    """Keep an unknown optional record's body verbatim."""
    return OpaqueRecord(body.frame.rtype, body.read_rest())


def emit_opaque(rec: Record, ctx: WriteContext) -> None:
    """Emit an :class:`OpaqueRecord` verbatim."""
    assert isinstance(rec, OpaqueRecord)
    write_record(ctx.sink, rec.rtype, len(rec.body), (rec.body,))


OPAQUE = Codec(parse_opaque, emit_opaque)
EMPTY = Codec(parse_empty, emit_empty)


def codec_for_frame(codecs: Mapping[int, Codec], frame: RecordFrame, log: logging.Logger) -> Codec:
    """Pick the codec for a record just read; reject unknown mandatory records."""
    codec = codecs.get(frame.rtype)
    if codec is not None:
        return codec
    if fmt.is_optional(frame.rtype):
        log.warning("%s at offset %#x: unknown optional record, kept opaque",
                    frame.describe(), frame.offset)
        return OPAQUE
    raise StreamError("unknown mandatory record type; a Xen 4.17 restore would fail too",
                      offset=frame.offset, record=frame.describe())


def codec_for_record(codecs: Mapping[int, Codec], rec: Record) -> Codec:
    """Pick the codec that emits ``rec``."""
    if isinstance(rec, OpaqueRecord):
        return OPAQUE
    codec = codecs.get(rec.rtype)
    if codec is None:
        raise RuntimeError(f"no codec for record {rec!r}; use OpaqueRecord for "
                           "unknown optional records")
    return codec
