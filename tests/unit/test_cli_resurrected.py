"""``xenpbr resurrected`` and the resurrection lines of ``xenpbr history`` and of the
published state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpbr import cli, publish
from xenpbr.resurrection.model import AppExtraction, Extraction, Record, Rejection
from xenpbr.resurrection.vault import Vault
from xenpbr.state import StateDir
from xenpbr.timeline import AppResurrection, Timeline


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    state = StateDir(tmp_path / "s")
    state.register("web", {"name": "web", "on_crash": "phasereboot",
                           "xenpbr_resurrect": 1}, "", "c")
    lost = [Rejection("kv", "crc", slot=3, seq=9, key=b"k9"), Rejection("kv", "torn", slot=4)]
    records = [Record(b"k%d" % i, i + 1, b"v" * 10) for i in range(5)]
    Vault.in_state(state.root).keep("web", Extraction(12, [
        AppExtraction("kv", 2, records, lost), AppExtraction("db", 1, [Record(b"d", 1, b"x")])]),
        at=1_700_000_000.0)
    return state


def run(state: StateDir, *argv: str) -> int:
    return cli.main(["--state-dir", str(state.root), *argv])


def test_the_table_lists_each_app_with_its_losses(state: StateDir, capsys) -> None:
    assert run(state, "resurrected", "web") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["APP", "GENERATION", "RECORDS", "LOST", "BYTES", "EXTRACTED"]
    kv = next(line for line in out if line.startswith("kv "))
    assert "crc 1, torn 1" in kv and " 5 " in kv and " 60 " in kv  # 5 records, 5*(2+10) B


def test_export_writes_one_file_per_app_and_says_where(state: StateDir, tmp_path: Path,
                                                        capsys) -> None:
    assert run(state, "resurrected", "web", "--export", str(tmp_path / "out"), "--json") == 0
    rows = {r["app"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["kv"]["exported_to"] == str(tmp_path / "out" / "kv.json")
    exported = json.loads((tmp_path / "out" / "kv.json").read_text())
    assert len(exported["records"]) == 5 and exported["generation"] == 2
    assert rows["kv"]["lost"] == [{"reason": "crc", "seq": 9, "key": "azk="},
                                  {"reason": "torn", "seq": None, "key": None}]


def test_a_damaged_vault_file_is_listed_not_exported_and_export_fails(
        state: StateDir, tmp_path: Path, capsys) -> None:
    path = Vault.in_state(state.root).root / "web" / "kv.vault"
    path.write_bytes(path.read_bytes().replace(b'"generation": 2', b'"generation": 3'))
    assert run(state, "resurrected", "web", "--export", str(tmp_path / "out")) == 1
    out, err = capsys.readouterr()
    assert "DAMAGED: SHA-256 mismatch" in out and "kv.vault" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["db.json"]


def test_an_unknown_domain_is_an_error_and_an_empty_vault_says_so(state: StateDir,
                                                                  capsys) -> None:
    assert run(state, "resurrected", "nope") == 1
    assert "nope" in capsys.readouterr().err
    state.register("api", {"name": "api"}, "", "c")
    assert run(state, "resurrected", "api") == 0
    assert capsys.readouterr().out.strip() == "nothing held"


def _recovery_with_resurrection(state: StateDir) -> Timeline:
    t = Timeline("web", "crash", method="phase:app", outcome="recovered")
    t.mark("crash_seen", now=1.0)
    t.mark("extracted", "2 regions read, 13 records, 3 rejected, kept kv", now=1.2)
    t.mark("restore_finished", now=2.0)
    t.resurrection = [AppResurrection("kv", 1, 12, {"crc": 2}, 8192, 0.004),
                      AppResurrection("big", 0, 0, {"cap-bytes": 1}),
                      AppResurrection("../evil", 0, 0, {"registration": 1})]
    state.add_history(t)
    return t


def test_history_shows_each_app_of_the_extraction(state: StateDir, capsys) -> None:
    _recovery_with_resurrection(state)
    assert run(state, "history", "web") == 0
    out = capsys.readouterr().out
    assert "resurrection: 2 regions read, 13 records, 3 rejected, kept kv" in out
    assert "resurrection kv: 1 region, 12 records, rejected crc x2, 8192 B, 0.004 s" in out
    assert "resurrection big: 0 regions, 0 records, rejected cap-bytes x1" in out
    assert "extracted=0.2" in out


def test_the_published_state_says_the_same_in_brief(state: StateDir) -> None:
    _recovery_with_resurrection(state)
    keys = publish.snapshot(state, "web", "watching", 5)
    assert keys["last-recovery/resurrection/kv"] == \
        "regions=1 records=12 rejected=crc:2 bytes=8192 seconds=0.004"
    assert keys["last-recovery/resurrection/big"].startswith("regions=0 records=0 "
                                                             "rejected=cap-bytes:1")
    assert not any("evil" in k for k in keys)  # a guest's name is no xenstore path
