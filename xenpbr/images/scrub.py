"""``xenpbr scrub``: verify every object of the store, reject what needs a bad one,
repair what a later capture can replace.

Why a scrub besides the checks of captures and restores: those read only what they
need, and trust a pack whose file is unchanged since its pages were verified (damage
below the file system, bit rot, changes no stamp). A scrub reads everything:

* every record of every sealed pack (index entries), hashed against its digest;
* every manifest (checksum and structure), and whether each page it needs has a good
  copy; an image that needs a bad or missing page is marked invalid, with the reason;
* every hot stream, against its chunk checksums.

Repairs: a bad record is dropped from its index, so the next capture that meets the
page writes a fresh copy (and GC reclaims the bytes); a bad hot stream is deleted
(xenpbrd rebuilds it). Nothing a restore could still use is deleted.

The store scrubs itself, seen here as a :class:`Scrubbable`: this module does not
import the store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from xenpbr.images import hotcache, manifest
from xenpbr.images.errors import CorruptObject, ImageError, ImageInvalid
from xenpbr.images.image import Image, ImageEntry
from xenpbr.images.layout import HasLayout
from xenpbr.images.pagestore import PackReader, PageStore, make_loc

_LOG = logging.getLogger(__name__)


class Scrubbable(HasLayout, Protocol):
    """What a scrub needs of the store (an ``ImageStore``): its page store, its images,
    and the two repairs (drop a bad record, mark an image invalid)."""

    pages: PageStore

    def domains(self) -> list[str]: ...

    def scan(self, domain: str) -> list[ImageEntry]: ...

    def load(self, domain: str, image_id: str) -> Image: ...

    def mark_invalid(self, domain: str, image_id: str, reason: str) -> None: ...

    def invalid_reason(self, domain: str, image_id: str) -> str | None: ...

    def drop_indexed_record(self, digest: bytes, loc: int, reason: str, *,
                            repair: bool) -> tuple[bool, bool]: ...


@dataclass
class ScrubReport:
    """What one scrub checked, found and did."""

    packs: int = 0
    objects: int = 0
    bytes: int = 0
    images: int = 0
    hot_streams: int = 0
    seconds: float = 0.0
    bad_objects: list[dict[str, Any]] = field(default_factory=list)
    unusable_packs: list[dict[str, str]] = field(default_factory=list)
    invalid_images: list[dict[str, Any]] = field(default_factory=list)
    bad_hot_streams: list[dict[str, Any]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """This pass found no damage: every object verified, every image listed valid can
        be restored. Images rejected before (by a restore or an earlier scrub) are still
        listed, with ``marked_now`` false: they are out of use already, not new damage."""
        return not (self.bad_objects or self.unusable_packs or self.bad_hot_streams
                    or any(i["marked_now"] or not i["known"] for i in self.invalid_images))

    def to_json(self) -> dict[str, Any]:
        return {"clean": self.clean, "packs": self.packs, "objects": self.objects,
                "bytes": self.bytes, "images": self.images, "hot_streams": self.hot_streams,
                "seconds": round(self.seconds, 3), "bad_objects": self.bad_objects,
                "unusable_packs": self.unusable_packs,
                "invalid_images": [{k: v for k, v in i.items() if k != "known"}
                                   for i in self.invalid_images],
                "bad_hot_streams": self.bad_hot_streams}


def scrub(store: Scrubbable, repair: bool = True) -> ScrubReport:
    """One pass over the store (the caller holds the lock shared)."""
    start = time.monotonic()
    report = ScrubReport()
    bad = _check_packs(store, report, repair)
    _check_images(store, report, bad, repair)
    _check_hot_streams(store, report, repair)
    report.seconds = time.monotonic() - start
    _LOG.info("scrub of %s: %d objects in %d packs, %d images, %d hot streams in %.2f s: %s",
              store.layout.root, report.objects, report.packs, report.images, report.hot_streams,
              report.seconds, "clean" if report.clean else
              f"{len(report.bad_objects)} bad objects, {len(report.invalid_images)} invalid "
              f"images, {len(report.bad_hot_streams)} bad hot streams")
    return report


def _check_packs(store: Scrubbable, report: ScrubReport, repair: bool) -> dict[bytes, str]:
    """Hash every indexed record; returns digest -> why, for the bad ones."""
    pages = store.pages
    report.unusable_packs = [{"pack": p.name, "reason": p.reason} for p in pages.problems.values()]
    bad: dict[bytes, str] = {}
    reader = PackReader(pages)
    try:
        for info in list(pages.packs.values()):
            report.packs += 1
            for digest, off, reclen in list(info.entries):
                report.objects += 1
                report.bytes += reclen
                loc = make_loc(info.no, off, reclen)
                try:
                    reader.read(loc, digest)
                except CorruptObject as err:
                    bad[digest] = str(err)
                    report.bad_objects.append(_repair_record(store, digest, loc, info.name,
                                                             off, str(err), repair))
    finally:
        reader.close()
    return bad


def _repair_record(store: Scrubbable, digest: bytes, loc: int, pack: str, off: int,
                   reason: str, repair: bool) -> dict[str, Any]:
    used, dropped = store.drop_indexed_record(digest, loc, reason, repair=repair)
    return {"pack": pack, "offset": off, "sha256": digest.hex(), "reason": reason,
            "action": "dropped" if dropped else
            ("none (report only)" if used else "none (a spare copy: gc reclaims it)")}


def _check_images(store: Scrubbable, report: ScrubReport, bad: dict[bytes, str],
                  repair: bool) -> None:
    """Mark every image that needs a bad or missing page invalid (``repair``)."""
    for domain in store.domains():
        for entry in store.scan(domain):
            report.images += 1
            reason = _image_problem(store, domain, entry.image_id, bad) if entry.valid \
                else str(entry.error)
            if reason is None:
                continue
            marked = bool(entry.valid and repair)
            if marked:
                store.mark_invalid(domain, entry.image_id, reason)
            known = store.invalid_reason(domain, entry.image_id) is not None
            report.invalid_images.append({"domain": domain, "image": entry.image_id,
                                          "reason": reason, "marked_now": marked,
                                          "known": known})


def _image_problem(store: Scrubbable, domain: str, image_id: str,
                   bad: dict[bytes, str]) -> str | None:
    try:
        parts = manifest.decode_parts(store.layout.manifest_path(domain, image_id).read_bytes(),
                                      f"{domain}/{image_id}")
    except (OSError, ImageInvalid) as err:
        return str(err)
    index = store.pages.index
    for digest in parts.hashes:
        if index.get(digest) is None:
            why = bad.get(digest, "not in the page store")
            return (f"image {domain}/{image_id} needs page sha256 {digest.hex()[:16]}... "
                    f"which has no good copy: {why}")
    return None


def _check_hot_streams(store: Scrubbable, report: ScrubReport, repair: bool) -> None:
    root = hotcache.hot_root(store)
    for path in sorted(root.glob(f"*/*{hotcache.SUFFIX}")) if root.is_dir() else []:
        report.hot_streams += 1
        image_id = path.name[:-len(hotcache.SUFFIX)]
        domain = path.parent.name
        try:
            meta = store.load(domain, image_id).meta
            hot = hotcache.read_sums(path, image_id, meta.stream_bytes)
            hotcache.verify_file(hot, f"{domain}/{image_id}")
        except ImageError as err:  # ImageNotFound too: a stream without its image
            if repair:
                hotcache.drop(store, domain, image_id)
            report.bad_hot_streams.append({"path": str(path), "reason": str(err),
                                           "action": "deleted" if repair else "none"})
