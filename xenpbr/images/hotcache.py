"""A ready-made stream of each domain's newest image, for ``xl restore FILE``.

Why: restoring regenerates the ``xl save`` stream from the page store into a FIFO that
xl reads. Every pass over the data costs (pack read, SHA-256 per page, the pipe copy):
in the lab that stream ran at 26 MiB/s, most of a phase-based recovery, while xl reads a
plain file at several times that (docs/benchmarks). A crash wants the newest image,
the deepest phase, and it is known long before the crash. So after each capture xenpbrd
regenerates that image's stream once, in the background, into

    <store>/hot/<domain>/<image_id>.stream

and a restore of that image hands xl the file. Costs: one raw image of space per domain
(a cache: not charged to the quota, rebuilt after each capture, dropped with its image
and by GC), and a background pass after each capture.

Trust: the file is written from pages verified against their SHA-256 as they are read,
fsync'd, and renamed into place only when complete, so it is either whole or absent.
Beside it, ``<image_id>.sums`` (itself checksummed) holds the CRC-32 of every 1 MiB
chunk (SHA-256 in version 1 files, still read) and the stamps
(:func:`~.pagestore.file_stamp`) of the packs the image's pages were read from. A restore checks every chunk right before ``xl restore FILE``
(:func:`verify_file`; or as it copies them into xl's FIFO with ``hot_mode="stream"``):
a flipped byte is refused before the guest ever runs. A pack whose stamp changed since (someone wrote to it) makes
:func:`lookup` refuse the stream, so the restore regenerates from the page store and
verifies every page, and a damaged page rejects the image as it would without the
cache. Why CRC-32 for the chunks: the check guards the restore's critical path against
accidental damage after the file was written (a flipped bit, a torn or stale block),
which CRC-32 catches (every burst up to 32 bits, anything else but 1 in 2**32), as file
systems' block checksums do; it is 6x faster than SHA-256 under the lab's emulation
(646 against 107 MiB/s in dom0), and SHA-256 would add nothing against someone who can
write the file: the ``.sums`` beside it carries no key. The page store keeps SHA-256,
which names its pages. ``xenpbr_hot_stream = 0`` in a domain's
config (or ``[hot-stream] enabled = no`` in /etc/xenpbr/xenpbr.conf, ``XENPBR_HOT_CACHE=0``,
for the whole xenpbrd) restores that domain every time from verified pages instead.
``[hot-stream] dir`` (``XENPBR_HOT_STREAM_DIR``) puts the streams on another file system
than the store (docs/settings.md).

The store calls these functions with itself, typed as the narrow Protocol each needs
(:class:`~.layout.HasLayout` for paths, :class:`WarmSource` for a warm-up), so this
module never imports the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from xenpbr import settings
from xenpbr.fsutil import atomic_write, fsync_dir
from xenpbr.images import allocate_only
from xenpbr.images.allocate_only import GuestPages
from xenpbr.images.errors import Cancelled, CorruptObject, NoRoom
from xenpbr.images.image import ZERO_REF, Image, ImageMeta, check_image_id, check_name
from xenpbr.images.layout import HasLayout
from xenpbr.images.pagestore import PAGE_SIZE, PackInfo, Stamp, file_stamp

_LOG = logging.getLogger(__name__)
SUFFIX = ".stream"
SUMS_SUFFIX = ".sums"
CHUNK = 1 << 20
ENV = "XENPBR_HOT_CACHE"


class WarmSource(HasLayout, Protocol):
    """What :func:`warm` needs of the store (an ``ImageStore``): its images, their
    regenerated streams and the packs their pages are in."""

    def load(self, domain: str, image_id: str) -> Image: ...

    def images(self, domain: str) -> list[ImageMeta]: ...

    def regenerate(self, image: Image, fileobj: BinaryIO) -> int: ...

    def regenerate_allocating(self, image: Image,
                              fileobj: BinaryIO) -> tuple[int, list[int]]: ...

    @property
    def guest_pages(self) -> GuestPages | None: ...

    def packs_of(self, image: Image) -> list[PackInfo]: ...


def enabled() -> bool:
    """False if the operator turned the cache off (``[hot-stream] enabled = no`` or
    ``XENPBR_HOT_CACHE=0``)."""
    return settings.current().hot_stream


def hot_root(store: HasLayout) -> Path:
    """The folder of all hot streams: ``[hot-stream] dir``, else ``<store>/hot``."""
    return store.layout.hot_root()


def domain_dir(store: HasLayout, domain: str) -> Path:
    return hot_root(store) / check_name(domain, "domain")


def path_of(store: HasLayout, domain: str, image_id: str) -> Path:
    return domain_dir(store, domain) / f"{check_image_id(image_id)}{SUFFIX}"


def sums_of(path: Path) -> Path:
    """The chunk checksums beside a hot stream."""
    return path.with_name(path.name[:-len(SUFFIX)] + SUMS_SUFFIX)


class _Crc32:
    """zlib's CRC-32 with hashlib's update/digest shape (4 bytes, big-endian)."""

    def __init__(self, data: bytes = b"") -> None:
        self._crc = zlib.crc32(data)

    def update(self, data: Any) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


#: The chunk checks a ``.sums`` file may name: version 1 files hold "sha256" (read
#: still), version 2 name theirs in "algorithm". New files use :data:`ALGORITHM`.
CHECKS: dict[str, Any] = {"crc32": _Crc32, "sha256": hashlib.sha256}
ALGORITHM = "crc32"


@dataclass(frozen=True)
class HotStream:
    """A hot stream and what it must hash to, chunk by chunk."""

    path: Path
    size: int
    chunk: int
    sums: list[bytes]
    packs: dict[str, Stamp]
    algorithm: str = ALGORITHM
    #: zero pages left for Xen to allocate (:mod:`.allocate_only`), and a sample of
    #: their pfns that a restore reads back before the domain may run
    allocated: int = 0
    allocated_sample: tuple[int, ...] = ()


def lookup(store: HasLayout, image: Image) -> HotStream | None:
    """The ready stream of ``image``, or None (never built, replaced, incomplete, its
    checksums unreadable, or a pack it was built from changed since: then the restore
    regenerates from verified pages, which rejects the image if a page is damaged)."""
    path = path_of(store, image.meta.domain, image.meta.image_id)
    if not path.exists():
        return None
    try:
        hot = read_sums(path, image.meta.image_id, image.meta.stream_bytes)
    except CorruptObject as err:
        _LOG.warning("%s: not used, removed", err)
        _unlink(path)
        return None
    changed = [name for name, stamp in hot.packs.items()
               if file_stamp(store.layout.packs_dir / f"{name}.pack") != stamp]
    if changed:
        _LOG.warning("hot stream %s not used, removed: pack %s changed since it was built; "
                     "restoring from the page store, every page verified", path,
                     ", ".join(changed))
        _unlink(path)
        return None
    return hot


def read_sums(path: Path, image_id: str, stream_bytes: int) -> HotStream:
    """Load and check ``path``'s checksum file against the image it should hold.

    :raises CorruptObject: missing, damaged, or for another image or size.
    """
    where = sums_of(path)
    try:
        doc = json.loads(where.read_bytes())
        body = {k: v for k, v in doc.items() if k != "checksum"}
        ok = doc["checksum"] == _checksum(body)
        algorithm, listed = _listed_sums(body)
        sums = [bytes.fromhex(h) for h in listed]
        size, chunk = int(body["stream_bytes"]), int(body["chunk"])
        packs = {str(k): (int(v[0]), int(v[1]), int(v[2])) for k, v in body["packs"].items()}
        allocated = int(body.get("allocated", 0))
        allocated_sample = tuple(int(pfn) for pfn in body.get("allocated_sample", ()))
        actual = path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
        raise CorruptObject(f"hot stream {path}: checksums {where.name} unusable ({err})") from None
    if not ok or body.get("image_id") != image_id or chunk <= 0:
        raise CorruptObject(f"hot stream {path}: checksum mismatch of {where.name} itself")
    expected = stream_bytes - allocated * PAGE_SIZE  # each page left to Xen: no data
    if size != expected or actual != size or len(sums) != -(-size // chunk) \
            or allocated < 0 or bool(allocated) != bool(allocated_sample):
        raise CorruptObject(f"hot stream {path} has {actual} bytes, its checksums cover "
                            f"{size}, the image {stream_bytes} less {allocated} pages "
                            "left to Xen")
    return HotStream(path, size, chunk, sums, packs, algorithm, allocated, allocated_sample)


def _listed_sums(body: dict[str, Any]) -> tuple[str, list[str]]:
    """The chunk check a ``.sums`` body names and its list of hex digests."""
    if body.get("version") == 1:
        return "sha256", body["sha256"]
    if body.get("version") == 2 and body.get("algorithm") in CHECKS:
        return body["algorithm"], body["sums"]
    raise ValueError(f"version {body.get('version')!r} with check "
                     f"{body.get('algorithm')!r} is not one this xenpbr reads")


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
    sums_of(path).unlink(missing_ok=True)


def stream_verified(hot: HotStream, sink: BinaryIO, what: str) -> int:
    """Copy the hot stream to ``sink`` chunk by chunk, each checked before it is written.

    ``hot_mode="stream"`` of a restore: xl reads exactly the bytes checked; in the lab
    it was slower than hashing the file first in two of three runs (docs/images.md).
    :raises CorruptObject: names the file, the chunk and its offset.
    """
    written = 0
    check = CHECKS[hot.algorithm]
    with open(hot.path, "rb", buffering=0) as f:
        for number, expected in enumerate(hot.sums):
            data = f.read(hot.chunk)
            if check(data).digest() != expected or not data:
                err = CorruptObject(f"{what}: hot stream {hot.path} chunk #{number} (offset "
                                    f"{number * hot.chunk}, {len(data)} bytes): checksum "
                                    "mismatch; the stream is not used")
                err.hot_stream = hot.path  # type: ignore[attr-defined]
                err.offset = number * hot.chunk  # type: ignore[attr-defined]
                raise err
            sink.write(data)
            written += len(data)
    return written


def verify_file(hot: HotStream, what: str) -> float:
    """Hash the whole hot stream (``scrub``, and the default restore, ``hot_mode="file"``);
    returns the seconds it took."""
    start = time.monotonic()

    class _Null:
        def write(self, data: bytes) -> int:
            return len(data)
    stream_verified(hot, _Null(), what)  # type: ignore[arg-type]
    return time.monotonic() - start


class _CancellableFile:
    """A file whose writes raise :class:`Cancelled` once ``cancel`` is set, and that
    hashes what it writes in :data:`CHUNK`-sized chunks (:attr:`sums`)."""

    def __init__(self, f: BinaryIO, cancel: threading.Event | None) -> None:
        self.f, self.cancel = f, cancel
        self.sums: list[bytes] = []
        self._hash = CHECKS[ALGORITHM]()
        self._fill = 0

    def write(self, data: Any) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("warm-up cancelled")
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            take = min(CHUNK - self._fill, len(view) - pos)
            self._hash.update(view[pos:pos + take])
            self._fill += take
            pos += take
            if self._fill == CHUNK:
                self._close_chunk()
        return self.f.write(data)

    def _close_chunk(self) -> None:
        self.sums.append(self._hash.digest())
        self._hash = CHECKS[ALGORITHM]()
        self._fill = 0

    def finish(self) -> list[bytes]:
        """The sums, the last (short) chunk included."""
        if self._fill:
            self._close_chunk()
        return self.sums

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def warm(store: WarmSource, domain: str, image_id: str,
         cancel: threading.Event | None = None) -> Path | None:
    """Regenerate ``image_id``'s stream into the cache, dropping the domain's other
    streams first. Returns None (and writes nothing) if it is not, or stops being, the
    domain's newest image: only that one is worth the space.
    :raises Cancelled: ``cancel`` was set. :raises NoRoom: not enough space."""
    image = store.load(domain, image_id)
    if not _is_newest(store, domain, image_id):
        return None
    dest = path_of(store, domain, image_id)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # an older image's stream is worth less than this one's: free its room first (at
    # 512 MiB in the lab, keeping it until the new one was written left no room for it)
    drop(store, domain, keep=image_id)
    # zero pages left to Xen only where a restore can read them back (module
    # allocate_only: xenpbrd's store has a guest page reader) and Xen is trusted to zero
    allocating = store.guest_pages is not None and allocate_only.trusted()
    zeros = image.refs.count(ZERO_REF) if allocating else 0  # (zero page tables keep theirs)
    _check_room(dest.parent, image.meta.stream_bytes - zeros * PAGE_SIZE)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    start = time.monotonic()
    packs = _pack_stamps(store, image)  # before reading: a later write shows as a change
    try:
        with open(tmp, "wb") as out:
            summer = _CancellableFile(out, cancel)
            if allocating:
                written, left = store.regenerate_allocating(image, summer)  # type: ignore[arg-type]
            else:
                written, left = store.regenerate(image, summer), []  # type: ignore[arg-type]
            out.flush()
            os.fsync(out.fileno())
        if not _is_newest(store, domain, image_id):
            tmp.unlink()
            return None
        body = {"version": 2, "image_id": image_id, "stream_bytes": written, "chunk": CHUNK,
                "algorithm": ALGORITHM, "sums": [h.hex() for h in summer.finish()],
                "packs": packs, "allocated": len(left),
                "allocated_sample": allocate_only.sample(left)}
        atomic_write(sums_of(dest), json.dumps({**body, "checksum": _checksum(body)}).encode(),
                     mode=0o600)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _LOG.info("hot stream of %s/%s ready: %d bytes in %.2f s%s", domain, image_id, written,
              time.monotonic() - start,
              f", {len(left)} zero pages left to Xen" if allocating else "")
    return dest


def _pack_stamps(store: WarmSource, image: Image) -> dict[str, Stamp]:
    """The stamps of the packs holding the image's pages, as :func:`lookup` compares."""
    stamps = {info.name: file_stamp(info.path) for info in store.packs_of(image)}
    return {name: stamp for name, stamp in stamps.items() if stamp is not None}


def _is_newest(store: WarmSource, domain: str, image_id: str) -> bool:
    newest = store.images(domain)
    return bool(newest) and newest[-1].image_id == image_id


#: What a hot stream must leave free: the state directory, the next capture's pages and
#: the daemon's log live on the same file system (a recovery that could not write its
#: intent record once failed outright in the lab).
RESERVE_FRACTION = 0.10
RESERVE_MIN = 128 << 20


def _check_room(folder: Path, size: int) -> None:
    usage = shutil.disk_usage(folder)
    reserve = max(RESERVE_MIN, int(usage.total * RESERVE_FRACTION))
    if usage.free - size < reserve:
        raise NoRoom(f"a hot stream of {size >> 20} MiB would leave {max(usage.free - size, 0) >> 20} "
                     f"MiB free in {folder}, less than the {reserve >> 20} MiB kept for the "
                     "store and xenpbrd's state; restores use the page store (free space, "
                     f"or move the streams with {settings.hint('hot_stream_dir')})")


def drop(store: HasLayout, domain: str, image_id: str | None = None,
         keep: str | None = None) -> None:
    """Remove the domain's hot streams: one (``image_id``), or all but ``keep``."""
    folder = domain_dir(store, domain)
    if not folder.is_dir():
        return
    for path in folder.glob(f"*{SUFFIX}"):
        name = path.name[:-len(SUFFIX)]
        if (image_id is None or name == image_id) and name != keep:
            _unlink(path)
    for path in folder.glob(f"*{SUMS_SUFFIX}"):  # checksums whose stream is gone
        if not path.with_name(path.name[:-len(SUMS_SUFFIX)] + SUFFIX).exists() \
                and path.name[:-len(SUMS_SUFFIX)] != keep:
            path.unlink(missing_ok=True)


def orphans(store: HasLayout) -> list[Path]:
    """Hot streams (and leftovers of interrupted writes) whose image is gone."""
    root = hot_root(store)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            suffix = next((s for s in (SUFFIX, SUMS_SUFFIX) if path.name.endswith(s)), None)
            name = path.name[:-len(suffix)] if suffix else ""
            if suffix == SUMS_SUFFIX and (folder / f"{name}{SUFFIX}").exists():
                continue  # goes with its stream (:func:`remove`)
            if not name or not store.layout.manifest_path(folder.name, name).exists():
                found.append(path)
    return found


def remove(path: Path) -> None:
    """Delete a hot stream (or leftover) and the checksums that go with it."""
    path.unlink(missing_ok=True)
    if path.name.endswith(SUFFIX):
        sums_of(path).unlink(missing_ok=True)
