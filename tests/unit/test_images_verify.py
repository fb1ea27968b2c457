"""Every byte a restore hands to xl is verified, captures never reuse a bad stored page,
and ``scrub`` finds and repairs damage (issue 13, point 5). Against the fake ``xl`` of
test_images_xl; real Xen: tests/lab/test_store_corruption_real.py.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from pathlib import Path

import pytest

from tests.unit.test_images_xl import FakeXl, captured, data, fake, store  # noqa: F401
from xenpbr.images import CorruptObject, ImageStore, capture, hotcache, restore
from xenpbr.images.pagestore import PACK_HEADER, RECORD

PAGE_600 = PACK_HEADER.size + 600 * (RECORD.size + 4096) + RECORD.size + 7


def flip(path: Path, offset: int) -> None:
    """Flip one byte in place, as damage would (a few ms after the file was written:
    a pack's stamp has the kernel's clock-tick resolution)."""
    time.sleep(0.02)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x80]))


def the_pack(store: ImageStore) -> Path:
    (pack,) = store.pages.dir.glob("*.pack")
    return pack


def crashed(fake: FakeXl) -> None:
    (fake.state / "domains" / "vm1").unlink(missing_ok=True)


def test_a_flipped_byte_in_the_hot_stream_stops_a_streaming_xl(store, fake, data) -> None:
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    crashed(fake)
    result = restore(store, image, xl=fake.argv, hot_mode="stream")
    assert result.hot and (fake.state / "restored.xl").read_bytes() == data
    restore_call = next(c for c in fake.calls() if c[0] == "restore")
    assert restore_call[-1] != str(path)  # xl read our FIFO, every chunk checked
    fake.state.joinpath("domains", "pbr-guest").unlink()
    flip(path, path.stat().st_size - 10)
    with pytest.raises(CorruptObject, match=rf"image vm1/{image.meta.image_id}.*hot stream .*"
                                            r"chunk #\d+ \(offset \d+.*checksum mismatch.*"
                                            r"partial domain pbr-guest \(domid \d+\) destroyed"):
        restore(store, image, xl=fake.argv, hot_mode="stream")
    assert "pbr-guest" not in fake.domains()
    assert not path.exists() and not hotcache.sums_of(path).exists()  # dropped
    assert store.scan("vm1")[0].valid  # the store's copy is intact


def test_hot_mode_file_verifies_the_whole_file_before_xl(store, fake, data) -> None:
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    crashed(fake)
    result = restore(store, image, xl=fake.argv, hot_mode="file")
    assert result.hot and result.verify_s > 0 and (fake.state / "restored.xl").read_bytes() == data
    fake.state.joinpath("domains", "pbr-guest").unlink()
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    flip(path, 100)
    calls = len(fake.calls())
    with pytest.raises(CorruptObject, match="checksum mismatch"):
        restore(store, image, xl=fake.argv, hot_mode="file")
    assert not any(c[0] == "restore" for c in fake.calls()[calls:])


def _rewrite_sums(path: Path, **changes: object) -> dict:
    """Rewrite a hot stream's .sums with ``changes`` and a valid checksum of its own."""
    where = hotcache.sums_of(path)
    doc = json.loads(where.read_bytes())
    body = {k: v for k, v in doc.items() if k != "checksum"} | changes
    body = {k: v for k, v in body.items() if v is not None}
    where.write_text(json.dumps({**body, "checksum": hotcache._checksum(body)}))
    return body


def test_new_hot_streams_are_checked_by_crc32_and_version_1_sha256_sums_still_are(
        store, fake, data) -> None:
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    doc = json.loads(hotcache.sums_of(path).read_bytes())
    assert (doc["version"], doc["algorithm"]) == (2, "crc32")
    chunks = [data[i:i + doc["chunk"]] for i in range(0, len(data), doc["chunk"])]
    assert doc["sums"] == [zlib.crc32(c).to_bytes(4, "big").hex() for c in chunks]
    # a stream warmed by an older xenpbr (version 1: SHA-256 per chunk) is still used
    _rewrite_sums(path, version=1, algorithm=None, sums=None,
                  sha256=[hashlib.sha256(c).hexdigest() for c in chunks])
    hot = hotcache.lookup(store, image)
    assert hot is not None and hot.algorithm == "sha256"
    assert hotcache.verify_file(hot, "vm1") >= 0
    flip(path, 100)
    with pytest.raises(CorruptObject, match="chunk #0 .*checksum mismatch"):
        hotcache.verify_file(hot, "vm1")


def test_a_sums_file_naming_an_unknown_check_is_not_used(store, fake) -> None:
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    _rewrite_sums(path, algorithm="md4")
    assert hotcache.lookup(store, image) is None
    assert not path.exists() and not hotcache.sums_of(path).exists()


def test_a_flipped_stored_page_rejects_the_image_even_with_a_hot_stream(store, fake) -> None:
    image = captured(store, fake)
    assert hotcache.warm(store, "vm1", image.meta.image_id) is not None
    flip(the_pack(store), PAGE_600)
    crashed(fake)
    with pytest.raises(CorruptObject, match=rf"image vm1/{image.meta.image_id}.*page #\d+ .*"
                                            r"pack \w+ offset \d+: checksum mismatch"):
        restore(store, image, xl=fake.argv)  # the pack changed: not the hot stream
    assert "pbr-guest" not in fake.domains()
    (entry,) = store.scan("vm1")
    assert not entry.valid and "checksum mismatch" in str(entry.error)  # listed invalid
    with pytest.raises(CorruptObject, match="marked invalid"):
        store.load("vm1", image.meta.image_id)


def test_a_new_capture_rewrites_a_bad_page_instead_of_reusing_it(store, fake) -> None:
    first = captured(store, fake)
    flip(the_pack(store), PAGE_600)
    other = ImageStore(store.root)  # another process: nothing verified yet
    result = capture("vm1", other, "boot", xl=fake.argv)
    assert result.stats.new_pages == 1 and other.pages.verified_pages > 0
    other.verify("vm1", result.meta.image_id)  # every page good
    # the bad record left its index: the first image now reads the fresh copy too, and
    # GC reclaims the bad bytes once enough of the pack is dead
    assert store.scrub().clean
    store.verify("vm1", first.meta.image_id)
    store.gc()  # one dead record: below the compaction threshold, kept until then
    assert store.scrub().clean


def test_stored_copies_are_checked_by_comparing_not_hashing(store, fake, monkeypatch) -> None:
    """A capture holds the page it dedups against a stored record: comparing the two is
    the check, done while the guest is paused; hashing is left for a mismatch."""
    from xenpbr.images.pagestore import PackReader
    captured(store, fake)
    hashed: list[int] = []
    read = PackReader.read
    monkeypatch.setattr(PackReader, "read",
                        lambda self, loc, digest: hashed.append(loc) or read(self, loc, digest))
    other = ImageStore(store.root)  # another process: nothing verified yet
    result = capture("vm1", other, "boot", xl=fake.argv)
    assert result.stats.new_pages == 0 and other.pages.verified_pages > 1000
    assert hashed == []
    flip(the_pack(store), PAGE_600)
    third = ImageStore(store.root)
    assert capture("vm1", third, "boot", xl=fake.argv).stats.new_pages == 1
    assert len(hashed) == 1  # the mismatch, hashed to say what is wrong, then dropped


def test_the_same_process_rechecks_a_pack_that_changed_since_it_wrote_it(store, fake) -> None:
    captured(store, fake)
    assert store.pages.verified  # its own pages: hashed before they were written
    capture("vm1", store, "boot", xl=fake.argv)
    assert store.pages.verified_pages == 0  # nothing re-read: the pack is unchanged
    flip(the_pack(store), PAGE_600)
    result = capture("vm1", store, "boot", xl=fake.argv)
    assert result.stats.new_pages == 1  # found bad, dropped, stored afresh
    store.verify("vm1", result.meta.image_id)


def test_scrub_reports_marks_and_repairs(store, fake) -> None:
    image = captured(store, fake)
    hot = hotcache.warm(store, "vm1", image.meta.image_id)
    assert store.scrub().clean
    flip(the_pack(store), PAGE_600)
    report = store.scrub()
    assert not report.clean and report.objects > 1000 and report.packs == 1
    (bad,) = report.bad_objects
    assert bad["action"] == "dropped" and "checksum mismatch" in bad["reason"]
    (invalid,) = report.invalid_images
    assert invalid["image"] == image.meta.image_id and invalid["marked_now"]
    assert bad["sha256"][:16] in invalid["reason"]
    assert not hot.exists()  # the image's hot stream went with it
    assert not store.scan("vm1")[0].valid
    again = store.scrub()  # nothing new: the rejected image is listed, the store is clean
    assert again.clean and not again.bad_objects
    assert [i["marked_now"] for i in again.invalid_images] == [False]
    fake.add_domain("vm1")
    result = capture("vm1", store, "boot", xl=fake.argv)
    assert result.stats.new_pages == 1  # the dropped page is written afresh
    store.delete("vm1", image.meta.image_id)
    assert store.scrub().to_json()["clean"]


def test_scrub_deletes_a_bad_hot_stream(store, fake) -> None:
    image = captured(store, fake)
    hot = hotcache.warm(store, "vm1", image.meta.image_id)
    flip(hot, 5000)
    report = store.scrub()
    (bad,) = report.bad_hot_streams
    assert bad["action"] == "deleted" and "checksum mismatch" in bad["reason"]
    assert not hot.exists() and store.scan("vm1")[0].valid
    assert store.scrub().clean


def test_hot_mode_overlap_checks_while_xl_reads_into_the_paused_domain(store, fake,
                                                                       data) -> None:
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    crashed(fake)
    result = restore(store, image, xl=fake.argv, hot_mode="overlap")
    assert result.hot and result.verify_s > 0
    assert (fake.state / "restored.xl").read_bytes() == data
    restore_call = next(c for c in fake.calls() if c[0] == "restore")
    assert restore_call[-1] == str(path) and "-p" in restore_call  # the file, paused
    fake.state.joinpath("domains", "pbr-guest").unlink()
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    flip(path, 100)
    with pytest.raises(CorruptObject, match=r"checksum mismatch.*restore aborted: xl "
                                            r"restore (killed|exited)"):
        restore(store, image, xl=fake.argv, hot_mode="overlap")
    assert "pbr-guest" not in fake.domains()  # built from a bad stream, never run
    assert not path.exists()  # the bad stream is dropped; the store's copy stays
    assert store.scan("vm1")[0].valid


def test_a_domain_xl_built_before_the_check_failed_is_destroyed(store, fake, data,
                                                                monkeypatch) -> None:
    """xl finished first (a fast xl, a slow check): the paused domain it built from a bad
    stream is destroyed, never unpaused."""
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    crashed(fake)
    flip(path, path.stat().st_size // 2)  # in a page: xl reads it without complaint
    check = hotcache.verify_file

    def after_xl(hot, what):
        deadline = time.monotonic() + 30
        while "pbr-guest" not in fake.domains() and time.monotonic() < deadline:
            time.sleep(0.01)
        return check(hot, what)
    monkeypatch.setattr(hotcache, "verify_file", after_xl)
    with pytest.raises(CorruptObject, match=r"checksum mismatch.*restore aborted: .*"
                                            r"domain pbr-guest \(domid \d+\) destroyed"):
        restore(store, image, xl=fake.argv, hot_mode="overlap")
    assert "pbr-guest" not in fake.domains()


def test_hot_mode_auto_overlaps_only_a_paused_restore_with_a_second_cpu(monkeypatch) -> None:
    import importlib
    import os

    restore_module = importlib.import_module("xenpbr.images.restore")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert restore_module._hot_mode("auto", paused=True) == "overlap"
    assert restore_module._hot_mode("auto", paused=False) == "file"  # it would run at once
    assert restore_module._hot_mode("overlap", paused=False) == "file"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert restore_module._hot_mode("auto", paused=True) == "file"  # one CPU: no gain
    with pytest.raises(ValueError, match="hot_mode 'fast' is none of"):
        restore_module._hot_mode("fast", paused=True)
