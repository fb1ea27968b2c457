"""The fault campaign's bookkeeping (xenpbr_lab/faults.py) without the lab: numbering
across runs and threads, the stop signal, the summary and the markdown."""

from __future__ import annotations

import json

import pytest

from xenpbr_lab import faults


def row(n: int, kind: str, outcome: str, detected: float | None = None,
        back: bool = True) -> dict:
    change = None if kind == "crash" else {"symbol": "f+0x1", "old": "00", "new": "01"}
    return {"n": n, "guest": "f-1", "kind": kind, "seed": 1000 + n, "change": change,
            "paused_s": 0.01, "kernel_said": [], "outcome": outcome, "detected_s": detected,
            "recovered_by": "phase:app" if outcome != "silent" else "rejuvenated: phase:app",
            "recovery_outcome": "recovered", "downtime_s": 2.0, "service_back": back,
            "run": 1, "guest_memory_mib": 192}


CHECKS = {"acked_records": 50, "lost_records": 0, "duplicate_records": 0,
          "fsck_root_clean": True, "fsck_data_clean": True}


@pytest.fixture(autouse=True)
def no_stop():
    faults.STOP.clear()
    yield
    faults.STOP.clear()


def test_numbers_continue_the_report_and_stop_on_request() -> None:
    numbers = faults._Numbers(done=7, count=3)
    assert [numbers.take(), numbers.take()] == [8, 9]
    faults.STOP.set()
    assert numbers.take() is None


def test_summary_counts_every_run_and_guest() -> None:
    report = {"runs": [{"checks": {"f-1": CHECKS, "f-2": {**CHECKS, "lost_records": 1}}},
                       {"checks": CHECKS}],  # an older report's single-guest checks
              "injections": [row(1, "stack", "silent"), row(2, "hang", "hang", 21.5),
                             row(3, "crash", "crash", 0.2), row(4, "text", "crash", 3.0,
                                                                back=False)]}
    s = faults.summarise(report)
    assert s["injections"] == 4 and s["service_back"] == 3
    assert s["by_kind"]["text"] == {"crash": 1} and s["outcomes"]["crash"] == 2
    assert s["detection_s"]["crash"] == {"n": 2, "median": 1.6, "max": 3.0}
    assert (s["lost_records"], s["acked_records"], s["checked_runs"]) == (1, 150, 3)


def test_injections_of_a_run_stopped_before_its_disk_checks_are_told_apart() -> None:
    stopped = {**row(2, "text", "silent"), "run": 2, "guest_memory_mib": 1740}
    checked = {**row(3, "stack", "silent"), "run": 3, "guest_memory_mib": 1740}
    s = faults.summarise({"runs": [{"checks": CHECKS}, {"checks": {}},
                                   {"checks": {"f-1": CHECKS}}],
                          "injections": [row(1, "stack", "silent"), stopped, checked]})
    assert s["by_memory_mib"] == {"192": 1, "1740": 2}
    assert s["disks_checked_by_memory_mib"] == {"192": 1, "1740": 1}


def test_the_report_is_written_and_merged(tmp_path) -> None:
    path = tmp_path / "report.json"
    report = {"runs": [{"started": "t", "command": "c", "injections": 1,
                        "guest_memory_mib": 192, "machine": {}, "checks": {"f-1": CHECKS}}],
              "injections": [row(1, "hang", "hang", 20.0)]}
    faults._save(report, path)
    again = faults.load_report(path)
    assert again["injections"] == report["injections"] and "summary" in json.loads(
        path.read_text())
    md = path.with_suffix(".md").read_text()
    assert "back in service: **1 of 1**" in md and "| 1 | f-1 | hang | f+0x1 |" in md
    assert faults.load_report(tmp_path / "none.json") == {"runs": [], "injections": []}


def test_a_provoked_fault_says_what_the_agent_answered() -> None:
    provoked = {**row(5, "lkdtm:BUG", "crash", 0.1), "change": None,
                "provoked": {"id": 9, "type": "BUG", "taken": "started",
                             "taken_after_s": 0.1}}
    gone = {**provoked, "n": 6, "provoked": {**provoked["provoked"], "taken": None}}
    assert faults._line(provoked).startswith("#5 lkdtm:BUG at agent: started: crash")
    md = faults.markdown({"runs": [], "injections": [provoked, gone],
                          "summary": faults.summarise({"runs": [],
                                                       "injections": [provoked, gone]})})
    assert "| 5 | f-1 | lkdtm:BUG | agent: started |" in md
    assert "| 6 | f-1 | lkdtm:BUG | agent: no answer |" in md
    returned = {**provoked, "outcome": "silent",
                "provoked": {**provoked["provoked"], "after_window": "returned"}}
    stuck = {**returned, "provoked": {**provoked["provoked"], "after_window": "started"}}
    assert faults._where(returned) == "agent: started, then returned"
    assert faults._where(stuck) == "agent: started"  # the write never came back
    assert "| 1 | f-1 | crash | sysrq c |" in faults.markdown(
        {"runs": [], "injections": [row(1, "crash", "crash", 0.2)],
         "summary": faults.summarise({"runs": [], "injections": [row(1, "crash", "crash")]})})


@pytest.mark.parametrize("kind, known", [("stack", True), ("lkdtm:BUG", True),
                                         ("lkdtm:HUNG_TASK", True), ("lkdtm:bug", False),
                                         ("lkdtm:", False), ("BUG", False), ("meltdown", False)])
def test_the_campaign_knows_its_kinds_and_lkdtm_types(kind: str, known: bool) -> None:
    assert faults.known_kind(kind) is known


def test_lkdtm_stands_for_each_of_its_fault_types_in_turn() -> None:
    kinds = faults.expand_kinds(["stack", "lkdtm", "hang"])
    assert kinds[0] == "stack" and kinds[-1] == "hang"
    assert kinds[1:4] == ["lkdtm:PANIC", "lkdtm:BUG", "lkdtm:WARNING"]
    assert len(kinds) == 2 + len(faults.LKDTM_TYPES) and all(map(faults.known_kind, kinds))
    assert "lkdtm:REFCOUNT_TIMING" not in kinds  # a benchmark, no fault


def test_the_kernel_s_words_are_kept_and_the_agent_s_are_not() -> None:
    console = ("WARNING: provoking LKDTM BUG for dom0's request 4\n"
               "kernel BUG at drivers/misc/lkdtm/bugs.c:78!\n"
               "WARNING: CPU: 0 PID: 7 at drivers/misc/lkdtm/bugs.c:90 lkdtm_WARNING\n")
    assert faults._kernel_said(console) == ["kernel BUG at drivers/misc/lkdtm/bugs.c:78!",
                                            "WARNING: CPU: 0 PID: 7 at drivers/misc/lkdtm/"
                                            "bugs.c:90 lkdtm_WARNING"]


def test_a_fault_the_kernel_lived_through_is_explained_by_its_warning() -> None:
    console = ("[ 9.1] lkdtm: Performing direct entry REFCOUNT_INC_OVERFLOW\n"
               "[ 9.2] refcount_t: saturated; leaking memory.\n"
               "[ 9.3] lkdtm: FAIL: refcount wrapped\n"
               "[ 9.4] UBSAN: array-index-out-of-bounds in drivers/misc/lkdtm/bugs.c:300:5\n"
               "[ 9.5] lkdtm: Good, copy_to_user() failed, but lacked Oops(?!)\n")
    assert faults._kernel_said(console) == [
        "refcount_t: saturated; leaking memory.", "lkdtm: FAIL: refcount wrapped",
        "UBSAN: array-index-out-of-bounds in drivers/misc/lkdtm/bugs.c:300:5",
        "lkdtm: Good, copy_to_user() failed, but lacked Oops(?!)"]


def test_dom0_gets_the_faults_extra_and_guests_do_not() -> None:
    """Capstone is dom0's alone (a 128 MiB guest's initramfs has no room for it): the
    lab's dom0-only wheels pin it as setup.cfg's ``faults`` extra does."""
    import configparser
    from pathlib import Path

    from xenpbr_lab import build
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    faults_extra = [line.strip() for line in cfg["options.extras_require"]["faults"].splitlines()
                    if line.strip() and not line.strip().startswith("#")]
    assert faults_extra and set(faults_extra) <= set(build.DOM0_WHEELS)
    assert not any("capstone" in r for r in cfg["options"]["install_requires"].splitlines())


class _Console:
    """A guest whose console is a string (what ``console_from`` and the watcher read)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def watch_console(self, patterns, after=0, timeout=0.0):
        import re
        if not all(re.search(p, self.text[after:]) for p in patterns):
            raise faults.LabTimeout("not there")
        return {}


def _ack_lines(first: int, last: int) -> str:
    from xenpbr_lab.resurrect_app import digest, value_for
    return "".join(f"ACK {i + 1} k{i % faults.APP_KEYS:06d} {digest(value_for(i, 64))}\n"
                   for i in range(first, last))


def _loaded(last: int) -> str:
    """What the application loads when dom0 resurrected writes up to *last* - 1."""
    from xenpbr_lab.resurrect_app import digest, value_for
    newest = {i % faults.APP_KEYS: i for i in range(last)}
    return "".join(f"LOADED k{k:06d} {digest(value_for(i, 64))}\n"
                   for k, i in sorted(newest.items())) + f"LOADED-COUNT {len(newest)}\n"


@pytest.mark.parametrize("loaded_up_to, lost", [(45, 0), (30, 15)])
def test_the_application_check_finds_keys_that_did_not_come_back(monkeypatch, loaded_up_to,
                                                                  lost) -> None:
    before = "boot\nLOADED-COUNT 0\n" + _ack_lines(0, 45)
    text = before + "Kernel panic - not syncing: x\n" + _loaded(loaded_up_to)
    monkeypatch.setattr(faults, "console_from", lambda guest, offset: text[offset:])
    recovery = {"resurrection": [{"app": "kvdemo", "records": 20, "rejected": {"crc": 1}}]}
    app = faults._app_outcome(_Console(text), 0, len(before), recovery)
    assert app["restarted"] and app["expected"] and app["acked_writes"] == 45
    assert app["lost_keys"] == min(lost, faults.APP_KEYS), app
    assert app["rejected"] == {"crc": 1} and app["kept_records"] == 20


def test_a_rejuvenation_is_not_expected_to_carry_the_application_data(monkeypatch) -> None:
    before = "LOADED-COUNT 0\n" + _ack_lines(0, 10)
    text = before + "LOADED-COUNT 0\n"
    monkeypatch.setattr(faults, "console_from", lambda guest, offset: text[offset:])
    app = faults._app_outcome(_Console(text), 0, len(before), None)
    assert app["restarted"] and not app["expected"] and app["rejected"] == {}
    s = faults.summarise({"runs": [], "injections": [
        {**row(1, "stack", "silent"), "app": app},
        {**row(2, "hang", "hang", 20.0), "app": {**app, "expected": True, "lost_keys": 0}}]})
    assert (s["app_injections"], s["app_checked"], s["app_all_keys_back"]) == (2, 1, 1)
    assert "not carried (rejuvenation)" in faults._app_cell({"app": app})


def test_a_region_cut_by_the_time_cap_is_not_counted_as_corruption() -> None:
    carried = {"restarted": True, "expected": True, "acked_writes": 9, "loaded": 0,
               "lost": [], "kept_records": 0}
    s = faults.summarise({"runs": [], "injections": [
        {**row(1, "crash", "crash", 1.0),
         "app": {**carried, "lost_keys": 20, "rejected": {"timeout": 1}, "extract_s": 2.1}},
        {**row(2, "crash", "crash", 1.0),
         "app": {**carried, "lost_keys": 0, "rejected": {"crc": 2}, "extract_s": 0.1}},
        {**row(3, "crash", "crash", 1.0), "app": {**carried, "lost_keys": 0}}]})
    assert (s["app_detected_corruption"], s["app_cut_by_caps"]) == (1, 1)
    assert s["app_extract_s"] == {"n": 2, "median": 1.1, "max": 2.1}
    text = faults.markdown({**{"runs": [], "injections": []}, "summary": s})
    assert "cut off by dom0's caps (time or size) after 1" in text
    assert "at most 2.1 s (n=2)" in text


def test_an_application_that_never_restarts_is_said(monkeypatch) -> None:
    monkeypatch.setattr(faults, "console_from", lambda guest, offset: "")
    app = faults._app_outcome(_Console("ACK 1 k000000 x\n"), 0, 0, {})
    assert app == {"restarted": False}
    assert faults._app_cell({"app": app}) == "NOT RESTARTED"


class _SlowGuest:
    """A guest whose console shows the line after *late* waits, growing all along (or
    never growing, with *stuck*)."""

    name = "f-1"

    def __init__(self, late: int, stuck: bool = False) -> None:
        self.late, self.stuck, self.size, self.waits = late, stuck, 100, 0

    def console_size(self) -> int:
        return self.size

    def watch_console(self, patterns: list[str], timeout: float) -> dict:
        self.waits += 1
        if not self.stuck:
            self.size += 10
        if self.waits <= self.late:
            raise faults.LabTimeout(f"no {patterns} within {timeout} s")
        return {}


def test_a_boot_that_keeps_printing_is_waited_for_and_a_silent_one_is_not() -> None:
    slow = _SlowGuest(late=3)
    faults._await_line(slow, "app", quiet_s=1)  # type: ignore[arg-type]
    assert slow.waits == 4
    stuck = _SlowGuest(late=3, stuck=True)
    with pytest.raises(faults.LabTimeout):
        faults._await_line(stuck, "app", quiet_s=1)  # type: ignore[arg-type]


def test_stages_are_the_gaps_between_the_marks_a_timeline_has() -> None:
    since_crash = {"crash_seen": 0.0, "image_chosen": 0.1, "destroyed": 6.7,
                   "restore_started": 6.8, "restore_finished": 21.7, "guest_ack": 23.1,
                   "service_ready": 31.0, "note": "ignored"}
    assert faults.stages(since_crash) == {
        "crash_seen->image_chosen": 0.1, "image_chosen->destroyed": 6.6,
        "destroyed->restore_started": 0.1, "restore_started->restore_finished": 14.9,
        "restore_finished->guest_ack": 1.4, "guest_ack->service_ready": 7.9}
    assert faults.stages({}) == {}


def test_the_report_says_where_each_outcomes_recovery_time_went() -> None:
    rows = [row(1, "crash", "crash", 0.5), row(2, "crash", "crash", 0.4),
            row(3, "text", "silent"), row(4, "stack", "crash", 0.3)]
    rows[0]["stages_s"] = {"crash_seen->destroyed": 6.0, "destroyed->service_ready": 20.0}
    rows[1]["stages_s"] = {"crash_seen->destroyed": 8.0, "destroyed->service_ready": 30.0}
    rows[2]["stages_s"] = {"crash_seen->restore_started": 1.0}
    rows[3]["guest_memory_mib"] = 1740
    rows[3]["stages_s"] = {"crash_seen->destroyed": 7.5}
    report = {"runs": [{"started": "t", "command": "c", "injections": 4,
                        "guest_memory_mib": 192, "checks": CHECKS}], "injections": rows}
    summary = faults.summarise(report)
    assert summary["stages_s"]["crash"]["192"] == {"crash_seen->destroyed": 7.0,
                                                   "destroyed->service_ready": 25.0, "n": 2}
    assert summary["stages_s"]["crash"]["1740"]["crash_seen->destroyed"] == 7.5
    assert summary["stages_s"]["silent"]["192"]["crash_seen->restore_started"] == 1.0
    report["summary"] = summary
    text = faults.markdown(report)
    assert "## Where a recovery's time goes" in text
    assert "| 192 | 2 | 7.0 | 25.0 |" in text and "| 1740 | 1 | 7.5 |  |" in text
    rows_without = [row(1, "crash", "crash", 0.5)]  # older runs recorded no stages
    report = {"runs": report["runs"], "injections": rows_without}
    report["summary"] = faults.summarise(report)
    assert "Where a recovery's time goes" not in faults.markdown(report)


def _after(bytes_state: str, reach: dict | None = None) -> dict:
    return {"bytes": bytes_state, "now": "01", "reach": reach}


def _counting(hits: int) -> dict:
    return {"id": 1, "address": "0xffffffff81000001", "state": "counting", "hits": hits,
            "reason": None, "stale": False}


@pytest.mark.parametrize("kind, after, said, why", [
    ("text", _after("in-place", _counting(0)), [], "never ran"),
    ("operand", _after("in-place", _counting(9)), [], "ran, without visible effect"),
    ("text", _after("in-place", {"state": "not-counted", "reason": "ftrace"}), [],
     "still in place"),
    ("stack", _after("overwritten"), [], "overwritten before they mattered"),
    ("stack", _after("in-place"), [], "still in place"),
    ("stack", _after("original"), [], "original bytes back"),
    ("stack", None, [], "not examined"),
    ("lkdtm:WARNING", None, [], "not examined"),  # its record has no after_window
    ("stack", {"bytes": None, "now": None, "reach": None, "error": "exit 1"}, [],
     "the check failed"),
    ("text", _after("in-place", _counting(0)), ["WARNING: at f+0x1"], "printed a warning"),
])
def test_each_silent_fault_is_explained_by_what_its_record_shows(kind, after, said,
                                                                 why) -> None:
    silent = {**row(1, kind, "silent"), "after_window": after, "kernel_said": said}
    if kind.startswith("lkdtm:"):
        silent["provoked"] = {"id": 1, "type": "WARNING", "taken": "returned"}
    assert why in faults.why_silent(silent)


def test_the_report_says_why_silent_faults_showed_nothing() -> None:
    rows = [{**row(1, "text", "silent"), "after_window": _after("in-place", _counting(0))},
            {**row(2, "text", "silent"), "after_window": _after("in-place", _counting(0))},
            {**row(3, "operand", "silent"), "after_window": _after("in-place", _counting(3))},
            {**row(4, "stack", "silent"), "after_window": _after("overwritten")},
            row(5, "stack", "crash", 0.3)]
    report = {"runs": [{"started": "t", "command": "c", "injections": 5,
                        "guest_memory_mib": 192, "checks": {"f-1": CHECKS}}],
              "injections": rows}
    report["summary"] = faults.summarise(report)
    assert report["summary"]["silent_why"] == {
        "operand": {"the altered instruction ran, without visible effect": 1},
        "stack": {"the altered bytes were overwritten before they mattered": 1},
        "text": {"the altered instruction never ran": 2}}
    text = faults.markdown(report)
    assert "## Why silent faults showed nothing" in text
    assert "| text | the altered instruction never ran | 2 |" in text
    assert "ran, without visible effect (3 times) |" in text  # the injection's own row


def test_each_run_says_what_its_reach_counter_check_counted() -> None:
    run = {"started": "t", "command": "c", "injections": 0, "guest_memory_mib": 192,
           "checks": {}, "reach_check": {
               "f-1": {"symbol": "vfs_write", "seconds": 5.0, "state": "counting",
                       "hits": 812, "reason": None},
               "f-2": {"symbol": "vfs_write", "seconds": 5.0, "state": "refused",
                       "hits": None, "reason": "no-tracefs"}}}
    report = {"runs": [run], "injections": []}
    report["summary"] = faults.summarise(report)
    line = faults.markdown(report).split("## Runs")[1]
    assert "f-1 vfs_write 812 runs in 5 s, f-2 refused (no-tracefs)" in line
