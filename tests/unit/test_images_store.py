"""The image store on synthetic streams: round trips, dedup, integrity, quota, GC, crashes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.unit.streams import synth
from xenpbr.images import (
    CorruptObject,
    GcRefused,
    ImageError,
    ImageInvalid,
    ImageNotFound,
    ImageStore,
    InvalidName,
    MissingObject,
    QuotaExceeded,
    StoreBusy,
)
from xenpbr.images import skeleton
from xenpbr.images.pagestore import FLAG_CRC32, PACK_HEADER, RECORD, ZERO_DIGEST
from xenpbr.stream import read_stream

PAGE = 4096
REC = RECORD.size + PAGE  # an uncompressed page record


def stream_bytes(nr_pfns: int = 1500, content=synth.page_content, **kw) -> bytes:
    return b"".join(synth.iter_pv_stream(synth.PvStreamSpec(nr_pfns=nr_pfns, content=content,
                                                             **kw)))


def capture(store: ImageStore, data: bytes, domain: str = "vm1", phase: str = "boot",
            stream_format: str = "xl"):
    with store.begin_capture(domain, phase, seq=1, fingerprint="fp") as writer:
        stream = read_stream(io.BytesIO(data), stream_format=stream_format,
                             on_page=writer.on_page)
        meta = writer.commit(stream, stream_bytes=len(data))
    return meta, writer.stats


def regenerate(store: ImageStore, domain: str, image_id: str) -> bytes:
    out = io.BytesIO()
    store.regenerate(store.load(domain, image_id), out)
    return out.getvalue()


def pack_bytes(store: ImageStore) -> int:
    return sum(p.stat().st_size for p in store.pages.dir.glob("*.pack"))


def distinct_nonzero(data: bytes, fmt: str = "xl") -> int:
    seen: set[bytes] = set()
    read_stream(io.BytesIO(data), stream_format=fmt,
                on_page=lambda pfn, t, d: seen.add(bytes(d)) if any(d) else None)
    return len(seen)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture(scope="module")
def data() -> bytes:
    return stream_bytes()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kw,fmt", [({}, "xl"), ({"with_xl": False}, "libxl"),
                                    ({"with_xl": False, "with_libxl": False}, "libxc")])
def test_regenerated_stream_is_byte_identical(store, kw, fmt) -> None:
    data = stream_bytes(**kw)
    meta, stats = capture(store, data, stream_format=fmt)
    assert regenerate(store, "vm1", meta.image_id) == data
    assert meta.stream_bytes == len(data)
    assert stats.data_pages == stats.zero_pages + stats.new_pages + stats.dedup_pages


def test_unknown_optional_and_emulator_records_survive(store) -> None:
    extra_libxc = [synth.record(0x80001234, b"opaque-optional"), synth.record(0xD)]
    extra_libxl = [synth.record(0x2, b"\0\0\0\0\0\0\0\0key\0value\0")]
    data = stream_bytes(extra_libxc=extra_libxc, extra_libxl=extra_libxl)
    meta, _ = capture(store, data)
    assert regenerate(store, "vm1", meta.image_id) == data


def test_metadata_is_recorded(store, data) -> None:
    meta, stats = capture(store, data)
    assert (meta.domain, meta.phase, meta.seq, meta.fingerprint) == ("vm1", "boot", 1, "fp")
    assert meta.uuid == "6a1f2c3e-0d4b-4e5f-9a8b-7c6d5e4f3a2b"  # from the embedded config
    assert meta.pfns == 1500 and meta.data_pages == stats.data_pages
    assert meta.stored_page_bytes == stats.new_bytes == meta.distinct_pages * REC
    assert store.images("vm1") == [meta]
    assert store.usage("vm1").total == meta.stored_bytes


def test_many_packs_and_zlib_round_trip(tmp_path, data) -> None:
    store = ImageStore(tmp_path / "s", codec="zlib", max_pack_bytes=50_000)
    compressible = stream_bytes(content=lambda pfn: pfn.to_bytes(4, "little") * 1000 + bytes(96))
    meta, _ = capture(store, compressible)
    assert len(list(store.pages.dir.glob("*.pack"))) > 1
    assert pack_bytes(store) < meta.data_pages * PAGE / 10
    assert regenerate(store, "vm1", meta.image_id) == compressible
    meta2, _ = capture(store, data, domain="vm2")  # random pages: stored raw
    assert regenerate(store, "vm2", meta2.image_id) == data


# ---------------------------------------------------------------- zero pages and dedup


def test_zero_pages_are_not_stored(store, data) -> None:
    meta, stats = capture(store, data)
    assert stats.zero_pages > 0
    assert ZERO_DIGEST not in store.pages.index
    assert meta.distinct_pages == distinct_nonzero(data)
    assert pack_bytes(store) == PACK_HEADER.size + meta.distinct_pages * REC


def test_all_zero_guest_writes_no_pack(store) -> None:
    data = stream_bytes(content=lambda pfn: bytes(PAGE))
    meta, stats = capture(store, data)
    assert stats.new_pages == 0 and not list(store.pages.dir.glob("*.pack"))
    assert regenerate(store, "vm1", meta.image_id) == data


def test_identical_pages_are_stored_once_across_images_and_domains(store, data) -> None:
    first, _ = capture(store, data)
    after_first = pack_bytes(store)
    second, stats = capture(store, data, phase="services")
    third, stats3 = capture(store, data, domain="vm2")
    assert stats.new_pages == 0 == stats3.new_pages
    assert stats.dedup_pages == stats.data_pages - stats.zero_pages
    assert pack_bytes(store) == after_first
    for domain, meta in (("vm1", first), ("vm1", second), ("vm2", third)):
        assert regenerate(store, domain, meta.image_id) == data


def test_changed_pages_only_are_added(store, data) -> None:
    capture(store, data)
    changed = {5, 6, 1400}
    data2 = stream_bytes(content=lambda pfn: (b"\x5a" * PAGE if pfn in changed
                                              else synth.page_content(pfn)))
    before = pack_bytes(store)
    meta, stats = capture(store, data2, phase="services")
    assert stats.new_pages == 1  # three pfns, one new content
    assert pack_bytes(store) - before == PACK_HEADER.size + REC  # in a new pack
    assert regenerate(store, "vm1", meta.image_id) == data2


# ---------------------------------------------------------------- integrity


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def the_pack(store: ImageStore) -> Path:
    (pack,) = store.pages.dir.glob("*.pack")
    return pack


def test_corrupt_page_is_detected_with_its_image_and_pfn(store, data) -> None:
    meta, _ = capture(store, data)
    flip_byte(the_pack(store), PACK_HEADER.size + 5 * REC + RECORD.size + 100)
    image = store.load("vm1", meta.image_id)  # manifest fine, pages present
    with pytest.raises(CorruptObject, match=rf"image vm1/{meta.image_id}.*page #\d+ \(pfn 0x"):
        store.regenerate(image, io.BytesIO())
    with pytest.raises(CorruptObject, match="contents do not match"):
        store.verify("vm1", meta.image_id)


def test_batch_and_per_page_regeneration_write_the_same_bytes(store, data) -> None:
    """``write_to`` serves each PAGE_DATA record with one ``get_pages`` call; the
    per-page source (what other callers of write_stream use) gives the same stream."""
    from xenpbr.stream import write_stream
    meta, _ = capture(store, data)
    image = store.load("vm1", meta.image_id)
    calls: list[int] = []
    with store.reader(image) as pages:
        batch = io.BytesIO()
        serve = pages.get_pages
        write_stream(batch, image.stream, pages.get_page,
                     get_pages=lambda pfns: calls.append(len(pfns)) or serve(pfns))
    with store.reader(image) as pages:
        single = io.BytesIO()
        write_stream(single, image.stream, pages.get_page)
    assert batch.getvalue() == single.getvalue() == data
    # one call per PAGE_DATA record of synth's 1500-pfn stream (a few pfns carry no data)
    assert calls == [len(b) for b in skeleton.data_pfn_batches(image.stream)]
    assert len(calls) == 2 and 1000 < calls[0] <= 1024


def test_batch_read_names_the_bad_page_of_the_record(store, data) -> None:
    meta, _ = capture(store, data)
    flip_byte(the_pack(store), PACK_HEADER.size + 1100 * REC + RECORD.size + 9)
    image = store.load("vm1", meta.image_id)
    first, second = skeleton.data_pfn_batches(image.stream)
    with store.reader(image) as pages:
        assert len(pages.get_pages(first)) == len(first) * PAGE  # the first record is intact
        with pytest.raises(CorruptObject, match=r"page #1\d{3} \(pfn 0x[0-9a-f]+, sha256 "
                                                r".*contents do not match") as err:
            pages.get_pages(second)
    assert err.value.pack == the_pack(store).stem  # what scrub drops
    assert err.value.digest in image.hashes


def test_batch_read_refuses_pfns_out_of_manifest_order(store, data) -> None:
    meta, _ = capture(store, data)
    image = store.load("vm1", meta.image_id)
    first = next(skeleton.data_pfn_batches(image.stream))
    swapped = [*first[:3], first[4], first[3], *first[5:]]
    with store.reader(image) as pages, \
            pytest.raises(ImageError, match=rf"page #3 requested for pfn {first[4]:#x}, the "
                                            rf"manifest has pfn {first[3]} next"):
        pages.get_pages(swapped)


def test_a_batch_source_returning_too_few_bytes_is_a_record_error(store, data) -> None:
    from xenpbr.stream import RecordError, write_stream
    meta, _ = capture(store, data)
    image = store.load("vm1", meta.image_id)
    n = len(next(skeleton.data_pfn_batches(image.stream)))
    with pytest.raises(RecordError, match=rf"get_pages\({n} pfns from 0x0\) returned 4096 "
                                          rf"bytes, expected {n * PAGE}"):
        write_stream(io.BytesIO(), image.stream, lambda pfn: bytes(PAGE),
                     get_pages=lambda pfns: bytes(PAGE))


def _record(store: ImageStore, n: int) -> tuple[int, tuple]:
    """Offset and fields of the ``n``-th record of the (only) pack."""
    off = PACK_HEADER.size + n * REC
    return off, RECORD.unpack_from(the_pack(store).read_bytes(), off)


def _rewrite_record_header(store: ImageStore, n: int, **fields: int) -> None:
    names = ("codec", "kind", "flags", "stored", "raw", "crc", "digest")
    off, values = _record(store, n)
    new = dict(zip(names, values)) | fields
    raw = bytearray(the_pack(store).read_bytes())
    RECORD.pack_into(raw, off, *(new[k] for k in names))
    the_pack(store).write_bytes(bytes(raw))


def test_every_record_carries_the_crc32_of_its_payload(store, data) -> None:
    import zlib
    capture(store, data)
    raw = the_pack(store).read_bytes()
    for n in (0, 7, 300):
        off, (_, _, flags, stored, _, crc, _) = _record(store, n)
        assert flags & FLAG_CRC32
        assert crc == zlib.crc32(raw[off + RECORD.size:off + RECORD.size + stored])


def test_records_written_before_the_crc32_are_still_verified_by_sha256(store, data) -> None:
    meta, _ = capture(store, data)
    for n in range(0, 400, 3):  # as a store written before 2026-12-07 has them
        _rewrite_record_header(store, n, flags=0, crc=0)
    assert regenerate(store, "vm1", meta.image_id) == data
    flip_byte(the_pack(store), PACK_HEADER.size + 6 * REC + RECORD.size + 50)
    with pytest.raises(CorruptObject, match=r"page #\d+ .*contents do not match their SHA-256"):
        regenerate(store, "vm1", meta.image_id)


def test_a_damaged_crc32_field_refuses_the_record(store, data) -> None:
    meta, _ = capture(store, data)
    _, fields = _record(store, 9)
    _rewrite_record_header(store, 9, crc=fields[5] ^ 0x10)
    with pytest.raises(CorruptObject, match="CRC-32 mismatch"):
        regenerate(store, "vm1", meta.image_id)
    report = store.scrub(repair=False)
    assert [b["reason"] for b in report.bad_objects if "CRC-32" in b["reason"]]


def test_verify_and_scrub_recheck_sha256_where_restore_checks_crc32(store, data) -> None:
    """Contents replaced *and* the CRC-32 rewritten to match is not accidental damage: a
    restore's CRC check passes it, `xenpbr verify` and scrub re-hash and refuse it."""
    import zlib
    meta, _ = capture(store, data)
    off, fields = _record(store, 11)
    raw = bytearray(the_pack(store).read_bytes())
    start = off + RECORD.size
    raw[start:start + PAGE] = bytes([0xA5]) * PAGE
    the_pack(store).write_bytes(bytes(raw))
    _rewrite_record_header(store, 11, crc=zlib.crc32(bytes([0xA5]) * PAGE))
    with pytest.raises(CorruptObject, match="contents do not match their SHA-256"):
        store.verify("vm1", meta.image_id)
    assert not store.scrub(repair=False).clean


def test_corrupt_record_header_is_detected(store, data) -> None:
    meta, _ = capture(store, data)
    flip_byte(the_pack(store), PACK_HEADER.size + 3 * REC + 20)  # inside the digest field
    with pytest.raises(CorruptObject, match="record header"):
        store.verify("vm1", meta.image_id)


def test_corrupt_manifest_is_reported_invalid_and_never_used(store, data) -> None:
    good, _ = capture(store, data)
    bad, _ = capture(store, data, phase="later")
    flip_byte(store.manifest_path("vm1", bad.image_id), 200)
    with pytest.raises(CorruptObject, match=f"manifest of image vm1/{bad.image_id}.*checksum"):
        store.load("vm1", bad.image_id)
    entries = store.scan("vm1")
    assert [e.valid for e in entries] == [True, False]
    assert isinstance(entries[1].error, ImageInvalid)
    assert store.images("vm1") == [good]


def test_truncated_manifest_is_invalid(store, data) -> None:
    meta, _ = capture(store, data)
    path = store.manifest_path("vm1", meta.image_id)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptObject):
        store.load("vm1", meta.image_id)


def test_manifest_moved_to_another_domain_is_refused(store, data) -> None:
    meta, _ = capture(store, data)
    dest = store.domain_dir("vm2")
    dest.mkdir()
    os.rename(store.manifest_path("vm1", meta.image_id), dest / f"{meta.image_id}.manifest")
    with pytest.raises(CorruptObject, match="moved or copied"):
        store.load("vm2", meta.image_id)


def test_valid_checksum_but_bad_skeleton_is_refused(store, data) -> None:
    from xenpbr.images import manifest

    meta, _ = capture(store, data)
    path = store.manifest_path("vm1", meta.image_id)
    parts = manifest.decode_parts(path.read_bytes(), "x")
    skel = parts.skeleton.replace(b'"version":1', b'"version":9', 1)
    path.write_bytes(manifest.encode(parts.meta, skel, parts.hashes, parts.refs))
    with pytest.raises(ImageInvalid, match="skeleton version"):
        store.load("vm1", meta.image_id)


def test_corrupt_index_is_detected_then_rebuilt_by_gc(tmp_path, data) -> None:
    store = ImageStore(tmp_path / "s")
    meta, _ = capture(store, data)
    (idx,) = store.pages.dir.glob("*.idx")
    flip_byte(idx, 100)
    reopened = ImageStore(tmp_path / "s")
    assert list(reopened.pages.problems) == [idx.stem]
    with pytest.raises(MissingObject, match="unusable pack indexes.*checksum"):
        reopened.load("vm1", meta.image_id)
    report = reopened.gc()
    assert report.indexes_rebuilt == [idx.stem]
    assert regenerate(reopened, "vm1", meta.image_id) == data


def test_lost_pack_makes_images_invalid(store, data) -> None:
    meta, _ = capture(store, data)
    the_pack(store).unlink()
    with pytest.raises(MissingObject, match="pack file is missing"):
        ImageStore(store.root).load("vm1", meta.image_id)


def test_names_are_validated(store, data) -> None:
    for bad in ("../etc", "a/b", "", "x" * 65, ".hidden"):
        with pytest.raises(InvalidName):
            store.begin_capture(bad, "boot")
        with pytest.raises(InvalidName):
            store.begin_capture("vm1", bad)
    with pytest.raises(InvalidName):
        store.load("vm1", "../../etc/passwd")
    with pytest.raises(ImageNotFound):
        store.load("vm1", "20260101T000000.000000Z-abcdef")


# ---------------------------------------------------------------- quota


def test_quota_refuses_a_capture_before_writing_past_it(store, data) -> None:
    needed = distinct_nonzero(data) * REC
    store.set_quota("vm1", needed // 2)
    with pytest.raises(QuotaExceeded, match="vm1.*quota of"):
        capture(store, data)
    assert store.images("vm1") == []
    assert pack_bytes(store) == 0  # the aborted capture's pack is gone
    other, _ = capture(store, data, domain="vm2")  # other domains are not affected
    assert other.distinct_pages * REC == needed


def test_quota_counts_shared_pages_in_full_but_once_per_domain(store, data) -> None:
    first, _ = capture(store, data, domain="vm2")
    store.set_quota("vm1", first.stored_bytes * 2)
    one, _ = capture(store, data)  # all pages shared with vm2, still charged to vm1
    assert store.usage("vm1").total == one.stored_bytes
    two, _ = capture(store, data, phase="again")  # same pages again: only the manifest
    assert store.usage("vm1").total == one.stored_bytes + two.manifest_bytes
    store.set_quota("vm1", store.usage("vm1").total + 1000)
    with pytest.raises(QuotaExceeded, match="manifest"):
        capture(store, data, phase="third")
    store.set_quota("vm1", None)
    assert store.quota("vm1") is None


# ---------------------------------------------------------------- GC


def test_gc_after_delete_reclaims_exclusive_pages(store, data) -> None:
    other = stream_bytes(content=lambda pfn: synth.page_content(pfn + 100_000))
    keep, _ = capture(store, data)
    drop, _ = capture(store, other, phase="other")
    before = store.disk_bytes()
    store.delete("vm1", drop.image_id)
    report = store.gc(min_dead_fraction=0.0)
    assert report.reclaimed >= drop.distinct_pages * REC  # no page in common with keep
    assert store.disk_bytes() == before - drop.manifest_bytes - report.reclaimed
    assert regenerate(store, "vm1", keep.image_id) == data
    assert store.gc().reclaimed == 0  # nothing left to do


def test_gc_compacts_partially_dead_packs(store, data) -> None:
    changed = stream_bytes(content=lambda pfn: bytes([7]) * PAGE if pfn % 2 else synth.page_content(pfn))
    first, _ = capture(store, data)
    second, _ = capture(store, changed, phase="p2")  # shares half of first's pages
    store.delete("vm1", first.image_id)
    report = store.gc()
    assert report.packs_compacted and report.packs_written
    assert regenerate(store, "vm1", second.image_id) == changed
    assert pack_bytes(store) == PACK_HEADER.size * len(list(store.pages.dir.glob("*.pack"))) \
        + second.distinct_pages * REC


def test_gc_refuses_while_a_manifest_is_invalid(store, data) -> None:
    meta, _ = capture(store, data)
    flip_byte(store.manifest_path("vm1", meta.image_id), 100)
    before = store.disk_bytes()
    with pytest.raises(GcRefused, match="checksum"):
        store.gc()
    assert store.disk_bytes() == before
    report = store.gc(drop_invalid=True)
    assert report.invalid_images_deleted == [f"vm1/{meta.image_id}"]
    assert pack_bytes(store) == 0


def test_gc_is_refused_while_a_capture_runs_and_readers_coexist(store, data) -> None:
    meta, _ = capture(store, data)
    writer = store.begin_capture("vm2", "boot")
    try:
        chunks = synth.iter_pv_stream(synth.PvStreamSpec(
            content=lambda pfn: synth.page_content(pfn + 7)))
        reader = synth.ChunkReader(chunks)
        fed = threading.Event()
        resume = threading.Event()

        def visit(pfn, t, d):
            writer.on_page(pfn, t, d)
            if pfn == 700:
                fed.set()
                resume.wait(10)

        worker = threading.Thread(target=lambda: setattr(worker, "stream", read_stream(
            reader, on_page=visit)))
        worker.start()
        assert fed.wait(10)
        # mid-capture: another image is read concurrently, GC must wait
        assert regenerate(store, "vm1", meta.image_id) == data
        with pytest.raises(StoreBusy):
            store.gc(wait=0.2)
        resume.set()
        worker.join(10)
        new = writer.commit(worker.stream)  # type: ignore[attr-defined]
    finally:
        writer.abort()
    assert [m.image_id for m in store.images("vm2")] == [new.image_id]
    store.gc()  # possible again once the capture is committed
    assert regenerate(store, "vm1", meta.image_id) == data
    assert regenerate(store, "vm2", new.image_id) == stream_bytes(
        content=lambda pfn: synth.page_content(pfn + 7))


# ---------------------------------------------------------------- crashes


def test_capture_failing_midway_leaves_no_image_and_no_pack(store, data) -> None:
    class Boom(Exception):
        pass

    def visit(pfn, t, d):
        writer.on_page(pfn, t, d)
        if pfn == 900:
            raise Boom

    with pytest.raises(Boom), store.begin_capture("vm1", "boot") as writer:
        read_stream(io.BytesIO(data), on_page=visit)
    assert store.images("vm1") == [] and pack_bytes(store) == 0
    meta, _ = capture(store, data)  # the lock was released
    assert regenerate(store, "vm1", meta.image_id) == data


KILLED_CAPTURE = """
import io, os, signal, sys
from xenpbr.images import ImageStore
from xenpbr.stream import read_stream
store = ImageStore(sys.argv[1])
writer = store.begin_capture("vm1", "boot")
def visit(pfn, t, d):
    writer.on_page(pfn, t, d)
    if pfn == 1200:
        writer._pack.flush()          # pages on disk, pack not sealed
        if sys.argv[2] == "sealed":   # or: sealed, manifest not yet published
            [p.seal() for p in writer._packs]
        os.kill(os.getpid(), signal.SIGKILL)
read_stream(open(sys.argv[3], "rb"), on_page=visit)
"""


@pytest.mark.parametrize("stage", ["unsealed", "sealed"])
def test_killed_capture_leaves_no_image_and_gc_reclaims_it(tmp_path, data, stage) -> None:
    root = tmp_path / "s"
    store = ImageStore(root)
    keep, _ = capture(store, stream_bytes(content=lambda pfn: synth.page_content(pfn + 5000)))
    baseline = store.disk_bytes()
    src = tmp_path / "stream.xl"
    src.write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_CAPTURE), str(root),
                           stage, str(src)], cwd=Path(__file__).parents[2], check=False)
    assert proc.returncode == -signal.SIGKILL
    reopened = ImageStore(root)
    assert [m.image_id for m in reopened.images("vm1")] == [keep.image_id]
    assert reopened.disk_bytes() > baseline  # the dead capture's pages
    report = reopened.gc()
    assert report.orphan_packs_removed if stage == "unsealed" else report.packs_deleted
    assert reopened.disk_bytes() == baseline
    assert regenerate(reopened, "vm1", keep.image_id) != b""


def test_manifest_write_failure_publishes_nothing(store, data, monkeypatch) -> None:
    import xenpbr.images.writer as writer_mod

    def fail(path, data, mode=0o644):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_mod, "atomic_write", fail)
    with pytest.raises(OSError):
        capture(store, data)
    monkeypatch.undo()
    assert store.images("vm1") == []
    report = store.gc()  # the sealed but unreferenced pack
    assert report.packs_deleted and pack_bytes(store) == 0


def test_temp_files_of_interrupted_writes_are_removed(store, data) -> None:
    capture(store, data)
    junk = store.domain_dir("vm1") / ".x.manifest.123.tmp"
    junk.write_bytes(b"partial")
    assert store.gc().temp_files_removed == 1 and not junk.exists()


def test_a_manifest_loaded_again_unchanged_is_not_decoded_again(store, data,
                                                                monkeypatch) -> None:
    """The recovery's load of the image xenpbrd just warmed skips the decoding; a write
    to the manifest, a mark or a missing page is still seen."""
    from xenpbr.images import manifest
    from xenpbr.images import store as store_module
    meta, _ = capture(store, data)
    decoded: list[str] = []
    real = manifest.decode
    monkeypatch.setattr(manifest, "decode", lambda raw, where: decoded.append(where)
                        or real(raw, where))
    first = store.load("vm1", meta.image_id)
    assert store.load("vm1", meta.image_id) is first and len(decoded) == 1
    path = store.manifest_path("vm1", meta.image_id)
    path.write_bytes(path.read_bytes()[:-100])  # damaged: the stamp moves
    with pytest.raises(CorruptObject):
        store.load("vm1", meta.image_id)
    assert len(decoded) == 2
    others = [capture(store, data, phase=f"p{i}")[0] for i in range(store_module.DECODED_KEPT)]
    for other in others:
        store.load("vm1", other.image_id)
    store.load("vm1", others[0].image_id)
    assert len(store._decoded) == store_module.DECODED_KEPT  # the oldest ones dropped
    store.mark_invalid("vm1", others[0].image_id, "scrub found damage")
    with pytest.raises(CorruptObject, match="marked invalid"):
        store.load("vm1", others[0].image_id)
