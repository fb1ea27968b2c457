"""``ImageStore``: the restartable images of every domain of a host, on one directory.

The store composes its helpers and none of them imports it back: the on-disk layout
(:mod:`.layout`), the page store (:mod:`.pagestore`), disk snapshots (:mod:`.disks`),
hot streams (:mod:`.hotcache`), GC (:mod:`.garbage`), scrub (:mod:`.scrub`) and the
capture writer (:mod:`.writer`) each take the store as the narrow Protocol they need.

Everything is created mode 0600/0700: images hold guest memory (keys, passwords).

**Quota.** A domain is charged for every distinct page its images reference (stored
size, record header included), counted once per domain and *in full even when
other domains share the page*, plus its manifest files. So a domain's usage depends
only on its own images (deleting another domain's images never pushes it over),
and is what its images would occupy in a store of their own. Host-wide usage is
smaller thanks to cross-domain sharing (:meth:`ImageStore.disk_bytes`). A capture
that would exceed the quota raises :class:`QuotaExceeded` before the page that
crosses it is written, and publishes nothing.

**Concurrency.** Captures, restores and listings of any domains may run at the same
time, from threads or processes: writers append only to their own unsealed packs,
readers only read sealed packs referenced by published manifests. GC excludes both
through the lock. Two captures *of the same domain* at once may jointly overshoot the
quota (each checks against the images published when it began); the phase controller
serialises captures per domain.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from xenpbr.fsutil import atomic_write, atomic_write_json, fsync_dir
from xenpbr.images import codecs, disks, garbage, hotcache, manifest
from xenpbr.images import scrub as scrubbing
from xenpbr.images.allocate_only import GuestPages
from xenpbr.images.errors import CorruptObject, ImageError, ImageInvalid, ImageNotFound
from xenpbr.images.image import Image, ImageEntry, ImageMeta, check_name
from xenpbr.images.layout import StoreLayout
from xenpbr.images.locking import StoreLock
from xenpbr.images.pagestore import (
    DEFAULT_MAX_PACK,
    PackInfo,
    PageStore,
    Stamp,
    file_stamp,
    split_loc,
)
from xenpbr.images.reader import ImageReader, resolve
from xenpbr.images.writer import CaptureWriter

_LOG = logging.getLogger(__name__)
FORMAT = b"xenpbr-image-store 1\n"
#: Decoded manifests kept by one store object, most recently loaded last: xenpbrd loads
#: a domain's newest image to warm its hot stream, and a recovery loading it again then
#: skips the decoding (at 1024 MiB under TCG, the restore step's start to xl's went from
#: 2.0 s, loading the 4.7 MB manifest in between, to 0.02 s: docs/benchmarks/README.md).
DECODED_KEPT = 4


@dataclass(frozen=True)
class DomainUsage:
    """What a domain is charged (see the module docstring), in bytes."""

    domain: str
    images: int
    page_bytes: int
    manifest_bytes: int
    quota: int | None
    disk_bytes: int = 0  # snapshots of its ``snapshot`` disks (:mod:`.disks`)

    @property
    def total(self) -> int:
        return self.page_bytes + self.manifest_bytes + self.disk_bytes

    @property
    def over_quota(self) -> bool:
        return self.quota is not None and self.total > self.quota


class ImageStore:
    """The image store rooted at ``root`` (created if missing)."""

    def __init__(self, root: Path | str, *, codec: str = "none",
                 default_quota: int | None = None, max_pack_bytes: int = DEFAULT_MAX_PACK,
                 lock_timeout: float = 300.0) -> None:
        self.root = Path(root)
        self.layout = StoreLayout(self.root)
        self.default_quota = default_quota
        self.lock_timeout = lock_timeout
        #: copies of a running domain's pages (xenpbrd sets its libxc reader): what a
        #: restore needs to check the pages a hot stream left to Xen (:mod:`.allocate_only`)
        self.guest_pages: GuestPages | None = None
        self._init_layout()
        self.pages = PageStore(self.layout.packs_dir, codecs.by_name(codec), max_pack_bytes)
        self._mutex = threading.RLock()
        self._decoded: OrderedDict[tuple[str, str], tuple[Stamp, Image]] = OrderedDict()
        with self._mutex:
            self.pages.refresh()

    def _init_layout(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker = self.layout.format_path
        if marker.exists():
            if marker.read_bytes() != FORMAT:
                raise ImageError(f"{self.root} is not a version-1 xenpbr image store "
                                 f"(FORMAT says {marker.read_bytes()[:40]!r})")
        else:
            atomic_write(marker, FORMAT, mode=0o600)
        for sub in (self.layout.images_dir, self.layout.packs_dir):
            sub.mkdir(mode=0o700, exist_ok=True)

    # ------------------------------------------------------------------ locking

    def _lock(self, exclusive: bool = False, timeout: float | None = None) -> StoreLock:
        return StoreLock(self.layout.lock_path, exclusive,
                         self.lock_timeout if timeout is None else timeout)

    def _refresh(self) -> None:
        with self._mutex:
            self.pages.refresh()

    def checked_loc(self, digest: bytes, page: bytes | None = None) -> int | None:
        """A verified stored copy of ``digest`` (compared with ``page`` if given) for a
        capture to reference, or None (absent, or found corrupt and dropped: store the
        page again)."""
        with self._mutex:
            return self.pages.check_stored(digest, page)

    def drop_bad_record(self, digest: bytes, pack: str, offset: int, reason: str) -> bool:
        """Drop a record a reader found corrupt from its index (see
        :meth:`.pagestore.PageStore.drop_record`); False if the index moved on."""
        with self._mutex:
            info = self.pages.by_name.get(pack)
            loc = self.pages.index.get(digest)
            if info is None or loc is None or split_loc(loc)[:2] != (info.no, offset):
                return False
            return self.pages.drop_record(digest, loc, reason)

    def drop_indexed_record(self, digest: bytes, loc: int, reason: str, *,
                            repair: bool) -> tuple[bool, bool]:
        """A scrub found the record at ``loc`` corrupt: ``(used, dropped)``, whether the
        index points at it and whether it was dropped (only with ``repair``)."""
        with self._mutex:
            used = self.pages.index.get(digest) == loc
            dropped = repair and used and self.pages.drop_record(digest, loc, reason)
        return used, dropped

    def register_packs(self, sealed: list[PackInfo]) -> None:
        """A writer committed: make its packs visible to this process's lookups."""
        with self._mutex:
            for info in sealed:
                if info.name not in self.pages.by_name:
                    self.pages.add_sealed(info)

    def packs_of(self, image: Image) -> list[PackInfo]:
        """The sealed packs holding ``image``'s pages (index read under the mutex)."""
        with self._mutex:
            self.pages.refresh()
            numbers = {split_loc(loc)[0] for loc in resolve(self.pages, image)}
            return [self.pages.packs[n] for n in numbers]

    # ------------------------------------------------------------------ paths

    def domain_dir(self, domain: str) -> Path:
        return self.layout.domain_dir(domain)

    def manifest_path(self, domain: str, image_id: str) -> Path:
        return self.layout.manifest_path(domain, image_id)

    def mark_invalid(self, domain: str, image_id: str, reason: str) -> None:
        """Record that an image must not be used, and why: a restore or a scrub found
        one of its objects bad. Listings then show it invalid with the reason, and
        :meth:`load` refuses it, in every process (the manifest itself is intact)."""
        path = self.layout.invalid_path(domain, image_id)
        if not self.manifest_path(domain, image_id).exists():
            return
        atomic_write_json(path, {"version": 1, "reason": reason, "at": time.time()})
        hotcache.drop(self, domain, image_id)
        _LOG.error("image %s/%s marked invalid: %s", domain, image_id, reason)

    def invalid_reason(self, domain: str, image_id: str) -> str | None:
        """Why the image was marked invalid, or None."""
        try:
            data = json.loads(self.layout.invalid_path(domain, image_id).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return "marked invalid (the marker file is unreadable)"
        return str(data.get("reason", "marked invalid")) if isinstance(data, dict) else \
            "marked invalid"

    def domains(self) -> list[str]:
        """Domains with at least one manifest."""
        return self.layout.domains()

    # ------------------------------------------------------------------ quotas

    def quota(self, domain: str) -> int | None:
        """The domain's quota in bytes (None: unlimited)."""
        check_name(domain, "domain")
        return self._quotas().get(domain, self.default_quota)

    def set_quota(self, domain: str, limit: int | None) -> None:
        """Set (or with None, remove) a domain's quota; existing images are kept."""
        check_name(domain, "domain")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ImageError(f"quota must be a non-negative number of bytes, not {limit!r}")
        with self._mutex:
            quotas = self._quotas()
            if limit is None:
                quotas.pop(domain, None)
            else:
                quotas[domain] = limit
            atomic_write_json(self.layout.quotas_path, {"version": 1, "quotas": quotas})

    def _quotas(self) -> dict[str, int]:
        try:
            data = json.loads(self.layout.quotas_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as err:
            raise ImageError(f"{self.layout.quotas_path} is damaged ({err}); fix or "
                             "remove it (quotas then fall back to the default)") from err
        quotas = data.get("quotas", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in quotas.items() if isinstance(v, int)}

    def usage(self, domain: str) -> DomainUsage:
        """What the domain is charged against its quota."""
        _, page_bytes, manifest_bytes, count = self._charged(domain)
        return DomainUsage(domain, count, page_bytes, manifest_bytes, self.quota(domain),
                           disks.allocated_bytes(self, domain))

    def _charged(self, domain: str) -> tuple[set[bytes], int, int, int]:
        hashes: set[bytes] = set()
        manifest_bytes = count = 0
        for path in self.layout.domain_manifests(domain):
            try:
                data = path.read_bytes()
                parts = manifest.decode_parts(data, f"{domain}/{path.stem}")
            except (FileNotFoundError, CorruptObject):
                continue  # deleted meanwhile, or invalid: not charged (GC removes it)
            hashes.update(parts.hashes)
            manifest_bytes += len(data)
            count += 1
        with self._mutex:
            lens = [self.pages.record_len(h) for h in hashes]
        return hashes, sum(n for n in lens if n), manifest_bytes, count

    # ------------------------------------------------------------------ capture

    def begin_capture(self, domain: str, phase: str, *, seq: int = 0, fingerprint: str = "",
                      uuid: str | None = None, extra: dict[str, Any] | None = None
                      ) -> CaptureWriter:
        """Start storing an image; feed ``writer.on_page`` then ``writer.commit(stream)``.

        Holds the store lock (shared) until commit or abort, so use it as a context
        manager or make sure one of them is called.
        """
        check_name(domain, "domain")
        check_name(phase, "phase")
        if not isinstance(fingerprint, str) or len(fingerprint) > 4096:
            raise ImageError("fingerprint must be a string of at most 4096 characters")
        lock = self._lock()
        try:
            self._refresh()
            self.domain_dir(domain).mkdir(mode=0o700, exist_ok=True)
            charged, page_bytes, manifest_bytes, _ = self._charged(domain)
            return CaptureWriter(self, lock, domain, phase, seq=seq, fingerprint=fingerprint,
                                 uuid=uuid, extra=dict(extra or {}), quota=self.quota(domain),
                                 charged=charged, charged_bytes=page_bytes + manifest_bytes
                                 + disks.allocated_bytes(self, domain))
        except BaseException:
            lock.release()
            raise

    # ------------------------------------------------------------------ listing

    def scan(self, domain: str) -> list[ImageEntry]:
        """Every manifest of the domain, verified (checksum), oldest first (ids start
        with their UTC creation time); invalid ones carry their error, not metadata."""
        entries = []
        for path in self.layout.domain_manifests(domain):
            try:
                meta = manifest.read_meta(path.read_bytes(), f"{domain}/{path.stem}")
                self._check_not_marked(domain, path.stem)
                entries.append(ImageEntry(domain, path.stem, meta, None))
            except FileNotFoundError:
                continue
            except ImageInvalid as err:
                _LOG.warning("image %s/%s is invalid: %s", domain, path.stem, err)
                entries.append(ImageEntry(domain, path.stem, None, err))
        return sorted(entries, key=lambda e: e.image_id)

    def _check_not_marked(self, domain: str, image_id: str) -> None:
        reason = self.invalid_reason(domain, image_id)
        if reason is not None:
            raise CorruptObject(f"image {domain}/{image_id} was marked invalid: {reason}")

    def images(self, domain: str) -> list[ImageMeta]:
        """Metadata of the domain's valid images, oldest first."""
        return [e.meta for e in self.scan(domain) if e.meta is not None]

    # ------------------------------------------------------------------ loading

    def load(self, domain: str, image_id: str) -> Image:
        """Read and verify a manifest; check every page it needs is in the store.

        Page *contents* are verified as they are read (:meth:`reader`) or by :meth:`verify`.

        :raises ImageNotFound, CorruptObject, MissingObject:
        """
        image = self._decode(domain, image_id)
        self._check_not_marked(domain, image_id)
        if (image.meta.domain, image.meta.image_id) != (domain, image_id):
            raise CorruptObject(f"manifest {self.manifest_path(domain, image_id)} describes "
                                f"image {image.meta.domain}/"
                                f"{image.meta.image_id}: it was moved or copied; not used")
        with self._mutex:
            self.pages.refresh()
            resolve(self.pages, image)
        return image

    def _decode(self, domain: str, image_id: str) -> Image:
        """The manifest decoded and its checksum verified, or the same image as the last
        time if the file's stamp (inode, size, ctime: any write moves it) is unchanged."""
        path = self.manifest_path(domain, image_id)
        key, stamp = (domain, image_id), file_stamp(path)
        with self._mutex:
            held = self._decoded.get(key)
            if held is not None and stamp is not None and held[0] == stamp:
                self._decoded.move_to_end(key)
                return held[1]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(f"domain {domain} has no image {image_id} in {self.root}") from None
        image = manifest.decode(data, f"{domain}/{image_id}")
        if stamp is not None and file_stamp(path) == stamp:  # not replaced while read
            with self._mutex:
                self._decoded[key] = (stamp, image)
                self._decoded.move_to_end(key)
                while len(self._decoded) > DECODED_KEPT:
                    self._decoded.popitem(last=False)
        return image

    def reader(self, image: Image) -> ImageReader:
        """Verified page source for regenerating ``image`` (holds the shared lock)."""
        lock = self._lock()
        try:
            with self._mutex:
                self.pages.refresh()
                return ImageReader(self.pages, image, lock)
        except BaseException:
            lock.release()
            raise

    def regenerate(self, image: Image, fileobj: BinaryIO) -> int:
        """Write the image's ``xl save`` stream to ``fileobj``; return bytes written."""
        with self.reader(image) as pages:
            return pages.write_to(fileobj)

    def regenerate_allocating(self, image: Image, fileobj: BinaryIO) -> tuple[int, list[int]]:
        """The image's stream with its zero plain pages left for Xen to allocate
        (:mod:`.allocate_only`); bytes written and the pfns left to Xen."""
        with self.reader(image) as pages:
            return pages.write_allocating_to(fileobj)

    def verify(self, domain: str, image_id: str) -> ImageMeta:
        """Full check: manifest, then every page read back and hashed."""
        image = self.load(domain, image_id)
        with self.reader(image) as pages:
            pages.verify_all()
        return image.meta

    # ------------------------------------------------------------------ removal

    def delete(self, domain: str, image_id: str) -> None:
        """Remove an image and its disk snapshots (its pages are reclaimed by the next
        :meth:`gc`)."""
        path = self.manifest_path(domain, image_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise ImageNotFound(f"domain {domain} has no image {image_id}") from None
        self.layout.invalid_path(domain, image_id).unlink(missing_ok=True)
        fsync_dir(path.parent)
        disks.remove(self, domain, image_id)
        hotcache.drop(self, domain, image_id)
        _LOG.info("image %s/%s deleted", domain, image_id)

    def gc(self, *, min_dead_fraction: float = 0.1, drop_invalid: bool = False,
           wait: float = 0.0) -> garbage.GcReport:
        """Reclaim unreferenced pages; see :mod:`.garbage`.

        :param wait: seconds to wait for running captures/restores (else StoreBusy).
        :param min_dead_fraction: rewrite a pack when at least this share of it is dead
            (packs with no live page are always deleted).
        """
        with self._lock(exclusive=True, timeout=wait), self._mutex:
            return garbage.collect(self, min_dead_fraction=min_dead_fraction,
                                   drop_invalid=drop_invalid)

    def scrub(self, repair: bool = True) -> scrubbing.ScrubReport:
        """Verify every object of the store; mark images that need a bad one invalid and
        (``repair``) drop bad records and hot streams so later captures rewrite them.
        Holds the lock shared: captures and restores go on meanwhile (:mod:`.scrub`)."""
        with self._lock():
            self._refresh()
            return scrubbing.scrub(self, repair=repair)

    def disk_bytes(self) -> int:
        """Bytes of every pack, index and manifest file (what the store occupies)."""
        total = self.pages.disk_bytes()
        for domain in self.domains():
            total += disks.allocated_bytes(self, domain)
        for path in self.layout.images_dir.rglob("*"):
            if path.is_file():
                total += path.stat().st_size
        return total
