"""Regenerate a save stream from a :class:`Stream` plus a page source.

The exact inverse of :mod:`.reader`: for any stream ``s`` accepted by the
reader, ``write_stream(parse(s), get_page=pages)`` reproduces ``s`` byte for
byte when ``get_page(pfn)`` returns the contents seen by ``on_page``. Output is
written sequentially through a bounded buffer; page contents are requested
one at a time (or one PAGE_DATA batch at a time, at most 4 MiB, through
``get_pages``), in stream order, so a FIFO feeding ``xl restore`` works and
memory stays bounded. Layouts: see :mod:`.format` and the specs it cites.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from xenpbr.stream import headers, libxc_records, libxl_records
from xenpbr.stream.codec import (Codec, PageBatchSource, PageSource, Record, WriteContext,
                                 codec_for_record)
from xenpbr.stream.format import REC_END
from xenpbr.stream.framing import Sink
from xenpbr.stream.model import LibxcImage, LibxlStream, Stream

_LOG = logging.getLogger(__name__)


def write_stream(fileobj: BinaryIO, stream: Stream, get_page: PageSource, *,
                 get_pages: PageBatchSource | None = None,
                 logger: logging.Logger | None = None) -> int:
    """Write ``stream`` to ``fileobj``; return the number of bytes written.

    :param get_page: ``get_page(pfn) -> bytes`` (exactly 4096 bytes) for every
        data-carrying pfn of every PAGE_DATA record, called in stream order.
    :param get_pages: if given, called instead of ``get_page`` once per PAGE_DATA
        record with its data-carrying pfns, in stream order.
    """
    log = logger or _LOG
    ctx: WriteContext[LibxcImage] = WriteContext(Sink(fileobj), log, get_page,
                                                 get_pages=get_pages)
    ctx.write_libxc = lambda image: _write_libxc(ctx, image)
    _write(ctx, stream)
    ctx.sink.flush()
    log.info("stream written: %d bytes, %d pages", ctx.sink.offset, ctx.pages_written)
    return ctx.sink.offset


def _write(ctx: WriteContext[LibxcImage], stream: Stream) -> None:
    if stream.xl_header is not None:
        if stream.libxl is None:
            raise ValueError("an xl-format stream needs a libxl stream")
        headers.write_xl_header(ctx.sink, stream.xl_header)
    if stream.libxl is not None:
        _write_libxl(ctx, stream.libxl)
    elif stream.bare_libxc is not None:
        _write_libxc(ctx, stream.bare_libxc)
    else:
        raise ValueError("stream has neither a libxl stream nor a libxc image")


def _write_libxl(ctx: WriteContext[LibxcImage], libxl: LibxlStream) -> None:
    headers.write_libxl_header(ctx.sink, libxl.header)
    _write_records(ctx, libxl_records.CODECS, libxl.records, "libxl")


def _write_libxc(ctx: WriteContext[LibxcImage], image: LibxcImage) -> None:
    headers.write_image_header(ctx.sink, image.image_header)
    headers.write_domain_header(ctx.sink, image.domain_header)
    _write_records(ctx, libxc_records.CODECS, image.records, "libxc")


def _write_records(ctx: WriteContext[LibxcImage], codecs: Mapping[int, Codec],
                   records: Sequence[Record], family: str) -> None:
    ends = [i for i, r in enumerate(records) if r.rtype == REC_END]
    if ends != [len(records) - 1]:
        raise ValueError(f"{family} records must end with exactly one END record "
                         f"(END at positions {ends} of {len(records)})")
    for record in records:
        codec_for_record(codecs, record).emit(record, ctx)
