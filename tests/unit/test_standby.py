"""Standby domains (:mod:`xenpbr.images.standby`) and the stream renaming under them,
against the fake xl of :mod:`tests.unit.test_images_xl` (the lab runs them on real Xen:
tests/lab/test_standby_real.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.unit.streams import synth
from tests.unit.test_images_xl import data, store  # noqa: F401 - fixtures shared
from tests.unit.test_images_xl import FakeXl
from xenpbr import domconfig
from xenpbr.images import capture, hotcache, skeleton, standby
from xenpbr.images.errors import RestoreFailed
from xenpbr.store_restorer import StoreRestorer
from xenpbr.stream import rename
from xenpbr.stream.errors import StreamError


@pytest.fixture
def fake(tmp_path, data, monkeypatch) -> FakeXl:  # noqa: F811 - data is the shared one
    """test_images_xl's fake xl, accepting streams whose xl header was rewritten."""
    xl = FakeXl(tmp_path, data)
    monkeypatch.setenv("FAKE_XL_STATE", str(xl.state))
    xl.add_domain("vm1")
    xl.knob("renamed")
    return xl


def captured(store, fake):
    result = capture("vm1", store, "boot", xl=fake.argv)
    return store.load("vm1", result.meta.image_id)


def header_end(stream: bytes) -> int:
    return 48 + int.from_bytes(stream[44:48], "little")


# -- renaming the stream ------------------------------------------------------------------


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_a_renamed_stream_differs_only_in_the_name_whatever_its_writes(piece) -> None:
    data = b"".join(synth.iter_pv_stream(synth.PvStreamSpec(nr_pfns=16)))
    out = io.BytesIO()
    sink = rename.RenamingSink(out, "vm1--standby")  # type: ignore[arg-type]
    for at in range(0, len(data), piece):
        sink.write(data[at:at + piece])
    renamed = out.getvalue()
    assert sink.written == len(renamed)
    assert renamed[header_end(renamed):] == data[header_end(data):]
    config = json.loads(renamed[52:header_end(renamed)].rstrip(b"\0"))
    original = json.loads(data[52:header_end(data)].rstrip(b"\0"))
    assert config["c_info"]["name"] == "vm1--standby"
    config["c_info"]["name"] = original["c_info"]["name"]
    assert config == original  # the UUID, memory and devices are the saved ones
    assert renamed[:48][:44] == data[:44]  # magic, byte order and flags kept


def test_a_stream_without_a_json_config_cannot_be_renamed() -> None:
    bare = synth.xl_header(b"") + b"rest"
    with pytest.raises(StreamError, match="no xl header with a JSON domain config"):
        rename.RenamingSink(io.BytesIO(), "x").write(bare)  # type: ignore[arg-type]


def test_a_config_that_is_not_json_is_refused_by_name() -> None:
    with pytest.raises(StreamError, match="not JSON"):
        rename.renamed_header(synth.xl_header(b"{not json\0"), "x")


# -- preparing, taking over, discarding ---------------------------------------------------


def test_a_standby_is_restored_paused_under_its_own_name_from_verified_bytes(
        store, fake, data) -> None:
    image = captured(store, fake)
    made = standby.prepare(store, image, fake.argv)
    assert (made.name, made.domid, made.image_id) == ("vm1--standby", 7, image.meta.image_id)
    assert made.memory_mib == 6  # max_memkb of the embedded config, rounded up
    assert "vm1--standby" in fake.domains() and "vm1" in fake.domains()  # beside the guest
    restore_call = next(c for c in fake.calls() if c[0] == "restore")
    assert restore_call[1] == "-p" and "-e" not in restore_call  # paused, xl monitors
    got = (fake.state / "restored.xl").read_bytes()
    assert b'"name": "vm1--standby"' in got[:header_end(got)]
    assert got[header_end(got):] == data[header_end(data):]
    assert standby.load(store, "vm1") == made


def test_a_hot_stream_feeds_the_standby_checked_chunk_by_chunk(store, fake) -> None:
    image = captured(store, fake)
    hot = hotcache.warm(store, "vm1", image.meta.image_id)
    assert hot is not None
    raw = bytearray(hot.read_bytes())
    raw[-5] ^= 0xFF
    hot.write_bytes(bytes(raw))
    with pytest.raises(standby.NoStandby, match="checksum mismatch"):
        standby.prepare(store, image, fake.argv)
    assert "vm1--standby" not in fake.domains()  # the partial domain was destroyed
    assert standby.load(store, "vm1") is None


def test_no_standby_without_the_memory_for_it(store, fake) -> None:
    image = captured(store, fake)
    fake.knob("free_memory", "60")  # 6 MiB guest + 64 MiB headroom do not fit
    with pytest.raises(standby.NoStandby, match="needs 6 MiB and 64 MiB of headroom, Xen "
                                                "has 60 MiB free"):
        standby.prepare(store, image, fake.argv)
    assert not any(c[0] == "restore" for c in fake.calls())


def test_a_new_standby_replaces_the_old_one(store, fake) -> None:
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    standby.prepare(store, image, fake.argv)
    destroys = [c for c in fake.calls() if c[0] == "destroy"]
    assert destroys == [["destroy", "vm1--standby"]]
    assert fake.domains().count("vm1--standby") == 1


def test_the_standby_of_the_chosen_image_takes_over_by_rename(store, fake) -> None:
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    (fake.state / "domains" / "vm1").unlink()  # recovery destroyed the crashed domain
    restores = len([c for c in fake.calls() if c[0] == "restore"])
    assert standby.take_over(store, "vm1", image.meta.image_id, fake.argv) == 7
    assert fake.domains() == ["vm1"]
    assert ["rename", "vm1--standby", "vm1"] in fake.calls()
    assert len([c for c in fake.calls() if c[0] == "restore"]) == restores  # no copy
    assert standby.load(store, "vm1") is None  # used once


def test_a_standby_of_another_image_is_destroyed_not_used(store, fake) -> None:
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    assert standby.take_over(store, "vm1", "20990101T000000Z-0000", fake.argv) is None
    assert "vm1--standby" not in fake.domains()
    assert standby.load(store, "vm1") is None


def test_a_vanished_standby_is_not_used(store, fake) -> None:
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    (fake.state / "domains" / "vm1--standby").unlink()  # an operator destroyed it
    assert standby.take_over(store, "vm1", image.meta.image_id, fake.argv) is None


def test_a_failed_rename_destroys_the_standby(store, fake) -> None:
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    fake.knob("rename_fail")
    assert standby.take_over(store, "vm1", image.meta.image_id, fake.argv) is None
    assert "vm1--standby" not in fake.domains()


def test_an_unreadable_record_is_not_trusted(store, fake) -> None:
    path = standby.record_path(store, "vm1")
    path.parent.mkdir(parents=True)
    path.write_text("{broken")
    assert standby.load(store, "vm1") is None


def test_discard_destroys_the_standby_and_its_record(store, fake) -> None:
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    standby.discard(store, "vm1", fake.argv)
    assert "vm1--standby" not in fake.domains() and standby.load(store, "vm1") is None
    standby.discard(store, "vm1", fake.argv)  # nothing left: nothing to do


def test_recovery_uses_the_standby_and_restores_without_one(store, fake, monkeypatch) -> None:
    from xenpbr.xl import commands
    monkeypatch.setattr(commands, "XL", fake.argv)
    monkeypatch.setattr(standby.take_over, "__defaults__", (fake.argv, None))
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    (fake.state / "domains" / "vm1").unlink()
    assert StoreRestorer(store).restore("vm1", image.meta.image_id) == 7
    assert fake.domains() == ["vm1"]


def test_restoring_under_another_name_needs_a_named_config(store, fake) -> None:
    from xenpbr.images.restore import restore
    image = captured(store, fake)
    image.stream.xl_header = None  # type: ignore[misc]  # a stream xl did not write
    with pytest.raises(RestoreFailed, match="under another name"):
        restore(store, image, as_name="x--standby", xl=fake.argv)
    assert not any(c[0] == "restore" for c in fake.calls())


def test_memory_falls_back_to_the_stream_size(store, fake) -> None:
    image = captured(store, fake)
    image.stream.xl_header = None  # type: ignore[misc]
    assert skeleton.embedded_config(image.stream) is None
    assert standby.memory_mib(image) == -(-image.meta.stream_bytes // 2**20)


# -- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", 2, 1.0, -1])
def test_a_standby_setting_other_than_0_or_1_is_an_error(tmp_path: Path, value) -> None:
    cfg = domconfig.DomainConfig(tmp_path / "vm.cfg", {"xenpbr_standby": value})
    with pytest.raises(domconfig.ConfigError, match="xenpbr_standby"):
        domconfig.standby(cfg)


def test_standby_is_off_unless_asked_for(tmp_path: Path) -> None:
    assert not domconfig.standby(domconfig.DomainConfig(tmp_path / "a.cfg", {}))
    assert domconfig.standby(domconfig.DomainConfig(tmp_path / "a.cfg", {"xenpbr_standby": 1}))


# -- xenconsoled's logs follow the rename ---------------------------------------------------


def fake_proc(tmp_path: Path, processes: dict[int, str]) -> Path:
    proc = tmp_path / "proc"
    for pid, comm in processes.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "comm").write_text(comm + "\n")
    (proc / "self").mkdir(parents=True, exist_ok=True)
    return proc


def test_only_xenconsoled_is_asked_to_reopen_its_logs(tmp_path, monkeypatch) -> None:
    from xenpbr.xl import consoled
    sent = []
    monkeypatch.setattr(consoled.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    proc = fake_proc(tmp_path, {12: "xenconsoled", 13: "xenstored", 14: "xenconsoled-x"})
    assert consoled.reopen_logs(proc) == 1
    assert sent == [(12, consoled.signal.SIGHUP)]


def test_no_xenconsoled_is_nothing_to_do_and_a_failed_signal_is_no_error(
        tmp_path, monkeypatch) -> None:
    from xenpbr.xl import consoled
    assert consoled.reopen_logs(fake_proc(tmp_path, {13: "xenstored"})) == 0

    def refuse(pid, sig):
        raise PermissionError("not permitted")
    monkeypatch.setattr(consoled.os, "kill", refuse)
    assert consoled.reopen_logs(fake_proc(tmp_path / "b", {12: "xenconsoled"})) == 0


def test_a_takeover_reopens_the_console_logs(store, fake, monkeypatch) -> None:
    from xenpbr.xl import consoled
    asked = []
    monkeypatch.setattr(consoled, "reopen_logs", lambda: asked.append(1) or 1)
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    (fake.state / "domains" / "vm1").unlink()
    assert standby.take_over(store, "vm1", image.meta.image_id, fake.argv) == 7
    assert asked == [1]


def test_disks_that_cannot_be_put_back_discard_the_renamed_standby(store, fake,
                                                                   monkeypatch) -> None:
    from xenpbr.images import disks
    image = captured(store, fake)
    standby.prepare(store, image, fake.argv)
    record = standby.record_path(store, "vm1")
    held = json.loads(record.read_text())
    record.write_text(json.dumps({**held, "snapshot_disks": ["xvda"]}))

    def missing(store, image):
        raise disks.DiskSnapshotMissing("xvda's snapshot is gone")
    monkeypatch.setattr(disks, "revert", missing)
    (fake.state / "domains" / "vm1").unlink()
    assert standby.take_over(store, "vm1", image.meta.image_id, fake.argv) is None
    assert fake.domains() == []  # renamed, then destroyed: recovery restores or falls back


def test_room_beside_counts_the_image_memory_and_the_headroom(store, fake, caplog) -> None:
    image = captured(store, fake)  # a 6 MiB guest
    image_id = image.meta.image_id
    free: list[int | None] = [70]
    restorer = StoreRestorer(store, free_memory_mib=lambda: free[0])
    assert restorer.room_beside("vm1", image_id)  # 6 + 64 fit exactly
    assert "waits aside until it runs" in caplog.text
    free[0] = 69
    assert not restorer.room_beside("vm1", image_id)
    free[0] = None  # Xen could not say: no room
    assert not restorer.room_beside("vm1", image_id)
    assert not StoreRestorer(store, free_memory_mib=lambda: 10**6).room_beside("vm1", "gone")


def test_room_beside_asks_xl_without_libxl(store, fake, monkeypatch) -> None:
    from xenpbr.xl import commands
    monkeypatch.setattr(commands, "XL", fake.argv)
    image = captured(store, fake)
    fake.knob("free_memory", "69")
    assert not StoreRestorer(store).room_beside("vm1", image.meta.image_id)
    fake.knob("free_memory", "70")
    assert StoreRestorer(store).room_beside("vm1", image.meta.image_id)
