"""The proof's key-value application: ACK lines, resurrected state loaded and re-registered."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest

from xenpbr_lab import resurrect_app


class FakeRegion:
    made: list["FakeRegion"] = []

    def __init__(self, app: str, size: int, slot_size: int) -> None:
        self.app, self.size, self.seq, self.puts = app, size, 0, []
        self.closed = False

    @classmethod
    def create(cls, app: str, size: int, slot_size: int = 256) -> "FakeRegion":
        region = cls(app, size, slot_size)
        cls.made.append(region)
        return region

    def put(self, key: bytes, value: bytes) -> int:
        self.seq += 10
        self.puts.append((key, value))
        return self.seq

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def region(monkeypatch) -> type[FakeRegion]:
    module = types.ModuleType("xenpbr_agent.resurrect")
    module.Region = FakeRegion  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xenpbr_agent.resurrect", module)
    FakeRegion.made = []
    return FakeRegion


def test_every_write_is_acked_with_the_regions_seq_and_the_values_digest(region) -> None:
    out = io.StringIO()
    store = resurrect_app.RegionStore("kv", 1 << 20, 256)
    writes, _ = resurrect_app.run(store, out, keys=3, value_size=8, duration=0, rate=0,
                                  stopped=lambda: len(out.getvalue().splitlines()) >= 7)
    lines = out.getvalue().splitlines()
    assert writes == 7 and len(lines) == 7
    seq, key, dig = lines[6].split()[1:]
    assert (int(seq), key) == (70, "k000000")
    assert dig == resurrect_app.digest(region.made[0].puts[6][1]) == resurrect_app.digest(
        store.data[b"k000000"])
    assert len({line.split()[3] for line in lines}) == 7  # each write has its own value


def test_start_loads_the_resurrected_state_and_registers_it_again(region, tmp_path,
                                                                   monkeypatch) -> None:
    folder = tmp_path / "kv"
    folder.mkdir()
    (folder / "records.json").write_text(json.dumps({"records": [
        {"key": "YQ==", "value": "eA==", "seq": 4, "tombstone": False},
        {"key": "Yg==", "value": "", "seq": 5, "tombstone": True}]}))
    monkeypatch.setattr("xenpbr_agent.resurrected.ROOT", str(tmp_path))
    out = io.StringIO()
    store = resurrect_app.RegionStore("kv", 1 << 20, 256)
    assert resurrect_app.load("kv", store, out) == 1
    assert out.getvalue() == f"LOADED a {resurrect_app.digest(b'x')}\nLOADED-COUNT 1\n"
    assert region.made[0].puts == [(b"a", b"x")]


def test_plain_mode_runs_the_same_workload_without_a_region(tmp_path: Path) -> None:
    log = tmp_path / "acks.log"
    assert resurrect_app.main(["--mode", "plain", "--duration", "0.2", "--keys", "5",
                               "--log", str(log)]) == 0
    lines = log.read_text().splitlines()
    done = lines[-1].split()
    assert done[0] == "DONE" and int(done[1]) == len(lines) - 1 > 0
    assert [int(line.split()[1]) for line in lines[:-1]] == list(range(1, len(lines)))
