"""Exceptions raised by the migration-stream codec.

Two deliberate failure classes, following the split used by Xen's own verifier
(``tools/python/xen/migration/verify.py``):

* :class:`StreamError`: the stream cannot be framed: bad magic/ident/marker, a
  header field we do not support, a truncated read, an oversized or unknown
  mandatory record, non-zero padding, trailing bytes after the final END.
* :class:`RecordError`: the framing is fine but a record's content is not: a
  body length that does not fit the record type, reserved bits set, an invalid
  page type, a page source returning the wrong amount of data.

Both carry ``offset`` (absolute byte offset in the input, counting the xl header)
and ``record`` (a human description such as ``"libxc record #7 PAGE_DATA"``) so
an operator can locate the problem with ``xxd -s OFFSET``. Internal
inconsistencies (codec bugs) raise :class:`RuntimeError` instead.

:class:`MismatchError` is not the codec's: ``python -m xenpbr.stream`` raises it when a
regenerated stream differs from its input (a failed round trip, not a bad stream).
"""

from __future__ import annotations

from xenpbr.errors import XenpbrError


class StreamCodecError(XenpbrError):
    """Base class of the codec's deliberate errors; knows where it happened."""

    def __init__(self, problem: str, *, offset: int | None = None,
                 record: str | None = None) -> None:
        self.problem = problem
        self.offset = offset
        self.record = record
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.record:
            where.append(self.record)
        if self.offset is not None:
            where.append(f"at offset {self.offset:#x} ({self.offset})")
        prefix = " ".join(where)
        return f"{prefix}: {self.problem}" if prefix else self.problem


class StreamError(StreamCodecError):
    """The stream's framing or a header is wrong, truncated or unsupported."""


class RecordError(StreamCodecError):
    """A record is framed correctly but its content is invalid."""


class MismatchError(XenpbrError):
    """The regenerated stream is not byte-identical to the one it was parsed from."""
