"""Parse an ``xl save`` file (or a bare libxl / libxc stream) into a :class:`Stream`.

Layering, outermost first (see ``docs/specs/migration-stream.md``):
xl header + config (``tools/xl/xl.h``), libxl stream (libxl-migration-stream.pandoc),
and inside its LIBXC_CONTEXT record the libxc image (libxc-migration-stream.pandoc).

The input is read strictly sequentially (FIFOs and pipes work). Page contents
are not kept: each data-carrying page is passed to ``on_page`` as a read-only
4 KiB ``memoryview`` that is only valid during the call, so memory use is
bounded by the largest non-PAGE_DATA record plus 8 bytes per pfn of metadata.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from xenpbr.stream import format as fmt
from xenpbr.stream import headers, libxc_records, libxl_records
from xenpbr.stream.codec import (
    Codec,
    PageVisitor,
    ReadContext,
    Record,
    RecordVisitor,
    codec_for_frame,
)
from xenpbr.stream.errors import StreamError
from xenpbr.stream.framing import Source, read_frame, read_record
from xenpbr.stream.model import LibxcImage, LibxlStream, Stream

_LOG = logging.getLogger(__name__)
FORMATS = ("xl", "libxl", "libxc")


@dataclass(frozen=True, slots=True)
class ReadLimits:
    """Sanity bounds applied while reading untrusted input."""

    max_record_length: int = fmt.REC_LENGTH_MAX
    max_xl_optional_data: int = fmt.XL_OPTIONAL_DATA_MAX


def read_stream(fileobj: BinaryIO, *, stream_format: str = "xl",
                on_page: PageVisitor | None = None,
                on_record: RecordVisitor | None = None,
                logger: logging.Logger | None = None,
                limits: ReadLimits = ReadLimits(),
                require_eof: bool = True) -> Stream:
    """Read a whole stream from ``fileobj`` (sequential reads only).

    :param stream_format: ``"xl"`` (an ``xl save`` file, default), ``"libxl"`` or
        ``"libxc"``, as in ``verify-stream-v2 -f``.
    :param on_page: ``on_page(pfn, type_bits, data)`` for every page carrying
        data, in stream order; pages of type XTAB/BROKEN/XALLOC are only listed
        in their :class:`~.libxc_records.PageDataRecord`.
    :param on_record: ``on_record(family, record)`` after each record
        (``family`` is ``"libxl"`` or ``"libxc"``); for LIBXC_CONTEXT that is
        after the whole nested libxc image.
    :param require_eof: after the final END, insist on end of input (on a FIFO
        this waits for the writer to close it, as ``xl save`` does when done).
    :raises StreamError, RecordError: see :mod:`.errors`.
    """
    if stream_format not in FORMATS:
        raise ValueError(f"stream_format must be one of {FORMATS}, not {stream_format!r}")
    log = logger or _LOG
    src = Source(fileobj)
    ctx: ReadContext[LibxcImage] = ReadContext(src, log, on_page=on_page, on_record=on_record)
    reader = _Reader(ctx, limits)
    ctx.read_libxc = reader.read_libxc_image
    stream = reader.read(stream_format)
    if require_eof and not src.at_eof():
        raise StreamError("trailing data after the final END record", offset=src.offset - 1)
    log.info("stream parsed: %d bytes, %d pages with data, %d without",
             src.offset, ctx.pages_with_data, ctx.pages_without_data)
    return stream


class _Reader:
    """The per-layer loops; records are dispatched only through the registries."""

    def __init__(self, ctx: ReadContext[LibxcImage], limits: ReadLimits) -> None:
        self.ctx = ctx
        self.limits = limits

    def read(self, stream_format: str) -> Stream:
        src, log = self.ctx.src, self.ctx.log
        if stream_format == "libxc":
            return Stream(bare_libxc=self.read_libxc_image())
        xl_header = None
        if stream_format == "xl":
            xl_header = headers.read_xl_header(src, log, self.limits.max_xl_optional_data)
        return Stream(xl_header=xl_header, libxl=self.read_libxl())

    def read_libxl(self) -> LibxlStream:
        """libxl header, then libxl records up to and including END."""
        header = headers.read_libxl_header(self.ctx.src, self.ctx.log)
        records = self._read_records("libxl", libxl_records.CODECS, fmt.libxl_record_name)
        return LibxlStream(header, records)

    def read_libxc_image(self) -> LibxcImage:
        """libxc image header, domain header, records up to and including END."""
        src, log = self.ctx.src, self.ctx.log
        image_header = headers.read_image_header(src, log)
        domain_header = headers.read_domain_header(src, log)
        records = self._read_records("libxc", libxc_records.CODECS, fmt.libxc_record_name)
        return LibxcImage(image_header, domain_header, records)

    def _read_records(self, family: str, codecs: Mapping[int, Codec],
                      names: Callable[[int], str]) -> list[Record]:
        records: list[Record] = []
        while True:
            frame = read_frame(self.ctx.src, family, len(records), names,
                               self.limits.max_record_length)
            codec = codec_for_frame(codecs, frame, self.ctx.log)
            record = read_record(self.ctx.src, frame, codec.parse, self.ctx)
            self.ctx.log.debug("%s at offset %#x", frame.describe(), frame.offset)
            records.append(record)
            if self.ctx.on_record is not None:
                self.ctx.on_record(family, record)
            if frame.rtype == fmt.REC_END:  # END is type 0 in both layers
                self._log_summary(family, records, names)
                return records

    def _log_summary(self, family: str, records: list[Record],
                     names: Callable[[int], str]) -> None:
        counts = Counter(names(r.rtype) for r in records)
        self.ctx.log.info("%s: %d records (%s)", family, len(records),
                          ", ".join(f"{n} x{c}" for n, c in counts.items()))
