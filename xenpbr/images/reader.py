"""The restore side of the store: verified pages out, in stream order.

An :class:`ImageReader` is the ``get_page`` source of :func:`xenpbr.stream.write_stream`.
It holds the store lock shared (GC cannot move packs underneath it), resolved every
page location when opened (a missing page fails *before* any byte reaches xl), and
checks each page against the SHA-256 the manifest recorded as it is read, so a
corrupted page raises :class:`~.errors.CorruptObject` instead of reaching the guest.
"""

from __future__ import annotations

import logging
from array import array
from typing import BinaryIO, Self

from xenpbr.images import skeleton
from xenpbr.images.errors import CorruptObject, ImageError, MissingObject
from xenpbr.images.image import ZERO_REF, Image
from xenpbr.images.locking import StoreLock
from xenpbr.images.pagestore import ZERO_PAGE, PageStore
from xenpbr.stream.allocate_only import allocate_only
from xenpbr.stream.writer import write_stream

_LOG = logging.getLogger(__name__)


class ImageReader:
    """Serves one image's pages; close it (or use ``with``) to release the lock."""

    def __init__(self, pages: PageStore, image: Image, lock: StoreLock) -> None:
        self.image = image
        self._lock: StoreLock | None = lock
        self._locs = resolve(pages, image)
        self._packs = pages.open_reader()
        self._refs = image.refs
        self._hashes = image.hashes
        # (location, digest) of each distinct page: what a batch read is asked for
        self._wanted: list[tuple[int, bytes]] = list(zip(self._locs, self._hashes))
        self._next = 0
        self._order = list(skeleton.data_pfns(image.stream))  # 8 bytes a page
        self.pages_read = 0

    def get_page(self, pfn: int) -> bytes:
        """Writer callback: the next data page, verified; must be called in stream order."""
        i = self._next
        expected = self._order[i] if i < len(self._order) else None
        if expected != pfn:
            raise ImageError(f"{self.image.describe()}: page #{i} requested for pfn "
                             f"{pfn:#x}, the manifest has pfn {expected} next")
        self._next = i + 1
        ref = self._refs[i]
        if ref == ZERO_REF:
            return ZERO_PAGE
        try:
            return self._packs.read(self._locs[ref], self._hashes[ref])
        except CorruptObject as err:
            raise self._corrupt(i, pfn, err) from err

    def get_pages(self, pfns: list[int]) -> bytes:
        """Writer callback: the next ``len(pfns)`` data pages, verified and joined, in
        one call (one PAGE_DATA record): what regeneration uses, since per-page calls
        cost more than the hashing in Python. Each record is checked against its CRC-32
        and the digest the manifest names (see :meth:`.pagestore.PackReader.read_joined`)."""
        return self._next_pages(pfns, strong=False)

    def _next_pages(self, pfns: list[int], *, strong: bool) -> bytes:
        first = self._next
        expected = self._order[first:first + len(pfns)]
        if expected != pfns:
            self._out_of_order(first, pfns, expected)
        self._next = first + len(pfns)
        refs = self._refs[first:self._next]
        wanted = self._wanted
        try:
            return self._packs.read_joined(
                [None if ref == ZERO_REF else wanted[ref] for ref in refs], strong=strong)
        except CorruptObject as err:
            i = first + err.index  # type: ignore[attr-defined]
            raise self._corrupt(i, pfns[i - first], err) from err

    def _out_of_order(self, first: int, pfns: list[int], expected: list[int]) -> None:
        at = next((n for n, (a, b) in enumerate(zip(pfns, expected)) if a != b),
                  min(len(pfns), len(expected)))
        want = expected[at] if at < len(expected) else None
        got = pfns[at] if at < len(pfns) else None
        raise ImageError(f"{self.image.describe()}: page #{first + at} requested for pfn "
                         f"{got if got is None else hex(got)}, the manifest has pfn "
                         f"{want} next")

    def _corrupt(self, i: int, pfn: int, err: CorruptObject) -> CorruptObject:
        ref = self._refs[i]
        bad = CorruptObject(f"{self.image.describe()}: page #{i} (pfn {pfn:#x}, sha256 "
                            f"{self._hashes[ref].hex()[:16]}...) is corrupt: {err}; the "
                            "image must not be used (xenpbr scrub repairs the store)")
        bad.__dict__.update(err.__dict__)  # pack, offset: what to drop
        bad.digest = self._hashes[ref]  # type: ignore[attr-defined]
        return bad

    def verify_all(self) -> None:
        """Read every data page of the image and check its SHA-256 (nothing is written):
        the full check of ``xenpbr verify`` and of a restore with ``verify_first``."""
        for rec_pfns in skeleton.data_pfn_batches(self.image.stream):
            self._next_pages(rec_pfns, strong=True)

    def write_to(self, fileobj: BinaryIO) -> int:
        """Regenerate the whole stream into ``fileobj``; return bytes written."""
        return write_stream(fileobj, self.image.stream, self.get_page,
                            get_pages=self.get_pages)

    def write_allocating_to(self, fileobj: BinaryIO) -> tuple[int, list[int]]:
        """Regenerate the stream with its zero plain pages left for Xen to allocate
        (:mod:`xenpbr.stream.allocate_only`); bytes written and the pfns left to Xen.
        Must come before any other read of this reader (it narrows what is read)."""
        if self._next:
            raise ImageError(f"{self.image.describe()}: an allocating regeneration must "
                             "be the reader's first")
        stream, kept = allocate_only(self.image.stream, (r == ZERO_REF for r in self._refs))
        left = [pfn for pfn, k in zip(self._order, kept) if not k]
        self._order = [pfn for pfn, k in zip(self._order, kept) if k]
        self._refs = array(self._refs.typecode, (r for r, k in zip(self._refs, kept) if k))
        written = write_stream(fileobj, stream, self.get_page, get_pages=self.get_pages)
        return written, left

    def close(self) -> None:
        """Unmap the packs and release the lock (idempotent)."""
        self._packs.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve(pages: PageStore, image: Image) -> list[int]:
    """The pack location of every distinct page, or :class:`MissingObject`."""
    index = pages.index
    locs = [index.get(h) for h in image.hashes]
    missing = [i for i, loc in enumerate(locs) if loc is None]
    if missing:
        problems = "; ".join(f"pack {p.name}: {p.reason}" for p in pages.problems.values())
        raise MissingObject(
            f"{image.describe()}: {len(missing)} of its {len(locs)} distinct pages are not "
            f"in the page store (first sha256 {image.hashes[missing[0]].hex()})"
            + (f"; unusable pack indexes: {problems}" if problems else "")
            + "; the image cannot be restored")
    return locs  # type: ignore[return-value]
