"""Standby domains on real Xen (``xenpbr_standby = 1``, :mod:`xenpbr.images.standby`).

xenpbrd restores the newest image paused beside the running guest as ``NAME--standby``;
a crash is recovered by setting the crashed domain aside, renaming the standby and
unpausing it, then destroying the crashed domain. Checked here: the standby exists
paused with the guest's UUID, two crashes in a row are each recovered by a standby (a
new one is prepared after each), xl's monitor reboots the renamed guest under its own
name, and the standby goes with the guest; with disks (long), the consistency proof.
The downtime against a restore is measured by ``make bench``
(``phasereboot-standby``).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.lab.test_phasereboot_real import (
    crash_and_wait_restored,
    protected_guest,
    wait_for_history,
)
from tests.lab.xen_real import agent_verdicts, assert_disks_consistent
from xenpbr_lab import consistency
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.host import XenHost

TAKES_OVER = r"{name}: standby of image \S+ takes over \(domid [0-9]+\)"


def xl_row(xen_host: XenHost, name: str) -> list[str] | None:
    """``xl list NAME``'s row split in fields, None if there is no such domain."""
    out = xen_host.run(["xl", "list", name], check=False)
    rows = out.stdout.splitlines()[1:] if out.rc == 0 else []
    return rows[0].split() if rows else None


def uuid_of(xen_host: XenHost, name: str) -> str:
    """The domain's UUID, from ``xl list -l``'s JSON."""
    listed = json.loads(xen_host.run(["xl", "list", "-l", name]).stdout)
    return str(listed[0]["config"]["c_info"]["uuid"])


@pytest.mark.timeout(900)  # a protected boot, two recoveries and a guest reboot under TCG
def test_a_standby_takes_over_each_crash_and_leaves_with_its_guest(
        xen_host, lab_domain, xenpbrd) -> None:
    # crashed again seconds after its recovery on purpose: the crash-loop guard, which
    # would (rightly) pick an earlier phase, only looks one second back here
    guest = protected_guest(xen_host, lab_domain, "sby", phases="kernel,app",
                            xenpbr_standby=1, xenpbr_crash_loop_window=1,
                            xenpbr_healthy_after=0)
    name = guest.name
    try:
        xenpbrd_lab.wait_for_standby(xen_host, name)
        # the rename on the path to service goes through libxl in xenpbrd's process
        assert "libxl not opened in xenpbrd" not in xenpbrd_lab.log_text(xen_host)
        row = xl_row(xen_host, f"{name}--standby")
        assert row is not None and "p" in row[4], row  # restored paused, never ran
        assert uuid_of(xen_host, f"{name}--standby") == uuid_of(xen_host, name)

        for crash in (1, 2):
            standby_domid = int(xl_row(xen_host, f"{name}--standby")[1])  # type: ignore[index]
            phase, verdict, took = crash_and_wait_restored(xen_host, guest)
            assert (phase, verdict) == ("app", f"restored:{crash}")
            assert guest.domid == standby_domid  # the standby itself, renamed
            xenpbrd_lab.wait_for_log(xen_host, TAKES_OVER.format(name=name), count=crash)
            history = wait_for_history(xen_host, name, lambda h, n=crash: len(h) >= n and
                                       "service_ready" in h[-1]["since_crash"])
            marks = history[-1]["since_crash"]
            # no snapshot disk: the crashed domain was set aside, destroyed after
            destroyed = next(m for m in history[-1]["marks"] if m["name"] == "destroyed")
            assert destroyed["detail"] == (f"set aside as {name}--crashed (a standby takes "
                                           "over), destroyed once the guest reports ready")
            xenpbrd_lab.wait_for_log(xen_host, xenpbrd_lab.ASIDE_DESTROYED.format(name=name),
                                     count=crash)
            assert xl_row(xen_host, f"{name}--crashed") is None
            print(f"crash {crash}: agent saw 'restored' {took:.2f} s after the crash "
                  f"(host clock); restore step "
                  f"{marks['restore_finished'] - marks['restore_started']:.2f} s; {marks}")
            # the next standby, for the next crash
            xenpbrd_lab.wait_for_standby(xen_host, name, crash + 1)

        # xl's monitor follows the rename: the guest's own reboot keeps its name
        offset = guest.console_size()
        xen_host.run(["xl", "sysrq", name, "b"])
        rebooted = agent_verdicts(guest, 2, after=offset)
        assert [(p, v) for p, v, _ in rebooted] == [("kernel", "skipped"),
                                                    ("app", "skipped")], rebooted
        assert xl_row(xen_host, name) is not None
    finally:
        xen_host.run(["xl", "destroy", name], check=False)
    # the guest is gone, so is its standby (xenpbrd discards it)
    deadline = time.monotonic() + 120
    while xl_row(xen_host, f"{name}--standby") is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = xl_row(xen_host, f"{name}--standby")
    xen_host.run(["xl", "destroy", f"{name}--standby"], check=False)
    assert leftover is None, "the standby outlived its guest"


@pytest.mark.long  # make test-long: CI runs the diskless case above and the plain proof
@pytest.mark.timeout(3600)  # two guests' boots, 2 crashes, fsck (5x margin under TCG)
def test_with_a_standby_the_disks_stay_consistent(xen_host, session_artifacts: Path) -> None:
    """The consistency proof (docs/consistency.md) with xenpbr_standby = 1: each crash is
    taken over by a standby whose backends were attached to the disks while the guest
    ran on them; its root disk is reverted in place under them. After each crash no
    acknowledged record is lost and both disks are clean."""
    evidence = session_artifacts / "standby-consistency"
    report = consistency.run_proof(xen_host, 2, print, evidence, standby=True)
    assert_disks_consistent(report, 2)
    log_text = (evidence / "xenpbrd.log").read_text()
    taken = re.findall(r"c-main: standby of image \S+ takes over", log_text)
    assert len(taken) == 2, log_text[-4000:]
    print("\nSTANDBY-CONSISTENCY-LAB " + json.dumps(
        {k: report[k] for k in ("acked_records", "lost_records", "disk_timings")}, indent=1))
