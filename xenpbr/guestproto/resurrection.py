"""The resurrection region format (docs/specs/resurrection-region.md), encoded and parsed.

A pure codec: no Xen, no xenstore, no I/O. The guest library (``xenpbr_agent.resurrect``)
encodes with it and dom0 (:mod:`xenpbr.resurrection.extract`) parses with it, so both sides
share one definition of every offset and limit. It is separate from extraction because the
agent ships it (debian/xenpbr-agent.install) and must not pull in dom0's code.

Everything parsed here comes from a crashed, possibly hostile guest: each function either
raises :class:`RegionFormatError` or returns a :class:`~xenpbr.resurrection.model.Rejection`,
both carrying a reason token from :data:`REASONS` (documented in docs/resurrection.md).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from xenpbr.errors import XenpbrError
from xenpbr.resurrection.model import Record, Registration, Rejection

PAGE_SIZE = 4096
REGION_MAGIC = b"XPBRRGN1"
FORMAT_VERSION = 1
HEADER_SIZE = 128
MIN_PAGES = 3
MAX_PAGES = 16384
PFNS_PER_DIR_PAGE = PAGE_SIZE // 8
MIN_SLOT_SIZE = 64
MAX_SLOT_SIZE = 65536
SLOT_ALIGN = 64
RECORD_MAGIC = b"XREC"
RECORD_HEADER_SIZE = 24
MAX_KEY_LEN = 255
FLAG_TOMBSTONE = 1
KNOWN_FLAGS = FLAG_TOMBSTONE
MAX_DIR_PFNS = 32
MAX_REGISTRATION_BYTES = 1900
MAX_PFN = (1 << 52) - 1  # x86-64 physical frame numbers have at most 40 significant bits
MAX_U64 = (1 << 64) - 1
#: Where a guest registers its regions, relative to its own xenstore home.
REGISTRATION_DIR = "data/xenpbr/resurrect"
#: An application name: a path component of xenstore keys too, and xenstored refuses
#: ``.`` in a path, so there is none.
APP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,30}\Z")

_HEADER = struct.Struct("<8sHHIQ32sIII56s")  # up to header_crc (bytes 0..123)
_CRC = struct.Struct("<I")
_RECORD = struct.Struct("<4sIQHHI")
_DECIMAL = re.compile(r"[0-9]{1,20}\Z")

#: Every reason dom0 gives for refusing something, with what it means (docs/resurrection.md).
REASONS: dict[str, str] = {
    "registration": "the xenstore registration is malformed (fields, app name, counts)",
    "version": "a format version this dom0 does not know",
    "magic": "the header page does not start with the region magic",
    "header-crc": "the region header fails its CRC",
    "bounds": "a header or directory field is outside the format's limits",
    "mismatch": "the header disagrees with the registration (app, generation, page count)",
    "directory": "the directory disagrees with the registration or the header",
    "overlap": "a pfn appears twice in a region or in two regions",
    "pfn": "a pfn the guest does not own, or that could not be read",
    "changed": "the region changed while dom0 read it",
    "torn": "a slot is written but lacks its record magic (a commit cut by the crash)",
    "length": "a record's key or value length is out of range for its slot",
    "crc": "a record fails its CRC",
    "flags": "a record has flag bits this format does not define",
    "seq": "a record's sequence number is 0 or used twice",
    "too-many": "more registrations than dom0 reads",
    "cap-regions": "over the operator's cap on regions per domain",
    "cap-bytes": "over the operator's cap on bytes per domain",
    "timeout": "the operator's time cap ran out before this was read",
}
#: The reasons that say dom0's caps ran out, not that anything the guest wrote was wrong.
CAP_REASONS = frozenset({"too-many", "cap-regions", "cap-bytes", "timeout"})


class RegionFormatError(XenpbrError):
    """Bytes that are not a valid region, directory or registration; ``reason`` is a
    token of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def crc(data: bytes) -> int:
    """The format's checksum: zlib's CRC-32 (docs/resurrection.md, "Checksum")."""
    return zlib.crc32(data) & 0xFFFFFFFF


def dir_pages_for(page_count: int) -> int:
    """How many directory pages a region of ``page_count`` pages has."""
    return -(-page_count // PFNS_PER_DIR_PAGE)


@dataclass(frozen=True)
class RegionHeader:
    """A region's parsed header (page 0)."""

    app: str
    generation: int
    page_count: int
    dir_pages: int
    slot_size: int
    slot_count: int

    @property
    def first_record_page(self) -> int:
        return 1 + self.dir_pages

    @property
    def record_area_size(self) -> int:
        return (self.page_count - self.first_record_page) * PAGE_SIZE


def max_slots(page_count: int, slot_size: int) -> int:
    """The most slots of ``slot_size`` the record area of ``page_count`` pages holds."""
    return (page_count - 1 - dir_pages_for(page_count)) * PAGE_SIZE // slot_size


def _check_app(app: str, reason: str) -> None:
    if not APP_NAME.match(app):
        raise RegionFormatError(reason, f"application name {app[:40]!r} is not "
                                        f"{APP_NAME.pattern[:-2]}")


def _check_layout(page_count: int, slot_size: int, slot_count: int) -> None:
    if not MIN_PAGES <= page_count <= MAX_PAGES:
        raise RegionFormatError("bounds", f"page_count {page_count} not in "
                                          f"{MIN_PAGES}..{MAX_PAGES}")
    if slot_size % SLOT_ALIGN or not MIN_SLOT_SIZE <= slot_size <= MAX_SLOT_SIZE:
        raise RegionFormatError("bounds", f"slot_size {slot_size} is not a multiple of "
                                          f"{SLOT_ALIGN} in {MIN_SLOT_SIZE}..{MAX_SLOT_SIZE}")
    if not 0 <= slot_count <= max_slots(page_count, slot_size):
        raise RegionFormatError("bounds", f"{slot_count} slots of {slot_size} bytes do not "
                                          f"fit the record area of {page_count} pages")


def encode_header(app: str, generation: int, page_count: int, slot_size: int,
                  slot_count: int | None = None) -> bytes:
    """Page 0 of a region (a full page); ``slot_count`` defaults to as many as fit."""
    _check_app(app, "bounds")
    if slot_count is None:
        slot_count = max_slots(page_count, slot_size)
    _check_layout(page_count, slot_size, slot_count)
    if not 0 <= generation <= MAX_U64:
        raise RegionFormatError("bounds", f"generation {generation} is not a u64")
    head = _HEADER.pack(REGION_MAGIC, FORMAT_VERSION, HEADER_SIZE, page_count, generation,
                        app.encode("ascii"), dir_pages_for(page_count), slot_size, slot_count,
                        bytes(56))
    return head + _CRC.pack(crc(head)) + bytes(PAGE_SIZE - HEADER_SIZE)


def parse_header(page: bytes) -> RegionHeader:
    """Validate and decode a header page; :class:`RegionFormatError` on anything wrong."""
    if len(page) < HEADER_SIZE:
        raise RegionFormatError("bounds", f"header is {len(page)} bytes, needs {HEADER_SIZE}")
    (magic, version, header_size, page_count, generation, raw_app, dir_pages, slot_size,
     slot_count, reserved) = _HEADER.unpack_from(page)
    if magic != REGION_MAGIC:
        raise RegionFormatError("magic", f"header magic {magic!r}, expected {REGION_MAGIC!r}")
    if version != FORMAT_VERSION:
        raise RegionFormatError("version", f"region format version {version}; this dom0 "
                                           f"reads version {FORMAT_VERSION}")
    (stored,) = _CRC.unpack_from(page, _HEADER.size)
    if crc(bytes(page[:_HEADER.size])) != stored:
        raise RegionFormatError("header-crc", "the header's CRC does not match its bytes")
    if header_size != HEADER_SIZE or any(reserved):
        raise RegionFormatError("bounds", f"header size {header_size} or reserved bytes "
                                          "not as version 1 defines them")
    app = _decode_app(raw_app)
    _check_layout(page_count, slot_size, slot_count)
    if dir_pages != dir_pages_for(page_count):
        raise RegionFormatError("bounds", f"dir_pages {dir_pages} for {page_count} pages, "
                                          f"expected {dir_pages_for(page_count)}")
    return RegionHeader(app, generation, page_count, dir_pages, slot_size, slot_count)


def _decode_app(raw: bytes) -> str:
    name = raw.rstrip(b"\0")
    if b"\0" in name:
        raise RegionFormatError("bounds", "application name has a NUL inside")
    app = name.decode("latin-1")
    _check_app(app, "bounds")
    return app


def encode_directory(pfns: Sequence[int]) -> list[bytes]:
    """The directory pages listing ``pfns`` (every page of the region, in order)."""
    pages = []
    for start in range(0, len(pfns), PFNS_PER_DIR_PAGE):
        chunk = list(pfns[start:start + PFNS_PER_DIR_PAGE])
        chunk += [0] * (PFNS_PER_DIR_PAGE - len(chunk))
        pages.append(struct.pack(f"<{PFNS_PER_DIR_PAGE}Q", *chunk))
    return pages


def parse_directory(pages: Sequence[bytes], header: RegionHeader, header_pfn: int,
                    dir_pfns: Sequence[int]) -> tuple[int, ...]:
    """The region's pfns from its directory pages, checked against where they were read:
    entry 0 is ``header_pfn``, entries 1..dir_pages are ``dir_pfns``, no pfn twice."""
    if len(pages) != header.dir_pages or len(dir_pfns) != header.dir_pages:
        raise RegionFormatError("directory", f"{len(pages)} directory pages read, "
                                             f"{len(dir_pfns)} registered, header says "
                                             f"{header.dir_pages}")
    entries: list[int] = []
    for page in pages:
        if len(page) != PAGE_SIZE:
            raise RegionFormatError("directory", f"directory page of {len(page)} bytes")
        entries.extend(struct.unpack(f"<{PFNS_PER_DIR_PAGE}Q", page))
    pfns, unused = entries[:header.page_count], entries[header.page_count:]
    if any(unused):
        raise RegionFormatError("directory", "unused directory entries are not zero")
    if pfns[0] != header_pfn or pfns[1:1 + header.dir_pages] != list(dir_pfns):
        raise RegionFormatError("directory", "the directory does not list the header and "
                                             "directory pages where they were read")
    if any(pfn > MAX_PFN for pfn in pfns):
        raise RegionFormatError("bounds", "a directory entry is beyond any physical frame")
    if len(set(pfns)) != len(pfns):
        raise RegionFormatError("overlap", "the directory lists a pfn twice")
    return tuple(pfns)


def encode_record(seq: int, key: bytes, value: bytes, *, tombstone: bool = False) -> bytes:
    """One record's bytes (``24 + len(key) + len(value)``), magic included."""
    if not 1 <= len(key) <= MAX_KEY_LEN:
        raise RegionFormatError("length", f"key of {len(key)} bytes (1..{MAX_KEY_LEN})")
    if not 1 <= seq <= MAX_U64:
        raise RegionFormatError("seq", f"seq {seq} is not in 1..2**64-1")
    flags = FLAG_TOMBSTONE if tombstone else 0
    body = struct.pack("<QHHI", seq, len(key), flags, len(value)) + key + value
    return RECORD_MAGIC + _CRC.pack(crc(body)) + body


def record_size(key: bytes, value: bytes) -> int:
    return RECORD_HEADER_SIZE + len(key) + len(value)


@dataclass(frozen=True)
class _Slot:
    record: Record
    slot: int


def _parse_slot(app: str, index: int, slot: bytes) -> _Slot | Rejection | None:
    magic, stored, seq, key_len, flags, value_len = _RECORD.unpack_from(slot)
    end = RECORD_HEADER_SIZE + key_len + value_len
    lengths_ok = 1 <= key_len <= MAX_KEY_LEN and end <= len(slot)
    key = bytes(slot[RECORD_HEADER_SIZE:RECORD_HEADER_SIZE + key_len]) if lengths_ok else None

    def reject(reason: str, detail: str) -> Rejection:
        return Rejection(app, reason, detail, slot=index, seq=seq or None, key=key)

    if magic != RECORD_MAGIC:
        return reject("torn", f"slot {index} is written but has magic {magic!r}")
    if not lengths_ok:
        return reject("length", f"slot {index}: key_len {key_len}, value_len {value_len} "
                                f"do not fit a {len(slot)}-byte slot")
    if crc(bytes(slot[8:end])) != stored:
        return reject("crc", f"slot {index} fails its CRC")
    if flags & ~KNOWN_FLAGS:
        return reject("flags", f"slot {index} has unknown flags {flags:#x}")
    if seq == 0:
        return reject("seq", f"slot {index} has seq 0")
    value = bytes(slot[RECORD_HEADER_SIZE + key_len:end])
    return _Slot(Record(key or b"", seq, value, bool(flags & FLAG_TOMBSTONE)), index)


def parse_slots(area: bytes, header: RegionHeader) -> tuple[list[Record], list[Rejection]]:
    """The winning version of each key in a record area (tombstones included, flagged),
    in seq order, and every slot rejected with its reason."""
    if len(area) < header.slot_count * header.slot_size:
        raise RegionFormatError("bounds", f"record area of {len(area)} bytes is shorter than "
                                          f"{header.slot_count} slots of {header.slot_size}")
    view = memoryview(area)
    rejections: list[Rejection] = []
    seen_seqs: set[int] = set()
    winners: dict[bytes, Record] = {}
    for index in range(header.slot_count):
        slot = view[index * header.slot_size:(index + 1) * header.slot_size]
        if not any(slot[:4]):
            continue
        parsed = _parse_slot(header.app, index, bytes(slot))
        if isinstance(parsed, Rejection):
            rejections.append(parsed)
        elif parsed is not None:
            record = parsed.record
            if record.seq in seen_seqs:
                rejections.append(Rejection(header.app, "seq", f"slot {index} reuses seq "
                                            f"{record.seq}", slot=index, seq=record.seq,
                                            key=record.key))
                continue
            seen_seqs.add(record.seq)
            current = winners.get(record.key)
            if current is None or record.seq > current.seq:
                winners[record.key] = record
    return sorted(winners.values(), key=lambda r: r.seq), rejections


def encode_region(app: str, generation: int, pfns: Sequence[int], slot_size: int,
                  slots: Mapping[int, bytes] | Iterable[tuple[int, bytes]] = ()) -> list[bytes]:
    """A whole region as pages, ``pfns`` being where each page lives; ``slots`` maps slot
    indexes to record bytes (for tests and tools: the guest library writes in place)."""
    header = encode_header(app, generation, len(pfns), slot_size)
    parsed = parse_header(header)
    area = bytearray(parsed.record_area_size)
    items = slots.items() if isinstance(slots, Mapping) else slots
    for index, record in items:
        if not 0 <= index < parsed.slot_count or len(record) > slot_size:
            raise RegionFormatError("bounds", f"slot {index} / {len(record)} bytes do not fit")
        area[index * slot_size:index * slot_size + len(record)] = record
    area_pages = [bytes(area[i:i + PAGE_SIZE]) for i in range(0, len(area), PAGE_SIZE)]
    return [header, *encode_directory(pfns), *area_pages]


def encode_registration(registration: Registration) -> str:
    """The value of ``data/xenpbr/resurrect/<app>`` for a registration."""
    _check_app(registration.app, "registration")
    pfns = ",".join(str(p) for p in registration.dir_pfns)
    text = (f"{FORMAT_VERSION} {registration.generation} {registration.page_count} "
            f"{registration.header_pfn} {pfns}")
    parse_registration(registration.app, text.encode())  # the same rules both ways
    return text


def _decimal(field: str, what: str) -> int:
    if not _DECIMAL.match(field):
        raise RegionFormatError("registration", f"{what} {field[:24]!r} is not a decimal")
    return int(field)


def parse_registration(app: str, raw: bytes) -> Registration:
    """Validate a registration value read from the guest's xenstore."""
    _check_app(app, "registration")
    if len(raw) > MAX_REGISTRATION_BYTES:
        raise RegionFormatError("registration", f"{len(raw)} bytes, at most "
                                                f"{MAX_REGISTRATION_BYTES}")
    try:
        fields = raw.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise RegionFormatError("registration", "not ASCII") from None
    if len(fields) != 5:
        raise RegionFormatError("registration", f"{len(fields)} fields, expected 5")
    version = _decimal(fields[0], "version")
    if version != FORMAT_VERSION:
        raise RegionFormatError("version", f"registration version {version}")
    generation = _decimal(fields[1], "generation")
    page_count = _decimal(fields[2], "page_count")
    header_pfn = _decimal(fields[3], "header_pfn")
    dir_fields = fields[4].split(",")
    if len(dir_fields) > MAX_DIR_PFNS:
        raise RegionFormatError("registration", f"{len(dir_fields)} directory pfns, at most "
                                                f"{MAX_DIR_PFNS}")
    dir_pfns = tuple(_decimal(f, "directory pfn") for f in dir_fields)
    if generation > MAX_U64 or not MIN_PAGES <= page_count <= MAX_PAGES:
        raise RegionFormatError("registration", f"generation {generation} or page_count "
                                                f"{page_count} out of range")
    if len(dir_pfns) != dir_pages_for(page_count):
        raise RegionFormatError("registration", f"{len(dir_pfns)} directory pfns for "
                                                f"{page_count} pages")
    if any(p > MAX_PFN for p in (header_pfn, *dir_pfns)):
        raise RegionFormatError("registration", "a pfn beyond any physical frame")
    if len({header_pfn, *dir_pfns}) != 1 + len(dir_pfns):
        raise RegionFormatError("registration", "the header and directory pfns repeat")
    return Registration(app, generation, page_count, header_pfn, dir_pfns)
