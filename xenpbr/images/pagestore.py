"""Content-addressed page store: append-only pack files plus sealed per-pack indexes.

Pages are keyed by the SHA-256 of their 4 KiB contents. All-zero pages are never
stored (manifests mark them). A page is stored once per host however many images,
phases or domains reference it. Layout under ``<store>/packs/`` (byte layouts in
``docs/images.md``):

* ``<id>.pack``: a 32-byte header, then records ``header(48) + payload``, appended
  sequentially by one writer through a large buffer (one ``write`` per MiB, not one
  file per page: a 128 MiB guest has 32768 pages and dom0 under TCG is slow).
* ``<id>.idx``: written atomically (temp + fsync + rename) only after the pack has
  been fsync'd. It *seals* the pack: a pack without an index is an interrupted
  capture, and GC deletes it.

Every record carries its codec byte and the digest of its raw contents, so a pack is
self-describing: an index can be rebuilt by scanning it, and every read is verified
against the digest the *manifest* expects (not the one in the record), so neither a
flipped payload byte nor a misplaced index entry can hand out a wrong page. Records
written since 2026-12-07 also carry the CRC-32 of their payload (in a field that was
reserved, flagged so older records are told apart): a restore checks that instead of
re-hashing every page with SHA-256, which is six times slower in the lab's dom0 and
was most of what regenerating a stream cost (docs/images.md, "Integrity rules").

This module knows nothing about images or locking; :mod:`.store` adds both.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import secrets
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from xenpbr.fsutil import atomic_write
from xenpbr.images import codecs
from xenpbr.images.errors import CorruptObject

_LOG = logging.getLogger(__name__)

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_DIGEST = hashlib.sha256(ZERO_PAGE).digest()

PACK_MAGIC = b"XPBRPACK"
PACK_VERSION = 1
PACK_HEADER = struct.Struct("<8sII16s")  # magic, version, header size, pack id
RECORD = struct.Struct("<BBHIII32s")  # codec, kind, flags, stored_len, raw_len, crc32, sha256
KIND_PAGE = 1
FLAG_CRC32 = 0x1  # the record's crc32 field holds zlib.crc32(payload)
MAX_STORED_LEN = 2 * PAGE_SIZE  # a codec may expand a page a little; never this much

IDX_MAGIC = b"XPBRIDX\n"
IDX_VERSION = 1
IDX_HEADER = struct.Struct("<8sIIQQ16s")  # magic, version, entry size, count, pack size, id
IDX_ENTRY = struct.Struct("<32sQII")  # sha256, record offset, record length, reserved
DIGEST_SIZE = 32

FLUSH_AT = 1 << 20
_MAX_IOV = 512  # stay well under IOV_MAX (1024)
DEFAULT_MAX_PACK = 1 << 30

_OFF_BITS, _LEN_BITS = 40, 24
_LEN_MASK = (1 << _LEN_BITS) - 1
_OFF_MASK = (1 << _OFF_BITS) - 1


def _pack_id(name: str) -> bytes:
    """The 16-byte id field of a pack and its index (the name's bytes, zero-padded)."""
    return bytes.fromhex(name).ljust(16, b"\0")


def make_loc(pack_no: int, offset: int, reclen: int) -> int:
    """Pack a location into one int (a dict of ints is much smaller than of tuples)."""
    return pack_no << (_OFF_BITS + _LEN_BITS) | offset << _LEN_BITS | reclen


def split_loc(loc: int) -> tuple[int, int, int]:
    """``(pack_no, offset, record_length)`` of a location made by :func:`make_loc`."""
    return loc >> (_OFF_BITS + _LEN_BITS), (loc >> _LEN_BITS) & _OFF_MASK, loc & _LEN_MASK


Stamp = tuple[int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """``(inode, size, ctime_ns)`` of a file, None if it is gone.

    Why ctime: sealed packs are never written again, and every write, truncation or
    ``utime`` (which could hide an mtime change) moves ctime, which no caller can set.
    A stamp that still matches therefore means nobody changed the file through the file
    system since it was verified; damage below it (bit rot) leaves the stamp alone and
    is found by ``xenpbr scrub`` and by the page-by-page checks of a FIFO restore.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_ctime_ns


@dataclass(slots=True)
class PackInfo:
    """A sealed pack known to the index."""

    no: int
    name: str
    path: Path
    size: int  # bytes covered by the index (the pack may be longer only if torn)
    entries: list[tuple[bytes, int, int]] = field(default_factory=list, repr=False)


@dataclass(frozen=True, slots=True)
class IndexProblem:
    """An index file that could not be used, and why; ``stamp`` (mtime, size) lets a
    later refresh notice that GC (maybe in another process) rewrote it."""

    name: str
    reason: str
    stamp: tuple[int, int] | None = None


# ------------------------------------------------------------------ pack writing


class PackWriter:
    """Appends records to one new pack file; :meth:`seal` publishes its index."""

    def __init__(self, directory: Path, codec: codecs.PageCodec) -> None:
        self.name = secrets.token_hex(8)
        self.path = directory / f"{self.name}.pack"
        self.codec = codec
        self.entries: list[tuple[bytes, int, int]] = []
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        header = PACK_HEADER.pack(PACK_MAGIC, PACK_VERSION, PACK_HEADER.size,
                                  _pack_id(self.name))
        self._chunks: list[bytes] = [header]  # written with one writev per MiB: no copies
        self._pending = len(header)
        self.size = len(header)
        self.sealed = False

    def encode(self, page: bytes) -> tuple[int, bytes]:
        """``(codec byte, payload)`` for a page: raw whenever compressing does not help."""
        codec = self.codec
        if not codec.ident:
            return 0, page
        payload = codec.encode(page)
        return (codec.ident, payload) if len(payload) < len(page) else (0, page)

    def append_record(self, digest: bytes, codec_id: int, payload: bytes, raw_len: int) -> int:
        """Queue an already-encoded record (GC copies records without re-encoding)."""
        reclen = RECORD.size + len(payload)
        self.entries.append((digest, self.size, reclen))
        chunks = self._chunks
        chunks.append(RECORD.pack(codec_id, KIND_PAGE, FLAG_CRC32, len(payload), raw_len,
                                  zlib.crc32(payload), digest))
        chunks.append(payload)
        self.size += reclen
        self._pending += reclen
        if self._pending >= FLUSH_AT or len(chunks) >= _MAX_IOV:
            self.flush()
        return reclen

    def flush(self) -> None:
        """Write the queued records (no fsync)."""
        if not self._chunks:
            return
        written = os.writev(self._fd, self._chunks)
        if written < self._pending:  # short write (rare): finish the rest plainly
            rest = memoryview(b"".join(self._chunks))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self._chunks = []
        self._pending = 0

    def seal(self) -> PackInfo:
        """fsync the pack, then atomically publish its index; the pack is now visible."""
        self.flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        atomic_write(self.path.with_suffix(".idx"),
                     encode_index(self.name, self.size, self.entries), mode=0o600)
        self.sealed = True
        return PackInfo(-1, self.name, self.path, self.size, self.entries)

    def discard(self) -> None:
        """Drop the pack if it is not sealed yet (GC also reclaims it after a crash).

        A sealed pack is left alone: another process may already have deduplicated
        against its pages; GC removes whatever no manifest references.
        """
        if self.sealed:
            return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------ index files


def encode_index(name: str, pack_size: int, entries: list[tuple[bytes, int, int]]) -> bytes:
    """The ``.idx`` bytes for a pack: header, entries, SHA-256 of all that."""
    parts = [IDX_HEADER.pack(IDX_MAGIC, IDX_VERSION, IDX_ENTRY.size, len(entries),
                             pack_size, _pack_id(name))]
    parts += [IDX_ENTRY.pack(d, off, n, 0) for d, off, n in entries]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def decode_index(name: str, data: bytes) -> tuple[int, list[tuple[bytes, int, int]]]:
    """Verify and parse an ``.idx`` file; return ``(pack size, entries)``.

    :raises CorruptObject: checksum, magic, version or size mismatch.
    """
    def bad(reason: str) -> CorruptObject:
        return CorruptObject(f"pack index {name}.idx is corrupt: {reason}; "
                             "run the store's gc() to rebuild it from the pack")

    if len(data) < IDX_HEADER.size + DIGEST_SIZE:
        raise bad(f"only {len(data)} bytes")
    body, checksum = data[:-DIGEST_SIZE], data[-DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != checksum:
        raise bad("SHA-256 checksum mismatch")
    magic, version, entry_size, count, pack_size, ident = IDX_HEADER.unpack_from(body)
    if magic != IDX_MAGIC or version != IDX_VERSION or entry_size != IDX_ENTRY.size:
        raise bad(f"unsupported header (magic {magic!r}, version {version})")
    if ident != _pack_id(name):
        raise bad("it belongs to another pack")
    if len(body) != IDX_HEADER.size + count * IDX_ENTRY.size:
        raise bad(f"length does not match {count} entries")
    entries = [(d, off, n) for d, off, n, _ in
               IDX_ENTRY.iter_unpack(memoryview(body)[IDX_HEADER.size:])]
    return pack_size, entries


# ------------------------------------------------------------------ pack scanning


@dataclass(slots=True)
class ScanResult:
    """What :func:`scan_pack` found: good records, bad ones, where parsing stopped."""

    entries: list[tuple[bytes, int, int]]
    corrupt: list[int]  # offsets of records whose payload fails its digest
    end: int  # offset after the last parseable record
    stop_reason: str | None  # why scanning stopped before the end of the file


def scan_pack(path: Path) -> ScanResult:
    """Walk a pack record by record, verifying every payload (index rebuild, GC)."""
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        _check_pack_header(path, mm)
        entries: list[tuple[bytes, int, int]] = []
        corrupt: list[int] = []
        off, size = PACK_HEADER.size, len(mm)
        while off + RECORD.size <= size:
            codec_id, kind, flags, stored, raw, crc, digest = RECORD.unpack_from(mm, off)
            if kind != KIND_PAGE or codec_id not in codecs.BY_ID or stored > MAX_STORED_LEN \
                    or raw != PAGE_SIZE or off + RECORD.size + stored > size:
                return ScanResult(entries, corrupt, off, f"unparseable record at offset {off}")
            reclen = RECORD.size + stored
            if _digest_of(mm, off, codec_id, stored) == digest \
                    and _crc_matches(mm, off, flags, stored, crc):
                entries.append((digest, off, reclen))
            else:
                corrupt.append(off)
            off += reclen
        reason = None if off == size else f"torn record at offset {off}"
        return ScanResult(entries, corrupt, off, reason)


def _check_pack_header(path: Path, mm: mmap.mmap) -> None:
    if len(mm) < PACK_HEADER.size:
        raise CorruptObject(f"pack {path.name}: shorter than its header")
    magic, version, hsize, _ = PACK_HEADER.unpack_from(mm)
    if magic != PACK_MAGIC or version != PACK_VERSION or hsize != PACK_HEADER.size:
        raise CorruptObject(f"pack {path.name}: bad header (magic {magic!r}, version {version})")


def _crc_matches(mm: mmap.mmap, off: int, flags: int, stored: int, crc: int) -> bool:
    """True if the record has no CRC-32 (written before it existed) or its CRC-32 holds."""
    start = off + RECORD.size
    return not flags & FLAG_CRC32 or zlib.crc32(mm[start:start + stored]) == crc


def _digest_of(mm: mmap.mmap, off: int, codec_id: int, stored: int) -> bytes | None:
    start = off + RECORD.size
    try:
        raw = codecs.BY_ID[codec_id].decode(mm[start:start + stored])
    except Exception:  # noqa: BLE001 - a corrupt compressed payload may raise anything
        return None
    return hashlib.sha256(raw).digest() if len(raw) == PAGE_SIZE else None


# ------------------------------------------------------------------ the store


class PageStore:
    """The packs directory and the in-memory index ``digest -> location``.

    Not thread-safe by itself for mutation; :class:`~.store.ImageStore` serialises
    :meth:`refresh` and :meth:`add_sealed` under its own mutex and the store lock.
    """

    def __init__(self, directory: Path, codec: codecs.PageCodec = codecs.NONE,
                 max_pack_bytes: int = DEFAULT_MAX_PACK) -> None:
        self.dir = directory
        self.codec = codec
        self.max_pack_bytes = max_pack_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[bytes, int] = {}
        self.packs: dict[int, PackInfo] = {}
        self.by_name: dict[str, PackInfo] = {}
        self.problems: dict[str, IndexProblem] = {}
        self._next_no = 0
        # digests whose record (the one the index points at) was read back and hashed, or
        # written by this process; valid while the pack's stamp is the one recorded here
        self.verified: set[bytes] = set()
        self._pack_stamps: dict[str, Stamp | None] = {}
        self._idx_stamps: dict[str, tuple[int, int] | None] = {}
        self.verify_s = 0.0  # time spent re-checking stored pages before reuse
        self.verified_pages = 0
        self._checker: PackReader | None = None  # kept mapped between checks

    # -- index maintenance

    def refresh(self) -> None:
        """Bring the index up to date with the ``.idx`` files on disk.

        New indexes are added; if one we know disappeared (GC in another process
        compacted its pack) the whole index is rebuilt, so no stale location survives.
        """
        on_disk = {p.stem for p in self.dir.glob("*.idx")}
        if set(self.by_name) - on_disk or self._rewritten_indexes():
            self._forget()
        self._drop_changed_packs()
        self.problems = {n: p for n, p in self.problems.items()
                         if n in on_disk and p.stamp == self._stamp(n)}
        for name in sorted(on_disk - set(self.by_name) - set(self.problems)):
            self._load_index(name)

    def reload(self) -> None:
        """Forget everything and re-read every index (after GC)."""
        self._forget()
        self.problems.clear()
        self.refresh()

    def _forget(self) -> None:
        self._close_checker()
        self.index.clear()
        self.packs.clear()
        self.by_name.clear()
        self.verified.clear()
        self._pack_stamps.clear()
        self._idx_stamps.clear()

    def _rewritten_indexes(self) -> bool:
        """True if an index we loaded was rewritten since (a bad record dropped from it,
        maybe by another process): its entries must be re-read, not trusted."""
        return any(self._stamp(name) != stamp for name, stamp in self._idx_stamps.items())

    def _drop_changed_packs(self) -> None:
        """Forget that a pack's pages were verified once its file changed (one stat per
        pack: the cheap invariant behind :attr:`verified`)."""
        for name, stamp in self._pack_stamps.items():
            info = self.by_name.get(name)
            if info is None or file_stamp(info.path) == stamp:
                continue
            _LOG.warning("page store %s: pack %s changed on disk since its pages were "
                         "verified; they are checked again before any reuse", self.dir, name)
            self.verified.difference_update(d for d, _, _ in info.entries)
            self._pack_stamps[name] = file_stamp(info.path)
            self._close_checker()  # never read through a mapping of a changed file

    def _load_index(self, name: str) -> None:
        path = self.dir / f"{name}.idx"
        try:
            pack_size, entries = decode_index(name, path.read_bytes())
            actual = (self.dir / f"{name}.pack").stat().st_size
        except FileNotFoundError:
            self._problem(name, "the pack file is missing (pages lost)")
            return
        except CorruptObject as err:
            self._problem(name, str(err))
            return
        if actual < pack_size:
            self._problem(name, f"pack is {actual} bytes, index covers {pack_size} (truncated)")
            return
        self._idx_stamps[name] = self._stamp(name)
        self._pack_stamps[name] = file_stamp(self.dir / f"{name}.pack")
        self._register(PackInfo(-1, name, self.dir / f"{name}.pack", pack_size, entries))

    def _stamp(self, name: str) -> tuple[int, int] | None:
        try:
            st = (self.dir / f"{name}.idx").stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _problem(self, name: str, reason: str) -> None:
        _LOG.error("page store %s: pack %s unusable: %s", self.dir, name, reason)
        self.problems[name] = IndexProblem(name, reason, self._stamp(name))

    def _register(self, info: PackInfo) -> None:
        info.no = self._next_no
        self._next_no += 1
        self.packs[info.no] = info
        self.by_name[info.name] = info
        index = self.index
        for digest, off, reclen in info.entries:
            if digest not in index:  # the first copy wins; later ones are GC fodder
                index[digest] = make_loc(info.no, off, reclen)

    def add_sealed(self, info: PackInfo) -> None:
        """Make a pack sealed by this process visible to lookups. Its pages count as
        verified: this process hashed each one before writing it."""
        self._idx_stamps[info.name] = self._stamp(info.name)
        self._pack_stamps[info.name] = file_stamp(info.path)
        self._register(info)
        self.verified.update(d for d, _, _ in info.entries
                             if split_loc(self.index[d])[0] == info.no)

    # -- verification before reuse, and dropping bad records

    def check_stored(self, digest: bytes, page: bytes | None = None) -> int | None:
        """The location of a *verified* stored copy of ``digest``, or None.

        Why: a capture that references a stored page instead of writing its own copy
        would carry a corrupted record into every later image. A digest not verified
        since its pack last changed is read back and checked (once per process): compared
        byte for byte with ``page`` (the capture's own copy, whose SHA-256 it has just
        computed: a compare is much cheaper than a hash, and this runs while the guest
        is paused), else hashed; a bad record is dropped from its index
        (:meth:`drop_record`), so the caller writes a fresh copy and the store is repaired.
        """
        loc = self.index.get(digest)
        if loc is None or digest in self.verified:
            return loc
        start = time.monotonic()
        if self._checker is None:
            self._checker = PackReader(self)
        try:
            if page is None or not self._checker.holds(loc, digest, page):
                self._checker.read(loc, digest)  # hashes; raises saying what is wrong
        except CorruptObject as err:
            self.drop_record(digest, loc, str(err))
            return None
        finally:
            self.verify_s += time.monotonic() - start
        self.verified_pages += 1
        self.verified.add(digest)
        return loc

    def _close_checker(self) -> None:
        if self._checker is not None:
            self._checker.close()
            self._checker = None

    def drop_record(self, digest: bytes, loc: int, reason: str) -> bool:
        """Take a bad record out of the index (memory and its ``.idx``, rewritten
        atomically): no image can use it, the next capture of that page stores a fresh
        copy, and GC reclaims the bytes. Returns False if the index had moved on."""
        if self.index.get(digest) != loc:
            return False
        pack_no, off, _ = split_loc(loc)
        info = self.packs[pack_no]
        info.entries = [e for e in info.entries if not (e[0] == digest and e[1] == off)]
        atomic_write(self.dir / f"{info.name}.idx",
                     encode_index(info.name, info.size, info.entries), mode=0o600)
        self._idx_stamps[info.name] = self._stamp(info.name)
        del self.index[digest]
        self.verified.discard(digest)
        for other in self.packs.values():  # another copy of the page, if any, takes over
            for d, o, n in other.entries if other is not info else ():
                if d == digest:
                    self.index[digest] = make_loc(other.no, o, n)
                    break
            if digest in self.index:
                break
        _LOG.error("page store %s: record %s of pack %s offset %d dropped from its index "
                   "(%s); a later capture stores the page afresh", self.dir,
                   digest.hex()[:16], info.name, off, reason)
        return True

    # -- lookups and sizes

    def record_len(self, digest: bytes) -> int | None:
        """Stored size (record header + payload) of a page, or None if absent."""
        loc = self.index.get(digest)
        return None if loc is None else loc & _LEN_MASK

    def disk_bytes(self) -> int:
        """Bytes of all pack and index files (sealed or not)."""
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def new_writer(self) -> PackWriter:
        """A writer for one new pack with the store's codec."""
        return PackWriter(self.dir, self.codec)

    def open_reader(self) -> PackReader:
        """A reader that maps packs lazily; close it when done."""
        return PackReader(self)


class PackReader:
    """Verified page reads from memory-mapped packs (no per-page open or seek)."""

    def __init__(self, store: PageStore) -> None:
        self._packs = dict(store.packs)  # a snapshot: numbering is stable while we read
        self._store = store  # packs sealed after the snapshot (another capture) are found here
        self._maps: dict[int, mmap.mmap] = {}

    def read(self, loc: int, digest: bytes) -> bytes:
        """The raw page at ``loc``, verified against ``digest``.

        :raises CorruptObject: with ``pack`` and ``offset`` attributes set.
        """
        pack_no = loc >> (_OFF_BITS + _LEN_BITS)  # split_loc() inlined: once per page
        off, reclen = (loc >> _LEN_BITS) & _OFF_MASK, loc & _LEN_MASK
        mm = self._maps.get(pack_no) or self._map(pack_no)
        codec_id, kind, flags, stored, raw_len, crc, rec_digest = RECORD.unpack_from(mm, off)
        if rec_digest != digest or kind != KIND_PAGE or RECORD.size + stored != reclen \
                or raw_len != PAGE_SIZE:
            raise self._corrupt(pack_no, off, "record header does not match the index")
        start = off + RECORD.size
        page = payload = mm[start:start + stored]
        if codec_id:
            page = self._decode(pack_no, off, codec_id, page)
        if hashlib.sha256(page).digest() != digest:
            raise self._corrupt(pack_no, off, "checksum mismatch (contents do not match "
                                "their SHA-256)")
        if flags & FLAG_CRC32 and zlib.crc32(payload) != crc:
            raise self._corrupt(pack_no, off, "CRC-32 mismatch (the record's header is "
                                "damaged; its contents match their SHA-256)")
        return page

    def holds(self, loc: int, digest: bytes, page: bytes) -> bool:
        """True if the raw record at ``loc`` is ``digest``'s and its payload is exactly
        ``page`` (False for anything else, compressed records included: :meth:`read`
        then decides)."""
        pack_no, off, reclen = split_loc(loc)
        mm = self._maps.get(pack_no) or self._map(pack_no)
        codec_id, kind, _, stored, raw_len, _, rec_digest = RECORD.unpack_from(mm, off)
        start = off + RECORD.size
        return (codec_id == 0 and kind == KIND_PAGE and rec_digest == digest
                and RECORD.size + stored == reclen and raw_len == PAGE_SIZE == len(page)
                and mm[start:start + stored] == page)

    def read_joined(self, wanted: list[tuple[int, bytes] | None], *,
                    strong: bool = False) -> bytes:
        """The pages ``wanted`` (``(loc, digest)``, None for a zero page), each verified,
        joined in order: :meth:`read` for a whole PAGE_DATA record with the per-page
        calls and copies taken out (what regeneration spends its time on in Python).

        A record with a CRC-32 is checked against it and against the digest it is read
        for (its name); ``strong`` (and a record without one) re-hashes its contents
        with SHA-256 as :meth:`read` does. Any mismatch goes through :meth:`read`, which
        says what is wrong.

        :raises CorruptObject: as :meth:`read`, plus ``index``: which page was bad.
        """
        if strong:
            return b"".join(ZERO_PAGE if page_ref is None else self._read_indexed(i, *page_ref)
                            for i, page_ref in enumerate(wanted))
        maps, crc32, unpack_from = self._maps, zlib.crc32, RECORD.unpack_from
        head = RECORD.size
        pack_shift, off_shift, off_mask = _OFF_BITS + _LEN_BITS, _LEN_BITS, _OFF_MASK
        # a raw page record of the expected size, CRC-32 flagged: (codec, kind, flags)
        # and (stored, raw) as unpacked, compared as tuples (one comparison, not five)
        good_kind, good_len = (0, KIND_PAGE, FLAG_CRC32), (PAGE_SIZE, PAGE_SIZE)
        pages: list[bytes] = []
        append = pages.append
        for index, page_ref in enumerate(wanted):
            if page_ref is None:
                append(ZERO_PAGE)
                continue
            loc, digest = page_ref
            off = (loc >> off_shift) & off_mask
            mm = maps.get(loc >> pack_shift) or self._map(loc >> pack_shift)
            codec_id, kind, flags, stored, raw_len, crc, rec_digest = unpack_from(mm, off)
            page = mm[off + head:off + head + PAGE_SIZE]
            if (codec_id, kind, flags & FLAG_CRC32) != good_kind \
                    or (stored, raw_len) != good_len or rec_digest != digest \
                    or loc & _LEN_MASK != head + PAGE_SIZE or crc32(page) != crc:
                page = self._read_indexed(index, loc, digest)  # SHA-256, and says why if bad
            append(page)
        return b"".join(pages)

    def _read_indexed(self, index: int, loc: int, digest: bytes) -> bytes:
        try:
            return self.read(loc, digest)
        except CorruptObject as err:
            err.index = index  # type: ignore[attr-defined]
            raise

    def _decode(self, pack_no: int, off: int, codec_id: int, payload: bytes) -> bytes:
        codec = codecs.BY_ID.get(codec_id)
        if codec is None:
            raise self._corrupt(pack_no, off, f"unknown codec {codec_id}")
        try:
            return codec.decode(payload)
        except Exception as err:
            raise self._corrupt(pack_no, off, f"{codec.name} decoding failed: {err}") from err

    def _map(self, pack_no: int) -> mmap.mmap:
        info = self._packs.get(pack_no) or self._store.packs[pack_no]
        self._packs[pack_no] = info
        with info.path.open("rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(mm) < info.size:
            mm.close()
            raise CorruptObject(f"pack {info.name} is {len(mm)} bytes, its index covers "
                                f"{info.size}: truncated")
        self._maps[pack_no] = mm
        return mm

    def _corrupt(self, pack_no: int, off: int, reason: str) -> CorruptObject:
        name = self._packs[pack_no].name
        err = CorruptObject(f"pack {name} offset {off}: {reason}")
        err.pack = name  # type: ignore[attr-defined]
        err.offset = off  # type: ignore[attr-defined]
        return err

    def close(self) -> None:
        """Unmap every pack."""
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()
