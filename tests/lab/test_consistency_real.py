"""The disk-consistency proof on real Xen (docs/consistency.md; ``make consistency``).

One guest runs from an ext4 root disk (``snapshot``) with an ext4 data disk
(``persistent``), and is crashed and recovered by phase-based reboot while a writer
appends acknowledged records to the data disk. A second guest places a non-O_APPEND
logger inside an image and must be refused, naming it.

The suite (and so CI) runs a named subset of the proof, ``CI_CYCLES`` crashes, to keep
the suite inside its budget on slow machines; ``make consistency`` runs all
``consistency.CYCLES`` (20) and its report is committed (docs/consistency-report.json).
Set ``XENPBR_CONSISTENCY_CYCLES`` to run more here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.lab.xen_real import assert_disks_consistent
from xenpbr_lab import consistency
from xenpbr_lab.host import XenHost

REPORT = Path(__file__).resolve().parents[2] / "build" / "consistency-report-ci.json"
CI_CYCLES = int(os.environ.get("XENPBR_CONSISTENCY_CYCLES", "2"))


@pytest.mark.timeout(1800)  # 2 cycles of about 15 s (up to 5x that), two boots, fsck
def test_crashes_lose_no_acknowledged_record_and_leave_clean_disks(
        xen_host: XenHost, session_artifacts: Path) -> None:
    cycles = CI_CYCLES
    report = consistency.run_proof(xen_host, cycles, print,
                                   session_artifacts / "consistency")
    report["command"] = "pytest tests/lab/test_consistency_real.py"
    consistency.write_report(report, REPORT)
    assert_disks_consistent(report, cycles)
    refused = report["hazard_refused"]
    assert refused is not None and "(lablogger)" in refused and "/data/logger.log" in refused
    assert report["disk_timings"]["copy"]["revert_s"]["runs"] == cycles
