"""Byte-level I/O and the record framing shared by the libxl and libxc layers.

Implements the "Records" section common to ``libxc-migration-stream.pandoc``
and ``libxl-migration-stream.pandoc`` (Xen 4.17)::

    | type (u32) | body_length (u32) | body ... | zero padding to 8 octets |

This is the only module that reads or writes a record header or padding.
:class:`Source` reads strictly sequentially (never seeks), so the input may be
a FIFO or a pipe; :class:`Sink` writes sequentially with a bounded buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from xenpbr.stream import format as fmt
from xenpbr.stream.errors import RecordError, StreamError

_ZEROS = bytes(fmt.REC_ALIGN)
_SINK_FLUSH_AT = 256 << 10

BytesLike = bytes | bytearray | memoryview
T = TypeVar("T")
C = TypeVar("C")


class Source:
    """Sequential reader that tracks the absolute offset for error messages."""

    def __init__(self, fileobj: BinaryIO, offset: int = 0) -> None:
        self._f = fileobj
        self.offset = offset

    def read_exact(self, size: int, what: str, record: str | None = None) -> bytes:
        """Read exactly ``size`` bytes or raise :class:`StreamError` (truncated)."""
        buf = bytearray(size)
        self.readinto_exact(memoryview(buf), what, record)
        return bytes(buf)

    def readinto_exact(self, view: memoryview, what: str, record: str | None = None) -> None:
        """Fill ``view`` completely, looping over short reads (pipes, FIFOs)."""
        start, done, size = self.offset, 0, len(view)
        while done < size:
            n = self._readinto(view[done:])
            if not n:
                raise StreamError(f"stream truncated: needed {size} bytes for {what}, "
                                  f"got {done}", offset=start, record=record or what)
            done += n
            self.offset += n

    def _readinto(self, view: memoryview) -> int:
        readinto = getattr(self._f, "readinto", None)
        if readinto is not None:
            return readinto(view) or 0
        data = self._f.read(len(view))
        view[:len(data)] = data
        return len(data)

    def at_eof(self) -> bool:
        """Probe for end of input (reads at most one byte; it counts as consumed)."""
        data = self._f.read(1)
        self.offset += len(data)
        return not data


class Sink:
    """Sequential writer with a bounded coalescing buffer and a byte count."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._f = fileobj
        self._buf = bytearray()
        self.offset = 0

    def write(self, data: BytesLike) -> None:
        """Queue ``data``; flushes to the file once 256 KiB are pending. A chunk of
        that size or more goes to the file as it is (no copy into the buffer)."""
        self.offset += len(data)
        if len(data) >= _SINK_FLUSH_AT:
            self.flush()
            self._f.write(data)
            return
        self._buf += data
        if len(self._buf) >= _SINK_FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Hand everything pending to the underlying file object."""
        if self._buf:
            self._f.write(self._buf)
            self._buf = bytearray()
        flush = getattr(self._f, "flush", None)
        if flush is not None:
            flush()


@dataclass(frozen=True, slots=True)
class RecordFrame:
    """A record header as read from the stream, with where it was found."""

    family: str  # "libxc" or "libxl"
    index: int  # position of the record within its layer, from 0
    rtype: int
    length: int
    offset: int  # absolute offset of the record header
    name: str

    @property
    def padded_length(self) -> int:
        """Body length plus padding, i.e. bytes following the 8-byte header."""
        return fmt.padded_length(self.length)

    def describe(self) -> str:
        """E.g. ``libxc record #7 PAGE_DATA (type 0x00000001, length 4104)``."""
        return (f"{self.family} record #{self.index} {self.name} "
                f"(type {self.rtype:#010x}, length {self.length})")


class BodyReader:
    """Bounded reader over one record body; errors name the record and offset."""

    def __init__(self, src: Source, frame: RecordFrame) -> None:
        self.src = src
        self.frame = frame
        self.consumed = 0

    @property
    def length(self) -> int:
        """Declared body length."""
        return self.frame.length

    @property
    def remaining(self) -> int:
        """Body bytes not read yet."""
        return self.frame.length - self.consumed

    def error(self, problem: str) -> RecordError:
        """Build a :class:`RecordError` located at this record."""
        return RecordError(problem, offset=self.frame.offset, record=self.frame.describe())

    def read(self, size: int, what: str) -> bytes:
        """Read ``size`` body bytes; it is a content error if the body is shorter."""
        self._reserve(size, what)
        return self.src.read_exact(size, what, self.frame.describe())

    def readinto(self, view: memoryview, what: str) -> None:
        """Fill ``view`` from the body (used for page contents, no allocation)."""
        self._reserve(len(view), what)
        self.src.readinto_exact(view, what, self.frame.describe())

    def read_rest(self) -> bytes:
        """Read whatever is left of the body."""
        return self.read(self.remaining, "body")

    def _reserve(self, size: int, what: str) -> None:
        if size > self.remaining:
            raise self.error(f"body too short for {what}: needs {size} more bytes, "
                             f"{self.remaining} left")
        self.consumed += size


def read_frame(src: Source, family: str, index: int, names: Callable[[int], str],
               max_length: int = fmt.REC_LENGTH_MAX) -> RecordFrame:
    """Read one record header and sanity-check its length."""
    offset = src.offset
    raw = src.read_exact(fmt.RECORD_HEADER.sizeof(), "record header", f"{family} record #{index}")
    hdr = fmt.RECORD_HEADER.parse(raw)
    frame = RecordFrame(family, index, hdr.type, hdr.length, offset, names(hdr.type))
    if frame.length > max_length:
        raise StreamError(f"record length {frame.length:#x} exceeds the maximum "
                          f"{max_length:#x}", offset=offset, record=frame.describe())
    return frame


def read_record(src: Source, frame: RecordFrame, parse: Callable[[BodyReader, C], T],
                ctx: C) -> T:
    """Parse one record body with ``parse(body, ctx)``, then consume and check its padding.

    ``parse`` must consume exactly the body (it validates the body length against
    the record type first); leftovers are a codec bug.
    """
    body = BodyReader(src, frame)
    result = parse(body, ctx)
    if body.remaining:
        raise RuntimeError(f"parser for {frame.describe()} left {body.remaining} "
                           "body bytes unread")
    _read_padding(src, frame)
    return result


def _read_padding(src: Source, frame: RecordFrame) -> None:
    pad_len = frame.padded_length - frame.length
    if not pad_len:
        return
    offset = src.offset
    pad = src.read_exact(pad_len, "padding", frame.describe())
    if pad != _ZEROS[:pad_len]:
        raise StreamError(f"non-zero padding {pad.hex()}", offset=offset,
                          record=frame.describe())


def write_record(sink: Sink, rtype: int, length: int, chunks: Iterable[BytesLike]) -> None:
    """Write header, body chunks and zero padding of one record.

    ``length`` is declared up front (the header precedes the body) so the body
    can be streamed; a mismatch with the chunks actually produced is a bug.
    """
    if length > fmt.REC_LENGTH_MAX:
        raise RecordError(f"record length {length:#x} exceeds the maximum "
                          f"{fmt.REC_LENGTH_MAX:#x}", offset=sink.offset,
                          record=f"record type {rtype:#010x}")
    start = sink.offset
    sink.write(fmt.RECORD_HEADER.build({"type": rtype, "length": length}))
    written = 0
    for chunk in chunks:
        sink.write(chunk)
        written += len(chunk)
    if written != length:
        raise RuntimeError(f"record type {rtype:#010x} at offset {start:#x}: declared "
                           f"length {length} but wrote {written} body bytes")
    sink.write(_ZEROS[:fmt.padded_length(length) - length])
