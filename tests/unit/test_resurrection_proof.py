"""The resurrection proof's arithmetic and parsing (xenpbr_lab.resurrection_proof), no lab:
consoles are built the way xenpbr_lab.resurrect_app prints them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpbr_lab import resurrection_proof as proof
from xenpbr_lab.resurrect_app import digest, value_for

KEYS = 5


def acks(first: int, last: int, keys: int = KEYS) -> str:
    """The application's ACK lines for writes first..last-1 (as resurrect_app.run)."""
    return "".join(f"ACK {i + 100} k{i % keys:06d} {digest(value_for(i, 64))}\r\n"
                   for i in range(first, last))


def loaded(values: dict[int, int]) -> str:
    """LOADED lines for key number -> write number, then LOADED-COUNT."""
    lines = [f"LOADED k{key:06d} {digest(value_for(i, 64))}\r\n" for key, i in values.items()]
    return "".join(lines) + f"LOADED-COUNT {len(values)}\r\n"


def test_acked_writes_are_parsed_in_order_and_a_torn_line_is_not_one() -> None:
    console = acks(0, 3) + "ACK 104 k000003 0123\r\n" + "noise ACK 1 k000001 x\r\n"
    assert proof.acked_writes(console) == [
        (f"k{i:06d}", digest(value_for(i, 64))) for i in range(3)]


def test_loaded_values_and_count() -> None:
    values, count = proof.loaded_values("boot\r\n" + loaded({0: 5, 1: 6}))
    assert values == {"k000000": digest(value_for(5, 64)), "k000001": digest(value_for(6, 64))}
    assert count == 2
    assert proof.loaded_values("no application yet") == ({}, None)


def test_nothing_is_lost_when_every_key_comes_back_at_its_last_or_a_later_write() -> None:
    acked = proof.acked_writes(acks(0, 12))  # last: k0=10 k1=11 k2=7 k3=8 k4=9
    back = {f"k{k:06d}": digest(value_for(i, 64)) for k, i in
            {0: 10, 1: 16, 2: 7, 3: 8, 4: 9}.items()}  # k1: a later, unseen write
    assert proof.lost_keys(acked, back, KEYS) == []


def test_an_older_value_or_a_missing_key_is_lost() -> None:
    acked = proof.acked_writes(acks(0, 12))
    back = {f"k{k:06d}": digest(value_for(i, 64)) for k, i in
            {0: 5, 1: 11, 2: 7, 3: 8}.items()}  # k0 older than 10, k4 missing
    assert proof.lost_keys(acked, back, KEYS) == ["k000000", "k000004"]


def test_cycle_outcome_counts_only_the_writes_before_the_panic_and_loads_after_it() -> None:
    before = "old run\r\n" + acks(0, 3)
    start = len(before)
    crash_region = acks(0, 10)
    console = (before + crash_region + "ACK-less noise\r\n" + proof.PANIC + ": sysrq\r\n"
               + "rebooted\r\n" + loaded({0: 5, 1: 6, 2: 7, 3: 8, 4: 9}) + acks(0, 4))
    crash = start + len(crash_region) - 20  # the offset is taken before the last line ends
    out = proof.cycle_outcome(console, start, crash, KEYS)
    assert out["acked_writes"] == 10 and out["keys_written"] == KEYS
    assert out["loaded"] == KEYS and out["lost_keys"] == 0 and out["lost_acked_writes"] == 0


def test_a_restart_without_resurrection_loses_every_acknowledged_write() -> None:
    start = 0
    console = acks(0, 13) + proof.PANIC + "\r\n" + loaded({}) + acks(0, 2)
    out = proof.cycle_outcome(console, start, len(acks(0, 13)), KEYS)
    assert out["loaded"] == 0
    assert out["lost_keys"] == KEYS and out["lost_acked_writes"] == 13


def test_genuine_values_are_the_applications_own_writes_of_that_key() -> None:
    assert proof.genuine("k000002", value_for(7, 64), KEYS)
    assert not proof.genuine("k000003", value_for(7, 64), KEYS)  # 7 % 5 == 2
    flipped = bytearray(value_for(7, 64))
    flipped[5] ^= 0x5A
    assert not proof.genuine("k000002", bytes(flipped), KEYS)
    assert not proof.genuine("kx", value_for(7, 64), KEYS)
    assert not proof.genuine("k000002", b"garbage", KEYS)


def test_summary_and_overhead_arithmetic() -> None:
    assert proof.summary([]) is None
    assert proof.summary([3.0, 1.0, 2.0, 10.0]) == {"runs": 4, "median": 2.5, "min": 1.0,
                                                     "max": 10.0}
    out = proof.overhead({"region": [90.0, 95.0, 80.0], "plain": [100.0, 50.0, 100.0]})
    assert out["region_median"] == 90.0 and out["plain_median"] == 100.0
    assert out["ratio"] == 0.9 and out["overhead_pct"] == 10.0
    assert proof.overhead({"region": [1.0], "plain": []})["overhead_pct"] is None


def test_done_rates_are_read_per_mode_in_run_order_and_the_echoed_command_is_not() -> None:
    console = ("$ ...; echo \"OVERHEAD region 1 $(tail -n 1 /run/x)\"\r\n"
               "OVERHEAD region 1 DONE 5000 10.001 499.9\r\n"
               "OVERHEAD plain 1 DONE 6000 10.000 600.0\r\n"
               "OVERHEAD region 2 DONE 5100 10.000 510.0\r\n")
    assert proof.done_rates(console) == {"region": [499.9, 510.0], "plain": [600.0]}


HISTORY = [
    {"method": "phase:app", "downtime_s": 9.0, "resurrection": []},  # an earlier recovery
    {"method": "phase:app", "downtime_s": 4.0,
     "resurrection": [{"app": "kvdemo", "seconds": 0.2, "rejected": []}]},
    {"method": "phase:app", "downtime_s": 6.0,
     "resurrection": [{"app": "kvdemo", "seconds": 0.4, "rejected": [{"reason": "crc"}]}]},
    {"method": "normal", "downtime_s": None, "resurrection": None},
]


def test_history_figures_use_the_last_cycles_recoveries() -> None:
    out = proof.history_figures(HISTORY, 3)
    assert out["recoveries"] == 3 and out["methods"] == {"phase:app": 2, "normal": 1}
    assert out["xenpbrd_downtime_s"] == {"runs": 2, "median": 5.0, "min": 4.0, "max": 6.0}
    assert out["extraction_s"] == {"runs": 2, "median": 0.3, "min": 0.2, "max": 0.4}
    assert out["rejected"] == 1


def _cycle(acked: int, lost: int, lost_acked: int, down: float) -> dict:
    return {"acked_writes": acked, "keys_written": KEYS, "loaded": KEYS, "lost_keys": lost,
            "lost_acked_writes": lost_acked, "lost": [], "downtime_s": down}


CORRUPT_OK = {"record": True, "header": True, "wrong_returned": 0}


def report(res_lost: int = 0, corrupt: dict | None = None) -> dict:
    return proof.build_report(
        {"resurrection": [_cycle(60, 0, 0, 5.0), _cycle(70, res_lost, res_lost, 7.0)],
         "phasereboot": [_cycle(65, 5, 65, 6.0)] * 3,
         "normal": [_cycle(61, 5, 61, 30.0)] * 3},
        {"resurrection": proof.history_figures(HISTORY[1:3], 2),
         "phasereboot": proof.history_figures(HISTORY[:2], 2)},
        {"region": [95.0], "plain": [100.0]}, corrupt or CORRUPT_OK,
        {"date": "d", "load_before": [0.1], "load_after": [0.2], "machine": {"cpus": 2},
         "command": "xenpbr-lab resurrect --cycles 2"})


def test_the_report_has_the_issues_keys_with_the_right_sums() -> None:
    out = report()
    for key in ("cycles", "acked_writes", "lost_writes", "lost_without", "corrupt_detected",
                "extraction_s", "downtime_s", "overhead_pct", "command", "date",
                "load_before", "load_after"):
        assert key in out, key
    assert out["cycles"] == {"resurrection": 2, "phasereboot": 3, "normal": 3}
    assert out["acked_writes"] == 130 and out["lost_writes"] == 0
    assert out["lost_without"] == {
        "phasereboot": {"lost_keys": 15, "lost_acked_writes": 195, "acked_writes": 195},
        "normal": {"lost_keys": 15, "lost_acked_writes": 183, "acked_writes": 183}}
    assert out["downtime_s"]["resurrection"]["crash_to_loaded"]["median"] == 6.0
    assert out["downtime_s"]["resurrection"]["xenpbrd"]["median"] == 5.0
    assert out["downtime_s"]["normal"]["xenpbrd"] is None
    assert out["extraction_s"]["max"] == 0.4
    assert out["overhead_pct"] == 5.0
    assert proof.verdict(out) == []
    json.dumps(out)  # it must be writable as JSON


@pytest.mark.parametrize("lost, corrupt, problem", [
    (1, None, "resurrection lost 1"),
    (0, {"record": True, "header": False}, "not detected"),
])
def test_the_proof_fails_if_a_write_is_lost_or_corruption_passes(lost, corrupt, problem) -> None:
    problems = proof.verdict(report(lost, corrupt))
    assert problems and problem in problems[0], problems


def test_the_report_is_written_as_json_and_markdown(tmp_path: Path) -> None:
    json_path, md_path = proof.write_report(report(), tmp_path / "b" / "r.json")
    assert json.loads(json_path.read_text())["lost_writes"] == 0
    text = md_path.read_text()
    assert md_path.suffix == ".md" and "| resurrection | 2 | 130 | 0 |" in text
    assert "xenpbr-lab resurrect --cycles 2" in text


def _extraction(records: dict[str, int], rejections: list | None = None,
                kept: bool = True) -> dict:
    return {"apps": [{"app": "kvdemo", "kept": kept,
                      "records": [[k, value_for(i, 64).hex()] for k, i in records.items()],
                      "rejections": rejections or []}], "refused": []}


ALL = {"k000000": 10, "k000001": 11, "k000002": 7}


def test_corruption_is_judged_caught_when_the_record_and_the_region_are_rejected() -> None:
    result = {"clean": _extraction(ALL), "flipped_slot": 4, "flipped_key": "k000001",
              "record": _extraction({"k000000": 10, "k000002": 7}, [["crc", 4, "k000001"]]),
              "header": _extraction({}, [["header-crc", None, ""]], kept=False)}
    out = proof.judge_corruption(result, 5)
    assert out["record"] and out["header"] and out["wrong_returned"] == 0
    assert out["header_reasons"] == ["header-crc"]


def test_corruption_that_slips_through_is_not_caught() -> None:
    wrong = bytearray(value_for(11, 64))
    wrong[4] ^= 0x5A
    flipped = _extraction({"k000000": 10, "k000002": 7})
    flipped["apps"][0]["records"].append(["k000001", bytes(wrong).hex()])
    result = {"clean": _extraction(ALL), "flipped_slot": 4, "flipped_key": "k000001",
              "record": flipped, "header": _extraction({"k000000": 10})}
    out = proof.judge_corruption(result, 5)
    assert not out["record"] and not out["header"] and out["wrong_returned"] == 1


LATEST = {0: 15, 1: 16, 2: 17, 3: 18, 4: 19}  # the last write of each key among 0..19


def test_writes_are_numbered_from_the_applications_start_not_from_the_cycles_offset() -> None:
    run_start = "LOADED-COUNT 0\r\n" + acks(0, 7)
    console = run_start + acks(7, 20) + proof.PANIC + "\r\n" + loaded(LATEST)
    out = proof.cycle_outcome(console, len(run_start), len(run_start) + 10, KEYS)
    assert out["lost_keys"] == 0 and out["acked_writes"] == 13  # counted from the offset


def test_a_console_line_lost_on_the_way_shifts_nothing() -> None:
    acked = proof.acked_writes(acks(0, 20))
    del acked[3]
    back = {f"k{k:06d}": digest(value_for(i, 64)) for k, i in LATEST.items()}
    assert proof.lost_keys(acked, back, KEYS) == []
    back["k000002"] = digest(value_for(12, 64))
    assert proof.lost_keys(acked, back, KEYS) == ["k000002"]


def test_a_whole_console_is_split_into_one_outcome_per_panic() -> None:
    back = loaded(LATEST)
    console = ("LOADED-COUNT 0\r\n" + acks(0, 20) + proof.PANIC + "\r\n" + back + acks(0, 20)
               + proof.PANIC + "\r\n" + loaded({0: 5, 1: 16, 2: 17, 3: 18, 4: 19}))
    first, second = proof.outcomes_from_console(console, KEYS)
    assert (first["acked_writes"], first["lost_keys"]) == (20, 0)
    assert (second["acked_writes"], second["lost"]) == (20, ["k000000"])


def test_the_first_line_after_the_shells_prompt_escape_is_still_read() -> None:
    console = "/ # \x1b[6n" + loaded({0: 5, 1: 6}) + "/ # \x1b[6n" + acks(0, 1)
    values, count = proof.loaded_values(console)
    assert set(values) == {"k000000", "k000001"} and count == 2
    assert proof.acked_writes(console) == [("k000000", digest(value_for(0, 64)))]
    assert proof.acked_writes("XACK 1 k000000 " + "0" * 16) == []


def test_the_acks_pattern_needs_n_lines_and_fails_fast_with_fewer() -> None:
    import re
    import time
    lines = "\n" + acks(0, 59).replace("\r\n", "\nkernel: noise\n")
    began = time.monotonic()
    assert re.search(proof.acks_pattern(60), lines) is None
    assert time.monotonic() - began < 1.0  # "(?s)(?:\nACK .*?){60}" would not come back
    assert re.search(proof.acks_pattern(60), lines + acks(59, 60))


def test_a_hang_counts_every_write_acknowledged_before_it_took_effect() -> None:
    """A hang takes effect only when a vCPU next goes idle: the application may go on
    acknowledging hundreds of writes after the injection, and must get those back. Its
    last values are far beyond what the writes before the injection allow as "later"
    (runs 11-12 of the fault campaign scored such hangs as every key lost)."""
    injected = len(acks(0, 40))
    console = (acks(0, 600) + "hung; restored\r\n"
               + loaded({k: 595 + k for k in range(KEYS)}) + acks(0, 3))
    out = proof.cycle_outcome(console, 0, injected, KEYS)
    assert out["acked_writes"] == 600 and out["lost_keys"] == 0
    stale = console.replace(loaded({k: 595 + k for k in range(KEYS)}),
                            loaded({k: 30 + k for k in range(KEYS)}))
    assert proof.cycle_outcome(stale, 0, injected, KEYS)["lost_keys"] == KEYS
