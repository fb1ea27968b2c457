"""Delivery of resurrected records: dom0 writes over the fake xenstore, the agent reads,
verifies, writes files, runs the procedure and confirms; corruption, truncation and caps."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

from xenpbr.guestproto import resurrection_delivery as rd
from xenpbr.guestproto.control import prepare_domain
from xenpbr.resurrection import deliver
from xenpbr.resurrection.model import Record, Rejection
from xenpbr.xenstore import FakeXenstore, FakeXenstoreServer
from xenpbr.xenstore.errors import PermissionDenied
from xenpbr_agent import cli
from xenpbr_agent.config import parse_config
from xenpbr_agent.resurrected import hand_over_all, load_resurrected

DOMID = 7
APP = "kv-demo"


def records(n: int, size: int = 100, start: int = 1) -> list[Record]:
    return [Record(f"key{i}".encode(), start + i, bytes([i % 251]) * size) for i in range(n)]


@pytest.fixture
def server() -> FakeXenstoreServer:
    srv = FakeXenstoreServer()
    srv.create_domain(DOMID)
    with srv.connect(0) as dom0:
        prepare_domain(dom0, DOMID, generation=0)
    return srv


def dom0(server: FakeXenstoreServer) -> FakeXenstore:
    return server.connect(0)


def guest(server: FakeXenstoreServer) -> FakeXenstore:
    return server.connect(DOMID)


def config(text: str = ""):
    return parse_config(text, "agent.conf")


def handed(server: FakeXenstoreServer, tmp_path: Path, cfg=None, **kwargs):
    with guest(server) as xs:
        return hand_over_all(xs, cfg or config(), root=str(tmp_path), **kwargs)


# -- the wire format ---------------------------------------------------------------------------


def test_payload_round_trips_records_tombstones_and_lost_entries() -> None:
    payload = rd.Payload(
        (rd.DeliveredRecord(b"a", 5, b"\x00\xff" * 300), rd.DeliveredRecord(b"b", 9, b"", True)),
        (rd.LostRecord("torn", "bad crc", 12, b"c"), rd.LostRecord("delivery-cap")), 3)
    assert rd.decode_payload(rd.encode_payload(payload)) == payload


@pytest.mark.parametrize("cut", [1, 8, 20, 37, 600])
def test_a_truncated_payload_is_refused(cut: int) -> None:
    data = rd.encode_payload(rd.Payload((rd.DeliveredRecord(b"a", 1, b"x" * 600),), ()))
    with pytest.raises(rd.DeliveryMalformed):
        rd.decode_payload(data[:-cut])


def test_a_payload_with_trailing_bytes_or_a_bad_magic_is_refused() -> None:
    data = rd.encode_payload(rd.Payload((), ()))
    for bad in (data + b"\0", b"XPBRDLV2" + data[8:]):
        with pytest.raises(rd.DeliveryMalformed, match="after the payload|magic"):
            rd.decode_payload(bad)


def test_counts_that_cannot_fit_are_refused_before_any_allocation() -> None:
    data = rd.MAGIC + (0xFFFFFFFF).to_bytes(4, "little") + bytes(8)
    with pytest.raises(rd.DeliveryMalformed, match="cannot fit"):
        rd.decode_payload(data)


@pytest.mark.parametrize("raw", [b"", b"2 1 10 1 5", b"1 1 10 2 5", b"1 01 10 1 5",
                                 b"1 1 10 1 5 ", b"1 1 99999999999 65105 1",
                                 b"1 1 10 1 4294967296", b"1 " * 50])
def test_manifests_are_parsed_strictly(raw: bytes) -> None:
    with pytest.raises(rd.DeliveryMalformed):
        rd.parse_manifest(raw)


@pytest.mark.parametrize("raw,expected", [
    (b"ok 3", rd.Confirmation(True, 3)),
    (b"bad 4 crc", rd.Confirmation(False, 4, "crc")),
    (b"bad 0 procedure-failed", rd.Confirmation(False, 0, "procedure-failed"))])
def test_confirmations_parse(raw: bytes, expected: rd.Confirmation) -> None:
    assert rd.parse_confirmation(raw) == expected
    assert rd.parse_confirmation(expected.encode().encode()) == expected


@pytest.mark.parametrize("raw", [b"ok", b"ok 3 crc", b"bad 3", b"OK 3", b"ok -1", b"ok 03",
                                 b"ok 3\n", b"bad 3 Crc", b"bad 3 a b", b"ok \xff",
                                 b"bad 1 " + b"x" * 100])
def test_confirmations_are_parsed_strictly(raw: bytes) -> None:
    with pytest.raises(rd.ConfirmationMalformed):
        rd.parse_confirmation(raw)


def test_app_names_are_xenstore_path_components_as_they_are() -> None:
    assert rd.app_key("kv-demo") == "kv-demo" and rd.app_from_key("kv_demo") == "kv_demo"
    assert rd.app_from_key("Bad") is None and rd.app_from_key("kv.demo") is None
    for bad in ("../x", "kv.demo", "kv@demo"):  # xenstored refuses "." in a path
        with pytest.raises(ValueError):
            rd.app_key(bad)


# -- dom0 writes, the agent reads --------------------------------------------------------------


def test_dom0_delivers_and_the_agent_writes_records_and_lost(server, tmp_path) -> None:
    sent = records(40, size=300) + [Record(b"gone", 99, b"", tombstone=True)]
    lost = [Rejection(APP, "torn", "crc mismatch", slot=4, seq=77, key=b"k77")]
    with dom0(server) as xs:
        stats = deliver.write_delivery(xs, DOMID, APP, 5, sent, lost)
    assert stats.records == 41 and stats.lost == 1 and stats.chunks > 1
    [outcome] = handed(server, tmp_path)
    assert outcome.confirmation == rd.Confirmation(True, 5)
    assert load_resurrected(APP, str(tmp_path)) == {r.key: r.value for r in sent[:-1]}
    lost_file = json.loads((tmp_path / APP / "lost.json").read_text())
    assert lost_file["lost"] == [{"reason": "torn", "detail": "crc mismatch", "seq": 77,
                                  "key": base64.b64encode(b"k77").decode()}]
    with dom0(server) as xs:
        assert deliver.read_confirmation(xs, DOMID, APP) == rd.Confirmation(True, 5)


def test_the_guest_cannot_alter_a_delivery(server) -> None:
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 1, records(3), [])
    with guest(server) as xs:
        for path in (f"{rd.DELIVERY_DIR}/kv-demo", f"{rd.DELIVERY_DIR}/kv-demo/0"):
            assert xs.read(path)
            with pytest.raises(PermissionDenied):
                xs.write(path, b"forged")


def test_a_delivery_is_handed_over_once_per_generation(server, tmp_path) -> None:
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 2, records(2), [])
    assert handed(server, tmp_path)[0].confirmation is not None
    again = handed(server, tmp_path)[0]
    assert again.confirmation is None and again.note.startswith("already-confirmed")
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 3, records(1), [])
    assert handed(server, tmp_path)[0].confirmation == rd.Confirmation(True, 3)


def corrupt(server: FakeXenstoreServer, path: str, change) -> None:
    with dom0(server) as xs:
        xs.write(path, change(xs.read(path)))


@pytest.mark.parametrize("change,reason", [
    (lambda raw: base64.b64encode(b"Z" + base64.b64decode(raw)[1:]), "crc"),
    (lambda raw: base64.b64encode(base64.b64decode(raw)[:-3]), "size"),
    (lambda raw: b"***", "chunk"),
])
def test_corrupt_or_truncated_chunks_are_confirmed_bad(server, tmp_path, change, reason) -> None:
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 4, records(30), [])
    corrupt(server, f"/local/domain/{DOMID}/{rd.DELIVERY_DIR}/kv-demo/1", change)
    [outcome] = handed(server, tmp_path)
    assert outcome.confirmation == rd.Confirmation(False, 4, reason)
    assert not (tmp_path / APP).exists()
    with dom0(server) as xs:
        assert deliver.read_confirmation(xs, DOMID, APP) == rd.Confirmation(False, 4, reason)


def test_a_new_delivery_of_a_generation_confirmed_bad_is_handed_over(server, tmp_path) -> None:
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 4, records(30), [])
    corrupt(server, f"/local/domain/{DOMID}/{rd.DELIVERY_DIR}/kv-demo/0", lambda raw: b"!")
    assert handed(server, tmp_path)[0].confirmation == rd.Confirmation(False, 4, "chunk")
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 4, records(30), [])
        assert deliver.read_confirmation(xs, DOMID, APP) is None
    assert handed(server, tmp_path)[0].confirmation == rd.Confirmation(True, 4)


def test_a_missing_chunk_is_detected(server, tmp_path) -> None:
    with dom0(server) as xs:
        stats = deliver.write_delivery(xs, DOMID, APP, 4, records(30), [])
        xs.rm(f"/local/domain/{DOMID}/{rd.DELIVERY_DIR}/kv-demo/{stats.chunks - 1}")
    assert handed(server, tmp_path)[0].confirmation == rd.Confirmation(False, 4, "chunk")


def test_a_delivery_without_its_manifest_yet_is_left_pending(server, tmp_path) -> None:
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 4, records(3), [])
        xs.write(f"/local/domain/{DOMID}/{rd.DELIVERY_DIR}/kv-demo", b"")
    [outcome] = handed(server, tmp_path)
    assert outcome.confirmation is None and outcome.note == "pending"


def test_dom0_ignores_a_malformed_confirmation(server) -> None:
    with guest(server) as xs:
        xs.write(f"{rd.CONFIRM_DIR}/kv-demo", b"ok 1; rm -rf /")
    with dom0(server) as xs:
        assert deliver.read_confirmation(xs, DOMID, APP) is None
        assert deliver.read_confirmation(xs, DOMID, "other") is None


def test_clear_removes_the_delivery_and_the_confirmation(server, tmp_path) -> None:
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 1, records(3), [])
    handed(server, tmp_path)
    with dom0(server) as xs:
        deliver.clear_delivery(xs, DOMID, APP)
        deliver.clear_delivery(xs, DOMID, "never-delivered")
        assert xs.read_or(deliver.manifest_path(DOMID, APP), None) is None
        assert deliver.read_confirmation(xs, DOMID, APP) is None


# -- the cap -----------------------------------------------------------------------------------


def test_records_over_the_cap_are_told_as_lost_in_seq_order(server, tmp_path) -> None:
    sent = records(50, size=1000)
    with dom0(server) as xs:
        stats = deliver.write_delivery(xs, DOMID, APP, 1, list(reversed(sent)), [], cap=20_000)
    assert stats.bytes <= 20_000 and 0 < stats.records < 50
    assert stats.over_cap == 50 - stats.records
    handed(server, tmp_path)
    got = load_resurrected(APP, str(tmp_path))
    assert set(got) == {r.key for r in sent[:stats.records]}  # the oldest seqs first
    lost = json.loads((tmp_path / APP / "lost.json").read_text())
    assert [x["seq"] for x in lost["lost"]] == [r.seq for r in sent[stats.records:]]
    assert {x["reason"] for x in lost["lost"]} == {deliver.CAP_REASON}


def test_the_cap_is_per_domain_across_applications(server, tmp_path) -> None:
    with dom0(server) as xs:
        first = deliver.write_delivery(xs, DOMID, "one", 1, records(10, 1000), [], cap=15_000)
        second = deliver.write_delivery(xs, DOMID, "two", 1, records(10, 1000), [], cap=15_000)
    assert first.records == 10 and first.bytes + second.bytes <= 15_000
    assert second.records < 10 and second.over_cap == 10 - second.records


def test_a_lost_list_over_the_cap_is_counted(server, tmp_path) -> None:
    lost = [Rejection(APP, "torn", "x" * 200, seq=i, key=b"k") for i in range(1, 200)]
    with dom0(server) as xs:
        stats = deliver.write_delivery(xs, DOMID, APP, 1, [], lost, cap=4096)
    assert stats.bytes <= 4096 and stats.lost == 199
    handed(server, tmp_path)
    lost_file = json.loads((tmp_path / APP / "lost.json").read_text())
    assert len(lost_file["lost"]) + lost_file["omitted"] == 199 and lost_file["omitted"] > 0


# -- the procedure and the subcommand ----------------------------------------------------------


def test_the_procedure_runs_with_its_folder_and_a_failure_is_confirmed_bad(server,
                                                                          tmp_path) -> None:
    out = tmp_path / "seen"
    script = f"import os; open({str(out)!r}, 'w').write(os.environ['XENPBR_RESURRECTED_DIR'])"
    cfg = config(f"[resurrect]\n{APP} = {sys.executable} -c \"{script}\"\n"
                 f"other = {sys.executable} -c 'raise SystemExit(3)'\n")
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 1, records(2), [])
        deliver.write_delivery(xs, DOMID, "other", 1, records(2), [])
    outcomes = {o.app: o for o in handed(server, tmp_path / "run", cfg)}
    assert out.read_text() == str(tmp_path / "run" / APP)
    assert outcomes[APP].confirmation == rd.Confirmation(True, 1)
    assert outcomes["other"].confirmation == rd.Confirmation(False, 1, "procedure-failed")


def test_resurrect_section_is_validated() -> None:
    from xenpbr_agent import ConfigError
    with pytest.raises(ConfigError, match="one command per application"):
        config("[resurrect]\nkv = a\n  b\n")
    with pytest.raises(ConfigError, match="application names"):
        config("[resurrect]\n-kv = a\n")
    assert config("[resurrect]\nkv = /bin/kv --reload\n").resurrect == {
        "kv": ("/bin/kv", "--reload")}


def test_the_subcommand_prints_one_line_per_delivery(server, tmp_path, capsys,
                                                     monkeypatch) -> None:
    (tmp_path / "agent.conf").write_text("[phase:boot]\n")
    monkeypatch.setattr("xenpbr_agent.resurrected.ROOT", str(tmp_path / "run"))
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 6, records(3), [])
    code = cli.main(["resurrected", "--config", str(tmp_path / "agent.conf")],
                    xs_factory=lambda: FakeXenstore(server, domid=DOMID))
    assert code == 0
    assert capsys.readouterr().out == f"{APP} ok 6 records=3 lost=0\n"


def test_wait_returns_when_the_configured_apps_are_delivered(server, tmp_path) -> None:
    with dom0(server) as xs:
        deliver.write_delivery(xs, DOMID, APP, 1, records(1), [])
    ticks = iter(range(100))
    with guest(server) as xs:
        from xenpbr_agent.resurrected import wait_for_deliveries
        wait_for_deliveries(xs, config(f"[resurrect]\n{APP} = true\n"), 30,
                            clock=lambda: next(ticks))
    assert next(ticks) < 5  # returned at once, without waiting out the 30 s
