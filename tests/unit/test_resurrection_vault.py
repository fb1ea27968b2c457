"""The vault: dom0's durable, checksummed copy of extracted records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpbr.resurrection.model import AppExtraction, Extraction, Record, Rejection
from xenpbr.resurrection.vault import Vault, VaultError, held_to_json, seal, unseal
from xenpbr.state import StateError


def _app(app: str = "kv", generation: int = 1, n: int = 3, *, region_ok: bool = True,
         torn: int = 0) -> AppExtraction:
    records = [Record(f"k{i}".encode(), i + 1, f"value-{generation}-{i}".encode())
               for i in range(n)]
    rejections = [Rejection(app, "crc", "slot checksum", slot=10 + i, seq=100 + i,
                            key=f"t{i}".encode()) for i in range(torn)]
    if not region_ok:
        rejections.append(Rejection(app, "header-crc", "header checksum"))
        records = []
    return AppExtraction(app, generation, records, rejections, bytes_read=4096 * 4,
                         seconds=0.01)


def _extraction(*apps: AppExtraction) -> Extraction:
    return Extraction(domid=7, apps=list(apps))


def test_keep_then_held_round_trips_records_and_losses(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    kept = vault.keep("web", _extraction(_app("kv", torn=2), _app("db", n=1)), at=1000.5)
    assert sorted(kept) == ["db", "kv"]
    held = {h.app: h for h in vault.held("web")}
    assert held["kv"].records == _app("kv").records
    assert [(r.reason, r.seq, r.key) for r in held["kv"].lost] == [("crc", 100, b"t0"),
                                                                    ("crc", 101, b"t1")]
    assert held["kv"].extracted_at == 1000.5 and held["kv"].generation == 1
    assert held["kv"].bytes == sum(len(r.key) + len(r.value) for r in held["kv"].records)
    assert vault.held("other") == []


def test_a_failed_extraction_never_overwrites_good_data(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    vault.keep("web", _extraction(_app("kv", generation=1)), at=1.0)
    assert vault.keep("web", _extraction(_app("kv", generation=2, region_ok=False)), at=2.0) == []
    [held] = vault.held("web")
    assert held.generation == 1 and held.records == _app("kv", generation=1).records


def test_a_newer_good_extraction_replaces_the_older_and_says_what_it_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vault = Vault(tmp_path)
    vault.keep("web", _extraction(_app("kv", generation=1, n=5)), at=1.0)
    assert "replaces" not in caplog.text
    vault.keep("web", _extraction(_app("kv", generation=2, n=2)), at=2.0)
    [held] = vault.held("web")
    assert (held.generation, len(held.records), held.extracted_at) == (2, 2, 2.0)
    assert "never confirmed delivered (generation 1, 5 records" in caplog.text


def test_a_damaged_file_is_reported_and_never_held(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    vault.keep("web", _extraction(_app("kv"), _app("db")), at=1.0)
    path = tmp_path / "web" / "kv.vault"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    contents = vault.contents("web")
    assert [h.app for h in contents.held] == ["db"]
    assert [(d.app, "SHA-256 mismatch" in d.reason) for d in contents.damaged] == [("kv", True)]
    assert vault.export("web", tmp_path / "out") == [tmp_path / "out" / "db.json"]


def test_a_file_claiming_another_app_is_damaged(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    vault.keep("web", _extraction(_app("kv")), at=1.0)
    (tmp_path / "web" / "kv.vault").rename(tmp_path / "web" / "db.vault")
    assert vault.held("web") == []
    assert "not 'db'" in vault.contents("web").damaged[0].reason


def test_seal_and_unseal_detect_any_change() -> None:
    body = json.dumps({"a": 1}).encode()
    assert unseal(seal(body)) == body
    with pytest.raises(VaultError, match="SHA-256"):
        unseal(seal(body) + b" ")
    with pytest.raises(VaultError, match="header"):
        unseal(body)


def test_drop_forgets_one_app(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    vault.keep("web", _extraction(_app("kv"), _app("db")), at=1.0)
    vault.drop("web", "kv")
    vault.drop("web", "kv")  # twice is fine
    assert [h.app for h in vault.held("web")] == ["db"]


def test_export_writes_json_an_operator_can_read(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    vault.keep("web", _extraction(_app("kv", n=2)), at=5.0)
    [path] = vault.export("web", tmp_path / "exp")
    data = json.loads(path.read_text())
    [held] = vault.held("web")
    assert data == held_to_json(held)
    assert data["records"][0]["key"] == "azA="  # base64 of b"k0"


def test_hostile_app_names_never_become_paths(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    assert vault.keep("web", _extraction(_app("../../etc"), _app("kv")), at=1.0) == ["kv"]
    assert sorted(p.name for p in (tmp_path / "web").iterdir()) == ["kv.vault"]
    with pytest.raises(VaultError):
        vault.drop("web", "../x")
    with pytest.raises(StateError):
        vault.held("../x")


def test_bounds_refuse_new_data_and_keep_the_old(tmp_path: Path) -> None:
    vault = Vault(tmp_path, max_apps=2)
    assert vault.keep("web", _extraction(_app("a"), _app("b"), _app("c")), at=1.0) == ["a", "b"]
    assert vault.keep("web", _extraction(_app("b", generation=2)), at=2.0) == ["b"]
    small = Vault(tmp_path / "small", max_domain_bytes=600)
    assert small.keep("web", _extraction(_app("kv", n=200)), at=1.0) == []
    assert small.held("web") == []


def test_in_state_is_below_the_state_root(tmp_path: Path) -> None:
    assert Vault.in_state(tmp_path).root == tmp_path / "resurrection"


def test_a_write_killed_halfway_leaves_only_a_temp_file_that_is_never_read(
        tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    vault.keep("web", _extraction(_app("kv")), at=1.0)
    (tmp_path / "web" / ".kv.vault.999.tmp").write_bytes(b"xenpbr-vault 1 sha256=")
    assert [h.app for h in vault.held("web")] == ["kv"] and vault.contents("web").damaged == []
    assert (tmp_path / "web" / "kv.vault").stat().st_mode & 0o777 == 0o600
