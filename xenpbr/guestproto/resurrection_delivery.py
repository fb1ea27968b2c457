"""The wire format of resurrection delivery: dom0 hands an application its recovered records.

One concern: the bytes and key names both ends of a delivery agree on (docs/resurrection.md,
"Delivery"), with no xenstore or Xen import, so the guest agent loads it as it loads
:mod:`xenpbr.guestproto.wire`. Dom0 (:mod:`xenpbr.resurrection.deliver`) encodes a payload,
cuts it into chunks and writes a manifest; the agent (:mod:`xenpbr_agent.resurrected`)
parses the manifest, joins the chunks, checks size and CRC, decodes the payload, and answers
with a confirmation that dom0 parses here too. Everything is bounded and parsed strictly:
dom0 distrusts the guest's confirmation, the agent distrusts a delivery that a crash or a
bug may have cut short.

Payload (little-endian)::

    magic b"XPBRDLV1" | u32 record_count | u32 lost_count | u32 lost_omitted
    record_count x: u64 seq | u16 key_len | u8 flags (bit 0 tombstone) | u32 value_len
                    | key | value
    lost_count x:   u64 seq (0: unknown) | u16 key_len (0xFFFF: unknown) | u8 reason_len
                    | u16 detail_len | key | reason (ASCII) | detail (UTF-8)

Manifest (``control/xenpbr/resurrected/<app>``): ``1 <generation> <bytes> <chunks> <crc32>``
(decimal, crc32 as ``zlib.crc32`` of the whole payload). Chunk *i* is the base64 text of
payload bytes ``[i * CHUNK_BYTES, (i + 1) * CHUNK_BYTES)`` under ``.../<app>/<i>``.
Confirmation (the guest's ``data/xenpbr/resurrected/<app>``): ``ok <generation>`` or
``bad <generation> <reason>``.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

from xenpbr.errors import XenpbrError
from xenpbr.guestproto.resurrection import APP_NAME

__all__ = [
    "APP_NAME",
    "CHUNK_BYTES",
    "CONFIRM_DIR",
    "Confirmation",
    "ConfirmationMalformed",
    "DELIVERY_DIR",
    "DeliveryMalformed",
    "DeliveredRecord",
    "LostRecord",
    "MAX_CHUNKS",
    "MAX_PAYLOAD",
    "Manifest",
    "Payload",
    "app_key",
    "decode_chunk",
    "decode_payload",
    "encode_chunks",
    "encode_payload",
    "join_chunks",
    "parse_confirmation",
    "parse_manifest",
]

VERSION = 1
#: Where dom0 writes deliveries (read-only for the guest) and the guest confirms.
DELIVERY_DIR = "control/xenpbr/resurrected"
CONFIRM_DIR = "data/xenpbr/resurrected"
#: Payload bytes per chunk: 2048 characters of base64, within "about 2 KiB a value".
CHUNK_BYTES = 1536
#: The largest payload either end accepts (the per-domain delivery cap can only be lower).
MAX_PAYLOAD = 64 << 20
MAX_CHUNKS = -(-MAX_PAYLOAD // CHUNK_BYTES)
MAX_MANIFEST = 80
MAX_CONFIRMATION = 96
#: Application names, as in the region header (docs/specs/resurrection-region.md).
REASON = re.compile(r"[a-z0-9][a-z0-9:_-]{0,63}")

MAGIC = b"XPBRDLV1"
_COUNTS = struct.Struct("<III")
_RECORD = struct.Struct("<QHBI")
_LOST = struct.Struct("<QHBH")
_UNKNOWN_KEY = 0xFFFF
_MAX_KEY = 255
_MAX_DETAIL = 512
_INT = r"(0|[1-9][0-9]{0,19})"
_MANIFEST = re.compile(rf"1 {_INT} {_INT} {_INT} {_INT}")
_CONFIRMATION = re.compile(rf"(ok|bad) {_INT}(?: ({REASON.pattern}))?")


class DeliveryMalformed(XenpbrError):
    """A manifest, chunk or payload is not what the format allows (cut short, corrupted,
    or forged): nothing of it is used. ``reason`` is the token the agent confirms with."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ConfirmationMalformed(XenpbrError):
    """The guest's confirmation is not ``ok <generation>`` or ``bad <generation> <reason>``."""


def app_key(app: str) -> str:
    """The xenstore path component for ``app``: the name itself, once checked (the
    format's names hold only characters xenstored accepts in a path)."""
    if not APP_NAME.fullmatch(app):
        raise ValueError(f"application name {app!r} does not match {APP_NAME.pattern!r}")
    return app


def app_from_key(key: str) -> str | None:
    """The application a path component names, or None if it names none."""
    return key if APP_NAME.fullmatch(key) else None


@dataclass(frozen=True)
class DeliveredRecord:
    key: bytes
    seq: int
    value: bytes
    tombstone: bool = False


@dataclass(frozen=True)
class LostRecord:
    """A record the application lost, and why (a reason token of docs/resurrection.md)."""

    reason: str
    detail: str = ""
    seq: Optional[int] = None
    key: Optional[bytes] = None


@dataclass(frozen=True)
class Payload:
    records: tuple[DeliveredRecord, ...]
    lost: tuple[LostRecord, ...]
    lost_omitted: int = 0  # lost records not listed (the list itself was over the cap)


@dataclass(frozen=True)
class Manifest:
    generation: int
    size: int
    chunks: int
    crc: int

    def encode(self) -> str:
        return f"{VERSION} {self.generation} {self.size} {self.chunks} {self.crc}"


@dataclass(frozen=True)
class Confirmation:
    ok: bool
    generation: int
    reason: str = ""

    def encode(self) -> str:
        return f"ok {self.generation}" if self.ok else f"bad {self.generation} {self.reason}"


# -- payload -----------------------------------------------------------------------------------


def record_size(record: DeliveredRecord) -> int:
    return _RECORD.size + len(record.key) + len(record.value)


def lost_size(lost: LostRecord) -> int:
    return len(_encode_lost(lost))


def _encode_record(record: DeliveredRecord) -> bytes:
    if not 1 <= len(record.key) <= _MAX_KEY or record.seq < 1:
        raise ValueError(f"record seq {record.seq} key {record.key[:16]!r}: not deliverable")
    return (_RECORD.pack(record.seq, len(record.key), int(record.tombstone), len(record.value))
            + record.key + record.value)


def _encode_lost(lost: LostRecord) -> bytes:
    reason = lost.reason.encode("ascii") if REASON.fullmatch(lost.reason) else b"unknown"
    detail = lost.detail.encode("utf-8")[:_MAX_DETAIL]
    key = lost.key[:_MAX_KEY] if lost.key is not None else b""
    key_len = len(key) if lost.key is not None else _UNKNOWN_KEY
    return _LOST.pack(lost.seq or 0, key_len, len(reason), len(detail)) + key + reason + detail


def encode_payload(payload: Payload) -> bytes:
    parts = [MAGIC + _COUNTS.pack(len(payload.records), len(payload.lost),
                                  payload.lost_omitted)]
    parts += [_encode_record(r) for r in payload.records]
    parts += [_encode_lost(lost) for lost in payload.lost]
    return b"".join(parts)


class _Reader:
    """Bounds-checked reads from a payload; running off the end is ``truncated``."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise DeliveryMalformed("format", f"payload ends at byte {len(self.data)}, "
                                              f"{n} more expected at {self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        return fmt.unpack(self.take(fmt.size))


def _decode_record(reader: _Reader) -> DeliveredRecord:
    seq, key_len, flags, value_len = reader.unpack(_RECORD)
    if seq < 1 or not 1 <= key_len <= _MAX_KEY or flags > 1:
        raise DeliveryMalformed("format", f"record at byte {reader.pos}: seq {seq}, "
                                          f"key_len {key_len}, flags {flags}")
    key = reader.take(key_len)
    return DeliveredRecord(key, seq, reader.take(value_len), bool(flags))


def _decode_lost(reader: _Reader) -> LostRecord:
    seq, key_len, reason_len, detail_len = reader.unpack(_LOST)
    if (key_len != _UNKNOWN_KEY and key_len > _MAX_KEY) or detail_len > _MAX_DETAIL:
        raise DeliveryMalformed("format", f"lost entry at byte {reader.pos}: key_len "
                                          f"{key_len}, detail_len {detail_len}")
    key = reader.take(key_len) if key_len != _UNKNOWN_KEY else None
    reason = reader.take(reason_len).decode("ascii", "replace")
    if not REASON.fullmatch(reason):
        raise DeliveryMalformed("format", f"lost entry reason {reason!r} is not a token")
    detail = reader.take(detail_len).decode("utf-8", "replace")
    return LostRecord(reason, detail, seq or None, key)


def decode_payload(data: bytes) -> Payload:
    """Parse a payload whose size and CRC were already checked; strict all the same."""
    reader = _Reader(data)
    magic = reader.take(len(MAGIC))
    if magic != MAGIC:
        raise DeliveryMalformed("format", f"payload magic {magic!r}, expected {MAGIC!r}")
    count, lost_count, omitted = reader.unpack(_COUNTS)
    if count * _RECORD.size + lost_count * _LOST.size > len(data):
        raise DeliveryMalformed("format", f"{count} records and {lost_count} lost entries "
                                          f"cannot fit in {len(data)} bytes")
    records = tuple(_decode_record(reader) for _ in range(count))
    lost = tuple(_decode_lost(reader) for _ in range(lost_count))
    if reader.pos != len(data):
        raise DeliveryMalformed("format", f"{len(data) - reader.pos} bytes after the payload")
    return Payload(records, lost, omitted)


# -- chunks and manifest -----------------------------------------------------------------------


def encode_chunks(payload: bytes) -> list[bytes]:
    """The payload as base64 chunks of at most ``CHUNK_BYTES`` payload bytes each."""
    return [base64.b64encode(payload[i:i + CHUNK_BYTES])
            for i in range(0, len(payload), CHUNK_BYTES)]


def manifest_for(generation: int, payload: bytes) -> Manifest:
    return Manifest(generation, len(payload), -(-len(payload) // CHUNK_BYTES),
                    zlib.crc32(payload))


def parse_manifest(raw: bytes | None) -> Manifest:
    """Parse ``1 <generation> <bytes> <chunks> <crc32>``; sizes must agree with each other."""
    if raw is None or not raw:
        raise DeliveryMalformed("manifest", "no manifest (the delivery is incomplete)")
    if len(raw) > MAX_MANIFEST:
        raise DeliveryMalformed("manifest", f"manifest of {len(raw)} bytes")
    match = _MANIFEST.fullmatch(raw.decode("ascii", "replace"))
    if match is None:
        raise DeliveryMalformed("manifest", f"manifest {raw[:MAX_MANIFEST]!r} is not "
                                            "'1 <generation> <bytes> <chunks> <crc32>'")
    generation, size, chunks, crc = (int(x) for x in match.groups())
    if size > MAX_PAYLOAD or crc > 0xFFFFFFFF:
        raise DeliveryMalformed("manifest", f"manifest size {size} or crc {crc} out of range")
    if chunks != -(-size // CHUNK_BYTES):
        raise DeliveryMalformed("manifest", f"{size} bytes cannot be {chunks} chunks of "
                                            f"{CHUNK_BYTES}")
    return Manifest(generation, size, chunks, crc)


def decode_chunk(index: int, raw: bytes | None) -> bytes:
    """One chunk's payload bytes; a missing or non-base64 chunk is ``chunk``."""
    if raw is None:
        raise DeliveryMalformed("chunk", f"chunk {index} is missing")
    if len(raw) > 4 * CHUNK_BYTES // 3 + 4:
        raise DeliveryMalformed("chunk", f"chunk {index} has {len(raw)} bytes")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise DeliveryMalformed("chunk", f"chunk {index} is not base64") from None


def join_chunks(manifest: Manifest, chunks: Sequence[bytes]) -> bytes:
    """The payload from its decoded chunks, checked against the manifest's size and CRC."""
    data = b"".join(chunks)
    if len(data) != manifest.size:
        raise DeliveryMalformed("size", f"chunks hold {len(data)} bytes, the manifest says "
                                        f"{manifest.size}")
    crc = zlib.crc32(data)
    if crc != manifest.crc:
        raise DeliveryMalformed("crc", f"payload crc32 {crc:#010x}, the manifest says "
                                       f"{manifest.crc:#010x}")
    return data


# -- confirmation ------------------------------------------------------------------------------


def parse_confirmation(raw: bytes) -> Confirmation:
    """Parse the guest's ``ok <generation>`` / ``bad <generation> <reason>``, strictly."""
    if len(raw) > MAX_CONFIRMATION:
        raise ConfirmationMalformed(f"confirmation of {len(raw)} bytes (at most "
                                    f"{MAX_CONFIRMATION})")
    match = _CONFIRMATION.fullmatch(raw.decode("ascii", "replace"))
    if match is None:
        raise ConfirmationMalformed(f"confirmation {raw!r} is not 'ok <generation>' or "
                                    "'bad <generation> <reason>'")
    verdict, generation, reason = match.groups()
    if (verdict == "ok") != (reason is None):
        raise ConfirmationMalformed(f"confirmation {raw!r}: 'ok' takes no reason, 'bad' needs one")
    return Confirmation(verdict == "ok", int(generation), reason or "")
