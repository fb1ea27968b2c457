"""The disk-consistency proof of docs/consistency.md, on real Xen (``make consistency``).

A guest runs from an ext4 root disk (policy ``snapshot``) and has an ext4 data disk
(``persistent``). Its phases are kernel, services and app; after the last one the agent
mounts the data disk and starts two programs (:mod:`xenpbr_lab.disk_workload`): a writer
that appends records, ``fsync``s each and only then prints ``acked N``, and a logger that
writes without ``O_APPEND`` (legal there: it is started after the restore point).

The proof:

1. **hazard**: a first guest starts the logger *inside* the app phase, with the data
   disk mounted; dom0 must refuse that boundary and name the logger and its file;
2. **cycles**: the main guest is crashed ``cycles`` times; every time it must come back by
   phase-based reboot from the app image (root disk reverted to the app snapshot), the
   writer must resume after the highest record on the data disk, and the logger must run;
3. **verdict**: the guest is stopped cleanly (``sysrq s``, ``u``), then ``e2fsck -n -f`` must
   pass on both disks, and every record the writer acknowledged must be on the data disk.

The report (``build/consistency-report.json``) has ``cycles``, ``acked_records``,
``lost_records``, ``fsck_root_clean``, ``fsck_data_clean``, ``hazard_refused`` and the
snapshot and revert timings per mechanism, as measured by xenpbrd.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import disks, xenpbrd
from .xl import LabDomain

if TYPE_CHECKING:
    from .host import XenHost

log = logging.getLogger(__name__)

CYCLES = 20
MEMORY_MIB = 192
PANIC = r"Kernel panic - not syncing"
LAST_BOUNDARY = r"XENPBR-AGENT: app \S+ rc="
WRITER_START = r"XENPBR-WRITER: start after \d+"
ACKED = re.compile(r"XENPBR-WRITER: acked (\d+)")
LOGGER = r"XENPBR-LOGGER: wrote \d+"
REFUSAL = re.compile(r"boundary app refused \((\S+)\): (.*)")
RECORD = re.compile(r"^rec (\d+) ", re.M)
REVERTED = re.compile(r"disk (\S+) \(\S+\) of \S+ reverted to image \S+ by (\S+) in ([\d.]+) s")


def _guest(host: XenHost, name: str, hazard: str, live_capture: bool = False,
           standby: bool = False) -> LabDomain:
    """The proof's guest; with ``live_capture`` xenpbrd captures it while it runs
    (``xenpbr_live_capture = 1``: the disk snapshots move into the live copy's last
    suspension, which the same checks then judge); with ``standby`` each crash is taken
    over by a standby domain (``xenpbr_standby = 1``: the root disk is reverted under
    the standby's attached backend)."""
    made = disks.make_disks(host, name)
    live = {"xenpbr_live_capture": 1} if live_capture else {}
    if standby:
        live["xenpbr_standby"] = 1
    return LabDomain(host, name, memory_mib=MEMORY_MIB, mode="consist",
                     on_crash="phasereboot", extra=f"lab.root=/dev/xvda lab.hazard={hazard}",
                     disk=made.specs, xenpbr_disks=["xvda=snapshot", "xvdb=persistent"],
                     # crashed again seconds after each recovery, on purpose: the guard
                     # would rightly answer with earlier phases, so it looks 1 s back,
                     # and a restore that reported ready is healthy at once (these
                     # crashes are the proof's, not the image's: never abandon it)
                     xenpbr_crash_loop_window=1, xenpbr_healthy_after=0,
                     xenpbr_image_failures=100, **live)


def _create(host: XenHost, guest: LabDomain) -> None:
    guest.write_config()
    xenpbrd.cli(host, "create", guest.config_path)


def hazard_refusal(host: XenHost, live_capture: bool = False) -> str | None:
    """Boot a guest whose app phase starts the logger on the mounted data disk; return
    dom0's refusal as the guest's agent logged it (None if the boundary was accepted)."""
    guest = _guest(host, "c-hazard", "candidate", live_capture)
    _create(host, guest)
    try:
        guest.watch_console([LAST_BOUNDARY], timeout=600)
        console = guest.console()
    finally:
        guest.destroy()
        xenpbrd.cli(host, "forget", guest.name)  # dom0's RAM holds the store: make room
        xenpbrd.cli(host, "gc")
        host.run(f"rm -f {disks.DISK_DIR}/{guest.name}-*", check=False)
    match = REFUSAL.search(console)
    if match is None:
        return None
    if match.group(1) != "hazard":  # refused, but not for the logger: say so
        log.error("the hazard guest's app boundary was refused for %s, not the logger: %s",
                  match.group(1), match.group(2))
        return None
    return match.group(2).strip()


def _cycle(host: XenHost, guest: LabDomain, n: int, standby: bool = False) -> dict[str, Any]:
    """Crash the guest once (with ``standby``, once its n-th standby is ready); wait until
    its writer and logger run again."""
    if standby:
        xenpbrd.wait_for_standby(host, guest.name, n)
    watched = guest.watch_console([PANIC, WRITER_START, LOGGER], after=guest.console_size(),
                                  timeout=600, trigger=f"xl sysrq {guest.name} c")
    history = xenpbrd.cli(host, "history", guest.name)
    time.sleep(1.0)  # let the writer acknowledge a few records before the next crash
    return {"cycle": n, "method": history[-1].get("method") if history else None,
            "writer_back_s": round(watched["found"][WRITER_START]["t"] - watched["t0"], 3)}


def _stop_cleanly(host: XenHost, guest: LabDomain) -> None:
    """Sync and remount every file system read-only in the guest, then destroy it: the
    disks are then as a clean shutdown leaves them."""
    sysrq = f"xl sysrq {guest.name}"  # 9 first: "quiet" hides the kernel's replies
    guest.watch_console([r"Emergency Sync complete", r"Emergency Remount complete"],
                        after=guest.console_size(), timeout=120,
                        trigger=f"{sysrq} 9; {sysrq} s; sleep 1; {sysrq} u")
    guest.destroy()


def _timings(log_text: str, images: list[dict[str, Any]]) -> dict[str, Any]:
    """Snapshot and revert seconds per mechanism, from xenpbrd's images and log."""
    out: dict[str, dict[str, list[float]]] = {}
    for img in images:
        mechanisms = img.get("disk_mechanisms") or {}
        if isinstance(mechanisms, str):  # an older xenpbr: "xvda=reflink,xvdc=copy"
            mechanisms = dict(i.partition("=")[::2] for i in mechanisms.split(",") if i)
        for mech in mechanisms.values():
            if img.get("disks_s") is not None:
                out.setdefault(mech, {"snapshot_s": [], "revert_s": []})["snapshot_s"].append(
                    img["disks_s"])
    for _, mech, seconds in REVERTED.findall(log_text):
        out.setdefault(mech, {"snapshot_s": [], "revert_s": []})["revert_s"].append(
            float(seconds))
    return {mech: {key: {"runs": len(v), "median": round(statistics.median(v), 3),
                         "min": min(v), "max": max(v)} if v else None
                   for key, v in kinds.items()} for mech, kinds in out.items()}


def run_proof(host: XenHost, cycles: int = CYCLES,
              progress: Callable[[str], None] = lambda line: None,
              evidence: Path | None = None, live_capture: bool = False,
              standby: bool = False) -> dict[str, Any]:
    """Run the whole proof in a booted lab; return the report. ``live_capture``: the
    guests' phases are captured live (needs a hypervisor with shadow paging);
    ``standby``: each crash is taken over by a standby domain."""
    xenpbrd.start(host)
    guest: LabDomain | None = None
    try:
        refused = hazard_refusal(host, live_capture)
        progress(f"hazard inside the app phase: {'refused: ' + refused if refused else 'ACCEPTED'}")
        guest = _guest(host, "c-main", "after", live_capture, standby)
        _create(host, guest)
        guest.watch_console([LAST_BOUNDARY, WRITER_START, LOGGER], timeout=600)
        images = xenpbrd.cli(host, "images", guest.name)
        recoveries = []
        for n in range(1, cycles + 1):
            recoveries.append(_cycle(host, guest, n, standby))
            progress(f"cycle {n}/{cycles}: recovered via {recoveries[-1]['method']}, writer "
                     f"back after {recoveries[-1]['writer_back_s']:.2f} s")
        console = guest.console()
        _stop_cleanly(host, guest)
        report = _verdict(host, guest, console, refused, recoveries, images)
    finally:
        if guest is not None:
            if evidence is not None:
                evidence.mkdir(parents=True, exist_ok=True)
                (evidence / "c-main.console.log").write_text(guest.console())
            guest.destroy()
        log_text = xenpbrd.stop(host)
        if evidence is not None:
            (evidence / "xenpbrd.log").write_text(log_text)
        host.run(f"rm -rf {xenpbrd.STATE} {disks.DISK_DIR}/c-*", check=False)
    report["disk_timings"] = _timings(log_text, images)
    return report


def _verdict(host: XenHost, guest: LabDomain, console: str, refused: str | None,
             recoveries: list[dict[str, Any]], images: list[dict[str, Any]]) -> dict[str, Any]:
    root, data = (f"{disks.DISK_DIR}/{guest.name}-{kind}.img" for kind in ("root", "data"))
    root_clean, root_said = disks.fsck(host, root)
    data_clean, data_said = disks.fsck(host, data)
    acked = {int(n) for n in ACKED.findall(console)}
    on_disk = [int(n) for n in RECORD.findall(disks.read_file(host, data, "/records"))]
    logger_after_restore = len(re.findall(LOGGER, console.rsplit("restored:", 1)[-1])) > 0
    return {
        "cycles": len(recoveries),
        "recovered_by_phase_app": sum(r["method"] == "phase:app" for r in recoveries),
        "acked_records": len(acked),
        "lost_records": len(acked - set(on_disk)),
        "duplicate_records": len(on_disk) - len(set(on_disk)),
        "records_on_disk": len(on_disk),
        "fsck_root_clean": root_clean,
        "fsck_data_clean": data_clean,
        "fsck_root": root_said.splitlines()[-2:],
        "fsck_data": data_said.splitlines()[-2:],
        "hazard_refused": refused,
        "logger_after_restore_works": logger_after_restore,
        "recoveries": recoveries,
        "images": [{k: img.get(k) for k in ("phase", "capture_s", "paused_s", "disks_s",
                                            "disk_mechanisms")} for img in images],
    }


def write_report(report: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
