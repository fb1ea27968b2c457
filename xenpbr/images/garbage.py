"""Garbage collection: mark pages from every manifest, drop or compact the packs.

Runs under the exclusive store lock, so no capture or restore is in flight and every
unsealed pack is debris from a writer that died. Order of deletions is what keeps a
crash in the middle harmless:

* a compacted pack's live records are copied to a new pack which is sealed (fsync,
  then index) *before* the old index is removed, and an old pack file is removed only
  after its index: at every instant each live page is reachable through some index;
* a crash leaves at worst a duplicate (two indexes for a page: the first loaded wins,
  the other copy is dead at the next GC) or an orphan pack (no index: removed next GC).

A manifest that fails verification stops the sweep (:class:`GcRefused`): its pages
cannot be known, and deleting them would destroy what an operator might still
recover. ``drop_invalid=True`` deletes such manifests first (they are unusable anyway).

The store runs GC on itself, seen here as a :class:`Collectable`: this module does not
import the store.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from dataclasses import dataclass, field
from typing import Protocol

from xenpbr.fsutil import atomic_write, fsync_dir
from xenpbr.images import codecs, disks, hotcache, manifest
from xenpbr.images.errors import CorruptObject, GcRefused
from xenpbr.images.layout import HasLayout
from xenpbr.images.pagestore import (
    PACK_HEADER,
    PAGE_SIZE,
    RECORD,
    PackInfo,
    PackWriter,
    PageStore,
    encode_index,
    make_loc,
    scan_pack,
)

_LOG = logging.getLogger(__name__)


class Collectable(HasLayout, Protocol):
    """What GC needs of the store (an ``ImageStore``): its files, its page store, and
    what it occupies on disk."""

    pages: PageStore

    def disk_bytes(self) -> int: ...


@dataclass
class GcReport:
    """What one GC run did; sizes in bytes of pack, index and manifest files."""

    bytes_before: int = 0
    bytes_after: int = 0
    live_pages: int = 0
    temp_files_removed: int = 0
    orphan_packs_removed: list[str] = field(default_factory=list)
    lost_packs: list[str] = field(default_factory=list)
    indexes_rebuilt: list[str] = field(default_factory=list)
    corrupt_records_dropped: int = 0
    packs_deleted: list[str] = field(default_factory=list)
    packs_compacted: list[str] = field(default_factory=list)
    packs_written: list[str] = field(default_factory=list)
    invalid_images_deleted: list[str] = field(default_factory=list)
    orphan_snapshots_removed: list[str] = field(default_factory=list)
    hot_streams_removed: int = 0

    @property
    def reclaimed(self) -> int:
        """Bytes freed."""
        return self.bytes_before - self.bytes_after


def collect(store: Collectable, *, min_dead_fraction: float = 0.1,
            drop_invalid: bool = False) -> GcReport:
    """One GC pass; the caller holds the exclusive lock."""
    report = GcReport(bytes_before=store.disk_bytes())
    _remove_temp_files(store, report)
    _remove_orphans(store, report)
    _remove_orphan_snapshots(store, report)
    _remove_orphan_hot_streams(store, report)
    _rebuild_bad_indexes(store, report)
    live = _mark(store, report, drop_invalid)
    report.live_pages = len(live)
    _sweep(store, live, report, min_dead_fraction)
    store.pages.reload()
    report.bytes_after = store.disk_bytes()
    _LOG.info("gc of %s: %d -> %d bytes (%d reclaimed), %d live pages, %d packs deleted, "
              "%d compacted into %d", store.layout.root, report.bytes_before, report.bytes_after,
              report.reclaimed, report.live_pages, len(report.packs_deleted),
              len(report.packs_compacted), len(report.packs_written))
    return report


def _remove_temp_files(store: Collectable, report: GcReport) -> None:
    """Temporary files of interrupted atomic writes (``.NAME.PID.tmp``)."""
    for top in (store.pages.dir, store.layout.images_dir):  # not quotas.json: written unlocked
        for path in top.rglob(".*.tmp"):
            path.unlink(missing_ok=True)
            report.temp_files_removed += 1


def _remove_orphans(store: Collectable, report: GcReport) -> None:
    """Packs without an index: captures that died before sealing."""
    packs_dir = store.pages.dir
    for pack in sorted(packs_dir.glob("*.pack")):
        if not pack.with_suffix(".idx").exists():
            _LOG.info("gc: removing unsealed pack %s (interrupted capture)", pack.name)
            pack.unlink()
            report.orphan_packs_removed.append(pack.stem)
    for idx in sorted(packs_dir.glob("*.idx")):
        if not idx.with_suffix(".pack").exists():
            _LOG.error("gc: pack %s is missing; its pages are lost and images using "
                       "them are invalid", idx.stem)
            idx.unlink()
            report.lost_packs.append(idx.stem)
    fsync_dir(packs_dir)


def _remove_orphan_snapshots(store: Collectable, report: GcReport) -> None:
    """Disk snapshots whose image is gone (deleted while xenpbrd was down, or a daemon
    killed between a manifest and its snapshots)."""
    for domain, image_id in disks.orphans(store):
        _LOG.info("gc: removing disk snapshots of vanished image %s/%s", domain, image_id)
        disks.remove(store, domain, image_id)
        report.orphan_snapshots_removed.append(f"{domain}/{image_id}")


def _remove_orphan_hot_streams(store: Collectable, report: GcReport) -> None:
    """Ready-made streams whose image is gone, and leftovers of interrupted writes."""
    for path in hotcache.orphans(store):
        hotcache.remove(path)
        report.hot_streams_removed += 1


def _rebuild_bad_indexes(store: Collectable, report: GcReport) -> None:
    """Re-derive unusable indexes by scanning their packs (records carry their digests)."""
    store.pages.reload()
    for name in sorted(store.pages.problems):
        path = store.pages.dir / f"{name}.pack"
        try:
            scan = scan_pack(path)
        except CorruptObject as err:
            _LOG.error("gc: cannot rebuild index of pack %s: %s", name, err)
            continue
        report.corrupt_records_dropped += len(scan.corrupt)
        if scan.stop_reason:
            _LOG.warning("gc: pack %s: %s; later records ignored", name, scan.stop_reason)
        atomic_write(path.with_suffix(".idx"), encode_index(name, scan.end, scan.entries),
                     mode=0o600)
        _LOG.warning("gc: rebuilt index of pack %s from its %d verified records (%d corrupt "
                     "dropped)", name, len(scan.entries), len(scan.corrupt))
        report.indexes_rebuilt.append(name)
    store.pages.reload()


def _mark(store: Collectable, report: GcReport, drop_invalid: bool) -> set[bytes]:
    live: set[bytes] = set()
    invalid: list[tuple[str, str]] = []
    for path in store.layout.manifest_paths():
        where = f"{path.parent.name}/{path.stem}"
        try:
            parts = manifest.decode_parts(path.read_bytes(), where)
        except CorruptObject as err:
            invalid.append((where, str(err)))
            continue
        live.update(parts.hashes)
    if invalid and not drop_invalid:
        raise GcRefused("gc stopped before deleting anything: these manifests fail "
                        "verification, so the pages they need are unknown: "
                        + "; ".join(reason for _, reason in invalid)
                        + ". Delete those images (or call gc(drop_invalid=True))")
    for where, reason in invalid:
        _LOG.warning("gc: deleting invalid image %s: %s", where, reason)
        (store.layout.images_dir / f"{where}{manifest.SUFFIX}").unlink(missing_ok=True)
        report.invalid_images_deleted.append(where)
    return live


def _sweep(store: Collectable, live: set[bytes], report: GcReport,
           min_dead_fraction: float) -> None:
    index = store.pages.index
    to_compact: list[tuple[PackInfo, list[tuple[bytes, int, int]]]] = []
    for info in list(store.pages.packs.values()):
        keep = [(d, off, n) for d, off, n in info.entries
                if d in live and index.get(d) == make_loc(info.no, off, n)]
        size = info.path.stat().st_size
        dead = size - PACK_HEADER.size - sum(n for _, _, n in keep)
        if not keep:
            _delete_pack(store, info.name)
            report.packs_deleted.append(info.name)
        elif dead and dead >= min_dead_fraction * size:
            to_compact.append((info, keep))
    if to_compact:
        _compact(store, to_compact, report)


def _compact(store: Collectable, work: list[tuple[PackInfo, list[tuple[bytes, int, int]]]],
             report: GcReport) -> None:
    """Copy live records into new packs, seal them, then drop the old ones."""
    writers: list[PackWriter] = []
    writer = None
    for info, keep in work:
        with info.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for digest, off, _ in keep:
                record = _verified_record(mm, off, digest)
                if record is None:
                    _LOG.error("gc: pack %s offset %d: page %s is corrupt; dropped",
                               info.name, off, digest.hex())
                    report.corrupt_records_dropped += 1
                    continue
                if writer is None or writer.size >= store.pages.max_pack_bytes:
                    writer = store.pages.new_writer()
                    writers.append(writer)
                writer.append_record(digest, record[0], record[1], PAGE_SIZE)
    for w in writers:
        w.seal()
        report.packs_written.append(w.name)
    for info, _ in work:
        _delete_pack(store, info.name)
        report.packs_compacted.append(info.name)


def _verified_record(mm: mmap.mmap, off: int, digest: bytes) -> tuple[int, bytes] | None:
    """``(codec, payload)`` of the record at ``off`` if it decodes to ``digest``."""
    codec_id, _, _, stored, _, _, rec_digest = RECORD.unpack_from(mm, off)
    payload = mm[off + RECORD.size:off + RECORD.size + stored]
    codec = codecs.BY_ID.get(codec_id)
    if rec_digest != digest or codec is None:
        return None
    try:
        raw = codec.decode(payload)
    except Exception:  # noqa: BLE001 - corrupt compressed data
        return None
    return (codec_id, payload) if hashlib.sha256(raw).digest() == digest else None


def _delete_pack(store: Collectable, name: str) -> None:
    """Index first, then pack: a crash in between leaves an orphan, never a dangling index."""
    store.pages.dir.joinpath(f"{name}.idx").unlink(missing_ok=True)
    fsync_dir(store.pages.dir)
    store.pages.dir.joinpath(f"{name}.pack").unlink(missing_ok=True)
