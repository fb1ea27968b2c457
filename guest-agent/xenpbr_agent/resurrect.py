"""The application's side of resurrection: a locked region of records dom0 can read back.

An application creates a :class:`Region` (``Region.create("kv", 1 << 20)``) and ``put``\\ s
its acknowledged state into it; if the guest kernel crashes, dom0 reads the region out of
the crashed memory and hands the latest version of each key back after the recovery
(docs/resurrection.md). The layout is docs/specs/resurrection-region.md, encoded by
:mod:`xenpbr.guestproto.resurrection`. This module is separate from the agent's boundary
code because it runs inside the application's process, not the agent's.

A commit (``put``/``delete``) is plain stores into locked memory: no system call, no I/O.
The index (key -> slot) lives in the process's ordinary memory; dom0 never needs it.

Creating a region needs root or ``CAP_SYS_ADMIN`` (the pfns come from
``/proc/self/pagemap``, which hides them from anyone else) and enough ``RLIMIT_MEMLOCK``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import Optional

from xenpbr.guestproto.resurrection import (
    FLAG_TOMBSTONE,
    MAX_KEY_LEN,
    PAGE_SIZE,
    RECORD_HEADER_SIZE,
    RECORD_MAGIC,
    REGISTRATION_DIR,
    RegionFormatError,
    crc,
    dir_pages_for,
    encode_directory,
    encode_header,
    encode_registration,
    parse_header,
)
from xenpbr.resurrection.model import Registration
from xenpbr.xenstore import XenstoreClient, XenstoreError
from xenpbr_agent import AgentError

log = logging.getLogger(__name__)

PAGEMAP = "/proc/self/pagemap"
#: 0 keeps compaction from migrating mlocked pages, so the pfns in the directory stay true.
COMPACT_UNEVICTABLE = "/proc/sys/vm/compact_unevictable_allowed"
_PM_PRESENT = 1 << 63
_PM_PFN_MASK = (1 << 55) - 1
_EMPTY = b"\0\0\0\0"
_RECORD_FIELDS = struct.Struct("<QHHI")  # seq, key_len, flags, value_len (bytes 8..23)
_U32 = struct.Struct("<I")

#: Gives the pfns of ``count`` pages starting at virtual address ``address``.
PfnLookup = Callable[[int, int], Sequence[int]]


class ResurrectError(AgentError):
    """A resurrection region cannot be created or used; the message says what to fix."""


class RegionFull(ResurrectError):
    """Every slot holds a current record: delete keys or create a larger region."""


def pagemap_pfns(address: int, count: int, path: str = PAGEMAP) -> list[int]:
    """The pfns of ``count`` resident pages at ``address`` from ``/proc/self/pagemap``."""
    try:
        with open(path, "rb") as pagemap:
            pagemap.seek(address // PAGE_SIZE * 8)
            raw = pagemap.read(8 * count)
    except OSError as exc:
        raise ResurrectError(f"cannot read {path}: {exc}") from exc
    pfns = []
    for (entry,) in struct.iter_unpack("<Q", raw):
        pfn = entry & _PM_PFN_MASK
        if not entry & _PM_PRESENT or pfn == 0:
            raise ResurrectError(f"{path} shows no pfn for the region's pages: run as root "
                                 "or with CAP_SYS_ADMIN (the kernel hides pfns otherwise)")
        pfns.append(pfn)
    return pfns


def keep_locked_pages_in_place(path: str = COMPACT_UNEVICTABLE) -> bool:
    """Set ``vm.compact_unevictable_allowed = 0``; True if it is 0 now.

    Failing is a warning, not an error: a page compaction moves anyway is caught by dom0
    (CRCs, the directory naming its own pages) and rejected, never delivered wrong."""
    try:
        with open(path) as current:
            if current.read().strip() == "0":
                return True
        with open(path, "w") as setting:
            setting.write("0\n")
        return True
    except OSError as exc:
        log.warning("cannot set vm.compact_unevictable_allowed=0 (%s): compaction may move "
                    "the region's pages; dom0 would then reject them", exc)
        return False


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _address(buffer: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # releases the buffer export so the mmap can be closed


def _lock(address: int, size: int) -> None:
    if _libc().mlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) != 0:
        err = ctypes.get_errno()
        hint = " (raise RLIMIT_MEMLOCK: ulimit -l)" if err in (errno.ENOMEM, errno.EPERM) else ""
        raise ResurrectError(f"mlock of {size} bytes failed: {os.strerror(err)}{hint}")


def _page_count(size: int) -> int:
    """Pages of a region whose record area holds at least ``size`` bytes."""
    area = max(1, -(-size // PAGE_SIZE))
    pages = 1 + 1 + area
    while pages != 1 + dir_pages_for(pages) + area:
        pages = 1 + dir_pages_for(pages) + area
    return pages


class Region:
    """One application's resurrection region (use :meth:`create`)."""

    def __init__(self, app: str, memory: mmap.mmap, pfns: Sequence[int], generation: int,
                 xenstore: Optional[XenstoreClient]) -> None:
        self.app = app
        self.generation = generation
        self.pfns = tuple(pfns)
        self._memory = memory
        self._xenstore = xenstore
        header = parse_header(memory[:PAGE_SIZE])
        self.slot_size = header.slot_size
        self.slot_count = header.slot_count
        self._area = header.first_record_page * PAGE_SIZE
        self._index: dict[bytes, int] = {}   # key -> slot of its current version
        self._tombstones: set[bytes] = set()
        self._free = list(range(header.slot_count - 1, -1, -1))
        self._seq = 0

    @classmethod
    def create(cls, app: str, size: int, slot_size: int = 256, *,
               xenstore: Optional[XenstoreClient] = None, register: bool = True,
               generation: Optional[int] = None, pfn_lookup: PfnLookup = pagemap_pfns,
               lock: bool = True) -> Region:
        """A region of at least ``size`` bytes of slots, locked and (``register``)
        registered in xenstore under ``data/xenpbr/resurrect/<app>``."""
        pages = _page_count(size)
        generation = time.time_ns() // 1000 if generation is None else generation
        try:
            header = encode_header(app, generation, pages, slot_size)
        except RegionFormatError as exc:
            raise ResurrectError(f"cannot lay out a region for {app!r}: {exc}") from exc
        memory = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            address = _address(memory)
            if lock:
                keep_locked_pages_in_place()
                _lock(address, pages * PAGE_SIZE)
            pfns = list(pfn_lookup(address, pages))
            memory[:PAGE_SIZE] = header
            for i, page in enumerate(encode_directory(pfns), 1):
                memory[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = page
            region = cls(app, memory, pfns, generation, None)
            if register:
                region._register(xenstore or XenstoreClient().open())
        except BaseException:
            memory.close()
            raise
        log.info("resurrection region %s: %d pages, %d slots of %d bytes, generation %d",
                 app, pages, region.slot_count, slot_size, generation)
        return region

    @property
    def registration(self) -> Registration:
        header = parse_header(self._memory[:PAGE_SIZE])
        return Registration(self.app, self.generation, len(self.pfns), self.pfns[0],
                            self.pfns[1:1 + header.dir_pages])

    @property
    def key_path(self) -> str:
        return f"{REGISTRATION_DIR}/{self.app}"

    def _register(self, xenstore: XenstoreClient) -> None:
        try:
            xenstore.write(self.key_path, encode_registration(self.registration))
        except XenstoreError as exc:
            raise ResurrectError(f"cannot register {self.key_path} in xenstore: {exc}") from exc
        self._xenstore = xenstore

    def _slot_offset(self, slot: int) -> int:
        return self._area + slot * self.slot_size

    def _commit(self, key: bytes, value: bytes, tombstone: bool) -> int:
        if not 1 <= len(key) <= MAX_KEY_LEN:
            raise ResurrectError(f"key of {len(key)} bytes: keys are 1..{MAX_KEY_LEN} bytes")
        end = RECORD_HEADER_SIZE + len(key) + len(value)
        if end > self.slot_size:
            raise ResurrectError(f"record of {end} bytes does not fit a {self.slot_size}-byte "
                                 "slot: create the region with a larger slot_size")
        # One slot stays spare for new versions, so a key can always be updated or deleted.
        if len(self._free) < (1 if key in self._index else 2):
            raise RegionFull(f"region {self.app}: all {self.slot_count} slots are in use "
                             "(one is kept for updates): delete keys or use a larger region")
        slot, seq = self._free.pop(), self._seq + 1
        base, memory = self._area + slot * self.slot_size, self._memory
        body = b"".join((_RECORD_FIELDS.pack(seq, len(key), FLAG_TOMBSTONE if tombstone
                                             else 0, len(value)), key, value))
        # the CRC and the body in one store, then the magic: the commit point
        memory[base + 4:base + end] = _U32.pack(crc(body)) + body
        memory[base:base + 4] = RECORD_MAGIC
        self._seq = seq
        old = self._index.get(key)
        if old is not None:
            old_base = self._area + old * self.slot_size
            memory[old_base:old_base + 4] = _EMPTY
            self._free.append(old)
        self._index[key] = slot
        if tombstone:
            self._tombstones.add(key)
        else:
            self._tombstones.discard(key)
        return seq

    def put(self, key: bytes, value: bytes) -> int:
        """Commit a new version of ``key``; returns its seq. No system call, no I/O."""
        return self._commit(bytes(key), bytes(value), tombstone=False)

    def delete(self, key: bytes) -> int:
        """Commit a tombstone for ``key`` (dom0 then reports it deleted); returns its seq."""
        return self._commit(bytes(key), b"", tombstone=True)

    def get(self, key: bytes) -> Optional[bytes]:
        """The current value of ``key``, None if never put or deleted."""
        slot = self._index.get(bytes(key))
        if slot is None or key in self._tombstones:
            return None
        base = self._slot_offset(slot)
        key_len, _, value_len = struct.unpack_from("<HHI", self._memory, base + 16)
        start = base + RECORD_HEADER_SIZE + key_len
        return bytes(self._memory[start:start + value_len])

    def pages(self) -> list[bytes]:
        """A copy of the region, page by page (for tests and tools)."""
        return [bytes(self._memory[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                for i in range(len(self.pfns))]

    def close(self) -> None:
        """Unregister and release the memory (dom0 no longer reads it after a crash)."""
        if self._xenstore is not None:
            try:
                self._xenstore.rm(self.key_path)
            except XenstoreError as exc:
                log.warning("cannot unregister %s: %s", self.key_path, exc)
            self._xenstore = None
        if not self._memory.closed:
            self._memory.close()

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
