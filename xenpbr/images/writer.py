"""The capture side of the store: pages in (``on_page``), one manifest out (``commit``).

A :class:`CaptureWriter` is the ``on_page`` visitor of :func:`xenpbr.stream.read_stream`.
Per page it does the minimum: one copy, one compare against the zero page, one
SHA-256, one dict lookup, and for a page new to the store one buffered append. A page
already stored is referenced only once its stored record has been read back and
compared with the page being captured (:meth:`~.pagestore.PageStore.check_stored`, once
per process while its pack file is unchanged): a corrupt record is dropped and the page
written afresh, so one damaged object is never carried into later images. New pages
go to the writer's own pack files, invisible to everyone until :meth:`commit`
seals them (fsync, then index) and publishes the manifest (temp + fsync + rename),
which is the commit point. A writer that dies before that leaves no image; its packs
are reclaimed by GC.

The writer sees the store only as a :class:`CaptureTarget`, so this module does not
import the store that creates it.
"""

from __future__ import annotations

import logging
import secrets
import time
from array import array
from dataclasses import dataclass, replace
from hashlib import sha256
from pathlib import Path
from typing import Any, Protocol, Self

import xenpbr
from xenpbr.fsutil import atomic_write
from xenpbr.images import manifest, skeleton
from xenpbr.images.errors import ImageError, QuotaExceeded
from xenpbr.images.image import ZERO_REF, ImageMeta
from xenpbr.images.locking import StoreLock
from xenpbr.images.pagestore import (
    PAGE_SIZE,
    RECORD,
    ZERO_PAGE,
    PackInfo,
    PackWriter,
    PageStore,
    split_loc,
)
from xenpbr.stream.model import Stream

_LOG = logging.getLogger(__name__)


class CaptureTarget(Protocol):
    """What a writer needs of the store (an ``ImageStore``): its page store, a verified
    copy of a page already stored, where the manifest goes, and to learn of new packs."""

    pages: PageStore

    def checked_loc(self, digest: bytes, page: bytes | None = None) -> int | None: ...

    def manifest_path(self, domain: str, image_id: str) -> Path: ...

    def register_packs(self, sealed: list[PackInfo]) -> None: ...


@dataclass(frozen=True)
class CaptureStats:
    """Page accounting of one capture.

    ``data_pages = zero_pages + new_pages + dedup_pages``; ``dedup_pages`` counts
    pages already in the store (any image, any domain) or repeated within this image.
    """

    data_pages: int
    zero_pages: int
    new_pages: int
    dedup_pages: int
    new_bytes: int  # bytes appended to packs by this capture


def new_image_id(now: float) -> str:
    """Sortable, unique, path-safe: ``20261123T201535.123456Z-3fa9c2``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now * 1e6) % 1_000_000:06d}Z-{secrets.token_hex(3)}"


class CaptureWriter:
    """Stores one image's pages as they stream by; see the module docstring."""

    def __init__(self, store: CaptureTarget, lock: StoreLock, domain: str, phase: str, *,
                 seq: int, fingerprint: str, uuid: str | None, extra: dict[str, Any],
                 quota: int | None, charged: set[bytes], charged_bytes: int) -> None:
        self.store = store
        self.domain, self.phase, self.seq = domain, phase, seq
        self.fingerprint, self.uuid, self.extra = fingerprint, uuid, extra
        self.created = time.time()
        self.image_id = new_image_id(self.created)
        self._lock: StoreLock | None = lock
        self._quota = quota
        self._charged = charged  # digests the domain's images already reference
        self._charged_bytes = charged_bytes
        self._index = store.pages.index
        self._verified = store.pages.verified
        self._rechecked_from = (store.pages.verified_pages, store.pages.verify_s)
        self._hashes: list[bytes] = []
        self._local: dict[bytes, int] = {}
        self._refs = array("I")
        self._packs: list[PackWriter] = []
        self._pack: PackWriter | None = None
        self.zero_pages = self.new_pages = self.dedup_pages = 0
        self.new_bytes = self.stored_page_bytes = 0
        self.committed: ImageMeta | None = None

    # ------------------------------------------------------------------ pages

    def on_page(self, pfn: int, type_bits: int, data: memoryview) -> None:
        """Reader callback: record one data-carrying page (called in stream order).

        The hot path of a capture (once per page, 32768 times for 128 MiB): one copy,
        one compare, one hash, one lookup; the rest is in :meth:`_first_use`.
        """
        page = bytes(data)
        if page == ZERO_PAGE:
            self.zero_pages += 1
            self._refs.append(ZERO_REF)
            return
        digest = sha256(page).digest()
        ref = self._local.get(digest)
        if ref is None:
            ref = self._first_use(digest, page)
        else:
            self.dedup_pages += 1
        self._refs.append(ref)

    def _first_use(self, digest: bytes, page: bytes) -> int:
        """A digest this image has not referenced yet: dedup against the store or append."""
        if self._lock is None:
            raise ImageError(f"capture {self.domain}/{self.image_id} is closed")
        loc = self._index.get(digest)
        if loc is not None and digest not in self._verified:
            loc = self.store.checked_loc(digest, page)  # never reference an unverified record
        if loc is None:
            pack = self._writable_pack()
            codec_id, payload = pack.encode(page)
            reclen = RECORD.size + len(payload)
            self._charge(digest, reclen)
            pack.append_record(digest, codec_id, payload, PAGE_SIZE)
            self.new_pages += 1
            self.new_bytes += reclen
        else:
            reclen = split_loc(loc)[2]
            self._charge(digest, reclen)
            self.dedup_pages += 1
        ref = len(self._hashes)
        self._hashes.append(digest)
        self._local[digest] = ref
        self.stored_page_bytes += reclen
        return ref

    def _charge(self, digest: bytes, reclen: int) -> None:
        if digest in self._charged:
            return
        self._charged_bytes += reclen
        if self._quota is not None and self._charged_bytes > self._quota:
            raise self._over_quota("its pages")

    def _over_quota(self, what: str) -> QuotaExceeded:
        return QuotaExceeded(
            f"domain {self.domain}: capturing phase {self.phase} would need more than its "
            f"quota of {self._quota} bytes ({what} reached {self._charged_bytes} bytes, "
            "counting every distinct page of the domain's images once); nothing was "
            "stored: delete older images of this domain or raise [images] default_quota "
            "in /etc/xenpbr/xenpbr.conf (or $XENPBR_IMAGE_QUOTA)")

    def _writable_pack(self) -> PackWriter:
        pack = self._pack
        if pack is None or pack.size >= self.store.pages.max_pack_bytes:
            pack = self.store.pages.new_writer()
            self._packs.append(pack)
            self._pack = pack
        return pack

    @property
    def stats(self) -> CaptureStats:
        """Counters so far."""
        return CaptureStats(len(self._refs), self.zero_pages, self.new_pages,
                            self.dedup_pages, self.new_bytes)

    # ------------------------------------------------------------------ commit

    def commit(self, stream: Stream, stream_bytes: int | None = None) -> ImageMeta:
        """Seal the packs, then publish the manifest: the image now exists.

        :param stream: the model :func:`read_stream` returned for the pages seen.
        :param stream_bytes: bytes actually read, if counted; must match the model.
        """
        if self._lock is None:
            raise ImageError(f"capture {self.domain}/{self.image_id} is already closed")
        try:
            meta, data = self._build_manifest(stream, stream_bytes)
            sealed = [pack.seal() for pack in self._packs]
            path = self.store.manifest_path(self.domain, self.image_id)
            atomic_write(path, data, mode=0o600)
        except BaseException:
            self.abort()
            raise
        self.store.register_packs(sealed)
        self._release()
        pages = self.store.pages
        _LOG.info("image %s/%s (phase %s) committed: %d data pages (%d zero, %d new, "
                  "%d deduplicated), %d bytes appended, manifest %d bytes; %d stored pages "
                  "re-checked before reuse in %.2f s", self.domain, self.image_id,
                  self.phase, len(self._refs), self.zero_pages, self.new_pages,
                  self.dedup_pages, self.new_bytes, len(data),
                  pages.verified_pages - self._rechecked_from[0],
                  pages.verify_s - self._rechecked_from[1])
        self.committed = meta
        return meta

    def _build_manifest(self, stream: Stream, stream_bytes: int | None) -> tuple[ImageMeta, bytes]:
        skel, length = skeleton.encode(stream)
        if stream_bytes is not None and stream_bytes != length:
            raise ImageError(f"capture {self.domain}/{self.image_id}: read {stream_bytes} "
                             f"bytes but the parsed stream accounts for {length}")
        expected = skeleton.data_page_count(stream)
        if expected != len(self._refs):
            raise ImageError(f"capture {self.domain}/{self.image_id}: the stream has "
                             f"{expected} data pages but {len(self._refs)} reached on_page")
        pfns = sum(len(r.words) for img in stream.libxc_images for r in img.page_data_records())
        meta = ImageMeta(
            image_id=self.image_id, domain=self.domain, phase=self.phase, seq=self.seq,
            created=self.created, fingerprint=self.fingerprint,
            xenpbr_version=xenpbr.__version__,
            uuid=self.uuid or skeleton.embedded_name_uuid(stream)[1], stream_bytes=length,
            pfns=pfns, data_pages=len(self._refs), zero_pages=self.zero_pages,
            distinct_pages=len(self._hashes), stored_page_bytes=self.stored_page_bytes,
            extra=self.extra)
        data = manifest.encode(meta, skel, self._hashes, self._refs)
        self._charged_bytes += len(data)
        if self._quota is not None and self._charged_bytes > self._quota:
            raise self._over_quota("its pages plus the new manifest")
        return replace(meta, manifest_bytes=len(data)), data

    def abort(self) -> None:
        """Drop everything written so far (idempotent); no image becomes visible."""
        for pack in self._packs:
            pack.discard()
        self._packs.clear()
        self._pack = None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None or self.committed is None:
            self.abort()
