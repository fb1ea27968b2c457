"""Fault injection on real Xen (docs/faults.md; ``make faults`` runs the full campaign).

The suite (and so CI) runs a named subset: ``CI_COUNT`` injections, the kinds in turn
(stack, operand, hang, lkdtm:BUG: a bit of a kernel stack, an instruction operand found
by Capstone, a kernel that stops, and LKDTM's BUG() provoked by the guest's agent at
dom0's request; ``text``, a byte of an instruction found the same way, and LKDTM's other
types are left to ``make faults``, and crashes are every other lab test's) into a guest
whose hangs only
xenpbrd's liveness check can notice, each classified, recovered and followed by the
writer's service check and the key-value application's data check (every key back after
a crash or a hang), then the disk checks. ``make faults`` adds to the committed report
(docs/faults/report.json). The refusals run against a plain registered guest.
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
CI_KINDS = ("stack", "operand", "hang", "lkdtm:BUG")
CI_COUNT = int(os.environ.get("XENPBR_FAULTS_COUNT", "4"))


@pytest.mark.timeout(3600)  # 4 injections of about 1 min each (up to 5x), a boot, fsck
def test_a_mixed_campaign_brings_the_guest_back_every_time(
        xen_host: XenHost, session_artifacts: Path) -> None:
    """The guest has no watchdog (no xen_wdt): only xenpbrd's liveness check on the
    agent's heartbeat can notice the hang, and shuts the domain down with reason
    watchdog. Xen's own watchdog is the campaign's default (``make faults``) and CI
    proves its recovery in test_phasereboot_real's expired-watchdog test."""
    REPORT.unlink(missing_ok=True)
    evidence = session_artifacts / "faults"
    report = faults.run_campaign(xen_host, CI_COUNT, CI_KINDS, liveness=True,
                                 report_path=REPORT,
                                 command="pytest tests/lab/test_faults_real.py",
                                 progress=print, evidence=evidence)
    rows = report["injections"]
    assert [r["kind"] for r in rows] == [CI_KINDS[i % len(CI_KINDS)] for i in range(CI_COUNT)]
    assert all(r["service_back"] for r in rows), rows
    for row in rows:
        if row["kind"].startswith(faults.LKDTM_PREFIX):
            continue
        change = row["change"]
        assert change["old"] != change["new"] and change["address"].startswith("0xffff")
        assert "+0x" in change["symbol"] and row["paused_s"] > 0
    bug = next(r for r in rows if r["kind"] == "lkdtm:BUG")  # BUG() in the guest: oops=panic
    assert bug["provoked"]["taken"] == "started" and bug["change"] is None, bug
    assert bug["outcome"] == "crash" and bug["recovered_by"] == "phase:app", bug
    assert any("kernel BUG at" in said or "BUG:" in said for said in bug["kernel_said"]), bug
    assert all(r["app"]["restarted"] for r in rows), rows
    # the guest's reach-counter counts on this kernel: a function it runs all the time ...
    counted = report["runs"][-1]["reach_check"]
    assert all(c["state"] == "counting" and c["hits"] > 0 for c in counted.values()), counted
    # ... and counted the operand fault's instruction (or the kernel said why not)
    operand = next(r for r in rows if r["kind"] == "operand")
    assert operand["reach"]["state"] in ("counting", "refused"), operand
    for row in rows:  # a silent fault's bytes were looked at before the rejuvenation
        if row["outcome"] == "silent" and row["change"]:
            assert row["after_window"]["bytes"] in ("in-place", "original", "overwritten"), row
            assert faults.why_silent(row) != faults.NOT_EXAMINED, row
    for row in rows:  # after each crash or hang, every key of the application is back
        if row["outcome"] != "silent":
            assert row["app"]["expected"] and row["app"]["lost_keys"] == 0, row
            assert row["app"]["acked_writes"] > 0 and row["app"]["kept_records"] > 0, row
    hang = next(r for r in rows if r["kind"] == "hang")
    assert hang["outcome"] == "hang" and hang["recovered_by"] == "phase:app", hang
    # the clock starts at the last heartbeat, which may precede the injection by up to
    # one beat (1 s), and xenpbrd judges once a second
    assert faults.LIVENESS_TIMEOUT_S - 2 < hang["detected_s"] < 10 * faults.LIVENESS_TIMEOUT_S
    log_text = (evidence / "xenpbrd.log").read_text()
    assert "no heartbeat for" in log_text and "a hang; shutting it down" in log_text
    checks = report["runs"][-1]["checks"]["f-1"]
    assert checks["lost_records"] == 0 and checks["duplicate_records"] == 0, checks
    assert checks["fsck_root_clean"] and checks["fsck_data_clean"], checks
    assert checks["acked_records"] > CI_COUNT


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
    said = _refused(xen_host, guest.name, "--fault", "lkdtm:BUG")  # no provoke-listener
    assert "offers no provoked faults" in said, said
    assert xen_host.run(["xenstore-exists", f"/local/domain/{guest.domid}/control/xenpbr/"
                         "provoke"], check=False).rc != 0  # nothing was requested
    assert "is not registered" in _refused(xen_host, "Domain-0", "--fault", "stack")
    xen_host.run(["xl", "destroy", guest.name])
    said = _refused(xen_host, guest.name, "--fault", "text", "--system-map", "/run/wrong.map")
    assert "is not running" in said, said
    assert xenpbrd_lab.cli(xen_host, "history", guest.name) == []  # nothing happened
