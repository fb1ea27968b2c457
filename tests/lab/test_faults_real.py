"""Fault injection on real Xen (docs/faults.md; ``make faults`` runs the full campaign).

The suite (and so CI) runs a named subset: ``CI_COUNT`` injections, the memory kinds in
turn (stack, text, operand, hang; crashes are every other lab test's), each classified,
recovered and followed by the writer's service check and the key-value application's
data check (every key back after a crash or a hang), then the disk checks. ``make faults`` adds to the committed
report (docs/faults/report.json). The refusals run against a plain registered guest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from xenpbr_lab import faults
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.errors import CommandFailed
from xenpbr_lab.host import XenHost
from xenpbr_lab.xl import LabDomain

REPORT = Path(__file__).resolve().parents[2] / "build" / "faults-ci.json"
CI_KINDS = ("stack", "text", "operand", "hang")
CI_COUNT = int(os.environ.get("XENPBR_FAULTS_COUNT", "4"))


@pytest.mark.timeout(3600)  # 4 injections of about 1 min each (up to 5x), a boot, fsck
def test_a_mixed_campaign_brings_the_guest_back_every_time(
        xen_host: XenHost, session_artifacts: Path) -> None:
    REPORT.unlink(missing_ok=True)
    report = faults.run_campaign(xen_host, CI_COUNT, CI_KINDS, report_path=REPORT,
                                 command="pytest tests/lab/test_faults_real.py",
                                 progress=print, evidence=session_artifacts / "faults")
    rows = report["injections"]
    assert [r["kind"] for r in rows] == [CI_KINDS[i % 4] for i in range(CI_COUNT)]
    assert all(r["service_back"] for r in rows), rows
    for row in rows:
        if row["kind"] == "crash":
            assert row["change"] is None and row["outcome"] == "crash", row
            continue
        change = row["change"]
        assert change["old"] != change["new"] and change["address"].startswith("0xffff")
        assert "+0x" in change["symbol"] and row["paused_s"] > 0
    assert all(r["app"]["restarted"] for r in rows), rows
    for row in rows:  # after each crash or hang, every key of the application is back
        if row["outcome"] != "silent":
            assert row["app"]["expected"] and row["app"]["lost_keys"] == 0, row
            assert row["app"]["acked_writes"] > 0 and row["app"]["kept_records"] > 0, row
    hang = next(r for r in rows if r["kind"] == "hang")
    assert hang["outcome"] == "hang" and hang["recovered_by"] == "phase:app", hang
    assert 0 < hang["detected_s"] < 10 * faults.WATCHDOG_S
    checks = report["runs"][-1]["checks"]["f-1"]
    assert checks["lost_records"] == 0 and checks["duplicate_records"] == 0, checks
    assert checks["fsck_root_clean"] and checks["fsck_data_clean"], checks
    assert checks["acked_records"] > CI_COUNT


@pytest.mark.timeout(1800)  # a boot, one hang (15 s to notice), a recovery, fsck
def test_a_hang_without_a_watchdog_is_caught_by_the_liveness_check(
        xen_host: XenHost, session_artifacts: Path) -> None:
    """No xen_wdt in this guest: only xenpbrd's liveness check on the agent's heartbeat
    can notice the hang; it shuts the domain down with reason watchdog."""
    report = faults.run_campaign(xen_host, 1, ["hang"], liveness=True,
                                 command="pytest tests/lab/test_faults_real.py",
                                 progress=print, evidence=session_artifacts / "liveness")
    (row,) = report["injections"]
    assert row["outcome"] == "hang" and row["recovered_by"] == "phase:app", row
    assert row["service_back"], row
    # the clock starts at the last heartbeat, which may precede the injection by up to
    # one beat (1 s), and xenpbrd judges once a second
    assert faults.LIVENESS_TIMEOUT_S - 2 < row["detected_s"] < 10 * faults.LIVENESS_TIMEOUT_S
    log_text = (session_artifacts / "liveness" / "xenpbrd.log").read_text()
    assert "no heartbeat for" in log_text and "a hang; shutting it down" in log_text
    checks = report["runs"][-1]["checks"]["f-1"]
    assert checks["lost_records"] == 0 and checks["fsck_data_clean"], checks


def _refused(xen_host: XenHost, *args: str) -> str:
    with pytest.raises(CommandFailed) as exc:
        xenpbrd_lab.cli(xen_host, "inject", *args)
    return str(exc.value)


def test_injections_that_must_not_happen_are_refused_and_change_nothing(
        xen_host: XenHost, lab_domain: Callable[..., LabDomain], xenpbrd: None) -> None:
    guest = lab_domain("fr", mode="count", on_crash="phasereboot")
    guest.write_config()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    guest.wait_for_console(r"XENPBR-GUEST: text", timeout=300)
    # a map whose linux_banner is really kernel code: not this kernel's map
    xen_host.put("/run/wrong.map", (b"ffffffff81000000 T _stext\n"
                                    b"ffffffff81000100 T some_function\n"
                                    b"ffffffff81e00000 T _etext\n"
                                    b"ffffffff81000000 D linux_banner\n"))
    said = _refused(xen_host, guest.name, "--fault", "hang", "--system-map", "/run/wrong.map")
    assert "not the running kernel's" in said, said
    entry = guest.entry()
    assert entry is not None and "p" not in entry.state  # unpaused again
    said = _refused(xen_host, guest.name, "--fault", "stack")  # Debian's placeholder map
    assert "/proc/kallsyms" in said, said
    assert "is not registered" in _refused(xen_host, "Domain-0", "--fault", "stack")
    xen_host.run(["xl", "destroy", guest.name])
    said = _refused(xen_host, guest.name, "--fault", "text", "--system-map", "/run/wrong.map")
    assert "is not running" in said, said
    assert xenpbrd_lab.cli(xen_host, "history", guest.name) == []  # nothing happened
