"""The page-free stream model (:class:`~xenpbr.stream.Stream`) to and from plain JSON.

An image stores everything of the ``xl save`` stream except page contents: the
*skeleton*. It must be serialised safely (the store never executes what it reads, so
no pickle) and exactly (restore regenerates the stream byte for byte).

Rather than one hand-written ``to_dict`` per record class, each record is stored as
its **wire body**, produced by the codec's own ``emit`` and read back by the codec's
own ``parse``. That reuses the codec's validation, keeps unknown optional records
(``OpaqueRecord``) working, and cannot drift from the codec when record types are
added. Two records are special: PAGE_DATA keeps only its pfn words (contents live in
the page store) and LIBXC_CONTEXT nests a libxc image. The four headers are checked
by a round trip through the codec's header reader.

JSON layout (version 1)::

    {"version": 1, "format": "xl"|"libxl"|"libxc",
     "xl_header": {"mandatory_flags", "optional_flags", "optional_data": b64} | null,
     "libxl": {"header": {"version", "options"}, "records": [REC...]} | null,
     "bare_libxc": IMAGE | null}
    IMAGE = {"image_header": {"version", "options"},
             "domain_header": {"guest_type", "xen_major", "xen_minor", "page_shift"},
             "records": [REC...]}
    REC   = {"rtype": int, "body": b64}                     any record
          | {"rtype": 1, "words": b64 of u64 LE pfn words}  libxc PAGE_DATA
          | {"rtype": 1, "libxc": IMAGE}                     libxl LIBXC_CONTEXT
"""

from __future__ import annotations

import base64
import io
import json
import logging
import sys
from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from construct import ConstructError

from xenpbr.images.errors import ImageInvalid
from xenpbr.stream import format as fmt
from xenpbr.stream import headers, libxc_records, libxl_records
from xenpbr.stream.codec import (
    Codec,
    ReadContext,
    Record,
    WriteContext,
    codec_for_frame,
    codec_for_record,
)
from xenpbr.stream.errors import StreamCodecError
from xenpbr.stream.framing import BodyReader, RecordFrame, Sink, Source
from xenpbr.stream.headers import DomainHeader, ImageHeader, LibxlHeader, XlHeader
from xenpbr.stream.libxc_records import PageDataRecord
from xenpbr.stream.libxl_records import LibxcContextRecord
from xenpbr.stream.model import LibxcImage, LibxlStream, Stream

_LOG = logging.getLogger(__name__)
VERSION = 1
_RECORD_HEADER = fmt.RECORD_HEADER.sizeof()
_NO_DATA_TYPES = fmt.PAGE_TYPES_WITHOUT_DATA


class SkeletonError(ImageInvalid):
    """The stored skeleton does not describe a valid stream."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise SkeletonError(f"skeleton: {what} is not a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as err:
        raise SkeletonError(f"skeleton: {what} is not valid base64: {err}") from err


# ------------------------------------------------------------------- encoding


class _Encoder:
    """Walks a model; ``length`` ends up as the byte length of the wire stream."""

    def __init__(self) -> None:
        self.length = 0

    def stream(self, s: Stream) -> dict[str, Any]:
        out: dict[str, Any] = {"version": VERSION, "format": s.format, "xl_header": None,
                               "libxl": None, "bare_libxc": None}
        if s.xl_header is not None:
            out["xl_header"] = {"mandatory_flags": s.xl_header.mandatory_flags,
                                "optional_flags": s.xl_header.optional_flags,
                                "optional_data": _b64(s.xl_header.optional_data)}
            self.length += fmt.XL_HEADER.sizeof() + len(s.xl_header.optional_data)
        if s.libxl is not None:
            out["libxl"] = self.libxl(s.libxl)
        elif s.bare_libxc is not None:
            out["bare_libxc"] = self.image(s.bare_libxc)
        return out

    def libxl(self, libxl: LibxlStream) -> dict[str, Any]:
        self.length += fmt.LIBXL_HEADER.sizeof()
        records = []
        for rec in libxl.records:
            if isinstance(rec, LibxcContextRecord):
                self.length += _RECORD_HEADER
                records.append({"rtype": rec.rtype, "libxc": self.image(rec.image)})
            else:
                records.append(self.generic(libxl_records.CODECS, rec))
        return {"header": {"version": libxl.header.version, "options": libxl.header.options},
                "records": records}

    def image(self, image: LibxcImage) -> dict[str, Any]:
        self.length += fmt.IMAGE_HEADER.sizeof() + fmt.DOMAIN_HEADER.sizeof()
        records = []
        for rec in image.records:
            if isinstance(rec, PageDataRecord):
                self.length += _RECORD_HEADER + fmt.padded_length(rec.body_length)
                records.append({"rtype": rec.rtype, "words": _b64(_words_le(rec.words))})
            else:
                records.append(self.generic(libxc_records.CODECS, rec))
        ih, dh = image.image_header, image.domain_header
        return {"image_header": {"version": ih.version, "options": ih.options},
                "domain_header": {"guest_type": dh.guest_type, "xen_major": dh.xen_major,
                                  "xen_minor": dh.xen_minor, "page_shift": dh.page_shift},
                "records": records}

    def generic(self, codecs: Mapping[int, Codec], rec: Record) -> dict[str, Any]:
        body = record_body(codecs, rec)
        self.length += _RECORD_HEADER + fmt.padded_length(len(body))
        return {"rtype": rec.rtype, "body": _b64(body)}


def _words_le(words: array) -> bytes:
    if sys.byteorder == "little":
        return words.tobytes()
    swapped = array("Q", words)
    swapped.byteswap()
    return swapped.tobytes()


def _no_pages(pfn: int) -> bytes:
    raise RuntimeError(f"skeleton encoding asked for page {pfn:#x}")


def record_body(codecs: Mapping[int, Codec], rec: Record) -> bytes:
    """A record's wire body, as the codec's emitter writes it (header/padding stripped)."""
    buf = io.BytesIO()
    sink = Sink(buf)
    codec_for_record(codecs, rec).emit(rec, WriteContext(sink, _LOG, _no_pages))
    sink.flush()
    raw = buf.getvalue()
    length = fmt.RECORD_HEADER.parse(raw[:_RECORD_HEADER]).length
    return raw[_RECORD_HEADER:_RECORD_HEADER + length]


def encode(stream: Stream) -> tuple[bytes, int]:
    """Serialise the model; return ``(UTF-8 JSON, length of the wire stream)``."""
    enc = _Encoder()
    tree = enc.stream(stream)
    return json.dumps(tree, separators=(",", ":")).encode(), enc.length


# ------------------------------------------------------------------- decoding


def _field(obj: Any, key: str, what: str, kind: type = int) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise SkeletonError(f"skeleton: {what} lacks {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SkeletonError(f"skeleton: {what}.{key} has type {type(value).__name__}")
    return value


def _via_codec(write: Callable[[Sink, Any], None], read: Callable[..., Any], value: Any,
               what: str) -> Any:
    """Round-trip a header through the codec so it gets the wire format's checks."""
    buf = io.BytesIO()
    sink = Sink(buf)
    try:
        write(sink, value)
        sink.flush()
        return read(Source(io.BytesIO(buf.getvalue())), _LOG)
    except (StreamCodecError, ConstructError, ValueError, OverflowError) as err:
        raise SkeletonError(f"skeleton: invalid {what}: {err}") from err


class _Decoder:
    def stream(self, tree: Any) -> Stream:
        if _field(tree, "version", "skeleton") != VERSION:
            raise SkeletonError(f"skeleton version {tree['version']} is not {VERSION}")
        fmt_name = _field(tree, "format", "skeleton", str)
        xl_header = None
        if tree.get("xl_header") is not None:
            xl_header = self.xl_header(tree["xl_header"])
        libxl = self.libxl(tree["libxl"]) if tree.get("libxl") is not None else None
        bare = self.image(tree["bare_libxc"]) if tree.get("bare_libxc") is not None else None
        stream = Stream(xl_header, libxl, bare)
        if (libxl is None) == (bare is None) or stream.format != fmt_name:
            raise SkeletonError(f"skeleton: inconsistent layers for format {fmt_name!r}")
        return stream

    def xl_header(self, obj: Any) -> XlHeader:
        hdr = XlHeader(_field(obj, "mandatory_flags", "xl_header"),
                       _field(obj, "optional_flags", "xl_header"),
                       _unb64(obj.get("optional_data"), "xl_header.optional_data"))
        return _via_codec(headers.write_xl_header, headers.read_xl_header, hdr, "xl header")

    def libxl(self, obj: Any) -> LibxlStream:
        h = _field(obj, "header", "libxl", dict)
        hdr = LibxlHeader(_field(h, "version", "libxl.header"), _field(h, "options", "libxl.header"))
        hdr = _via_codec(headers.write_libxl_header, headers.read_libxl_header, hdr, "libxl header")
        records: list[Record] = []
        for i, rec in enumerate(_field(obj, "records", "libxl", list)):
            if isinstance(rec, dict) and "libxc" in rec:
                if _field(rec, "rtype", "libxl record") != fmt.LIBXL_REC_LIBXC_CONTEXT:
                    raise SkeletonError(f"skeleton: libxl record #{i} nests an image but "
                                        "is not LIBXC_CONTEXT")
                records.append(LibxcContextRecord(self.image(rec["libxc"])))
            else:
                records.append(self.generic("libxl", libxl_records.CODECS,
                                            fmt.libxl_record_name, i, rec,
                                            fmt.LIBXL_REC_LIBXC_CONTEXT))
        _check_end("libxl", records)
        return LibxlStream(hdr, records)

    def image(self, obj: Any) -> LibxcImage:
        ih = _field(obj, "image_header", "libxc image", dict)
        dh = _field(obj, "domain_header", "libxc image", dict)
        image_header = _via_codec(headers.write_image_header, headers.read_image_header,
                                  ImageHeader(_field(ih, "version", "image_header"),
                                              _field(ih, "options", "image_header")),
                                  "libxc image header")
        domain_header = _via_codec(
            headers.write_domain_header, headers.read_domain_header,
            DomainHeader(_field(dh, "guest_type", "domain_header"),
                         _field(dh, "xen_major", "domain_header"),
                         _field(dh, "xen_minor", "domain_header"),
                         _field(dh, "page_shift", "domain_header")), "libxc domain header")
        records: list[Record] = []
        for i, rec in enumerate(_field(obj, "records", "libxc image", list)):
            if isinstance(rec, dict) and "words" in rec:
                records.append(self.page_data(i, rec))
            else:
                records.append(self.generic("libxc", libxc_records.CODECS,
                                            fmt.libxc_record_name, i, rec, fmt.REC_PAGE_DATA))
        _check_end("libxc", records)
        return LibxcImage(image_header, domain_header, records)

    def page_data(self, index: int, rec: dict[str, Any]) -> PageDataRecord:
        if _field(rec, "rtype", "libxc record") != fmt.REC_PAGE_DATA:
            raise SkeletonError(f"skeleton: libxc record #{index} has pfn words but is "
                                "not PAGE_DATA")
        raw = _unb64(rec["words"], f"libxc record #{index} words")
        if not raw or len(raw) % fmt.PFN_ENTRY_SIZE:
            raise SkeletonError(f"skeleton: libxc record #{index}: {len(raw)} bytes of pfn words")
        words = array("Q")
        words.frombytes(raw)
        if sys.byteorder != "little":
            words.byteswap()
        for word in words:
            if word & fmt.PAGE_DATA_RESERVED_MASK or \
                    word >> fmt.PAGE_DATA_TYPE_SHIFT in fmt.PAGE_TYPES_INVALID:
                raise SkeletonError(f"skeleton: libxc record #{index}: invalid pfn word "
                                    f"{word:#018x}")
        return PageDataRecord(words)

    def generic(self, family: str, codecs: Mapping[int, Codec], names: Callable[[int], str],
                index: int, rec: Any, special: int) -> Record:
        rtype = _field(rec, "rtype", f"{family} record #{index}")
        if rtype == special or not 0 <= rtype <= 0xFFFFFFFF:
            raise SkeletonError(f"skeleton: {family} record #{index}: type {rtype:#x} "
                                "cannot be stored as a plain body")
        body = _unb64(rec.get("body"), f"{family} record #{index} body")
        return parse_body(family, codecs, names, index, rtype, body)


def parse_body(family: str, codecs: Mapping[int, Codec], names: Callable[[int], str],
               index: int, rtype: int, body: bytes) -> Record:
    """Parse a stored wire body with the codec's own parser (and its checks)."""
    src = Source(io.BytesIO(body))
    frame = RecordFrame(family, index, rtype, len(body), 0, names(rtype))
    try:
        codec = codec_for_frame(codecs, frame, _LOG)
        reader = BodyReader(src, frame)
        rec = codec.parse(reader, ReadContext(src, _LOG))
    except StreamCodecError as err:
        raise SkeletonError(f"skeleton: {err}") from err
    if reader.remaining:
        raise SkeletonError(f"skeleton: {frame.describe()}: {reader.remaining} bytes unparsed")
    return rec


def _check_end(family: str, records: list[Record]) -> None:
    ends = [i for i, r in enumerate(records) if r.rtype == fmt.REC_END]
    if ends != [len(records) - 1]:
        raise SkeletonError(f"skeleton: {family} records must end with exactly one END")


def decode(data: bytes) -> Stream:
    """Parse skeleton JSON back into a model (only JSON parsing and codec checks)."""
    try:
        tree = json.loads(data)
    except ValueError as err:
        raise SkeletonError(f"skeleton is not valid JSON: {err}") from err
    return _Decoder().stream(tree)


# ------------------------------------------------------------------- queries


def data_page_count(stream: Stream) -> int:
    """Pages carrying contents, over every PAGE_DATA record (= page refs expected)."""
    total = 0
    for image in stream.libxc_images:
        for rec in image.page_data_records():
            total += sum(1 for w in rec.words if w >> fmt.PAGE_DATA_TYPE_SHIFT not in _NO_DATA_TYPES)
    return total


def data_pfns(stream: Stream):
    """Pfns of the data-carrying pages, in stream order (restore checks its order)."""
    for batch in data_pfn_batches(stream):
        yield from batch


def data_pfn_batches(stream: Stream) -> Iterator[list[int]]:
    """The data-carrying pfns of each PAGE_DATA record, one list per record, in stream
    order (what :meth:`~.reader.ImageReader.get_pages` is asked for)."""
    for image in stream.libxc_images:
        for rec in image.page_data_records():
            yield rec.data_pfns


def embedded_config(stream: Stream) -> dict[str, Any] | None:
    """The libxl domain config xl embedded in the save file, or None."""
    if stream.xl_header is None or stream.xl_header.config_json is None:
        return None
    try:
        config = json.loads(stream.xl_header.config_json.rstrip(b"\0"))
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def embedded_name_uuid(stream: Stream) -> tuple[str | None, str | None]:
    """``(c_info.name, c_info.uuid)`` from the embedded config, when present."""
    c_info = (embedded_config(stream) or {}).get("c_info")
    if not isinstance(c_info, dict):
        return None, None
    name, uuid = c_info.get("name"), c_info.get("uuid")
    return (name if isinstance(name, str) else None, uuid if isinstance(uuid, str) else None)
