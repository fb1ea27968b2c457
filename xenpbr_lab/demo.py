"""``make demo``: boot real Xen, run a guest, crash it, show how it came back and how fast.

At this stage of the project the recovery is Xen's normal one (``on_crash = "restart"``:
the guest reboots from scratch); phase-based reboot replaces it in a later issue and the
demo will then show both side by side. Times of guest events are taken inside dom0 (see
:mod:`xenpbr_lab.console_watch`), so they do not include control-channel latency.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .build import LabImages, build
from .host import XenHost
from .paths import artifacts_root
from .xl import LabDomain

log = logging.getLogger(__name__)

UP = r"XENPBR-GUEST: up uptime="
READY = r"XENPBR-GUEST: service ready"
PANIC = r"Kernel panic - not syncing"


@dataclass
class DemoReport:
    """What the demo measured, in seconds (wall time, or dom0's clock for guest events)."""

    xen_version: str = ""
    lab_build_s: float = 0.0
    qemu_to_dom0_ready_s: float = 0.0
    guest_create_to_ready_s: float = 0.0
    recovery_method: str = "normal reboot (on_crash = \"restart\")"
    crash_to_panic_s: float = 0.0
    crash_to_guest_booting_s: float = 0.0
    normal_reboot_s: float = 0.0
    recovered: bool = False
    old_domid: int = -1
    new_domid: int = -1
    notes: list[str] = field(default_factory=list)


def _crash_and_recover(host: XenHost, guest: LabDomain, report: DemoReport) -> None:
    report.old_domid = guest.domid
    offset = guest.console_size()
    watched = guest.watch_console([PANIC, UP, READY], after=offset, timeout=180,
                                  trigger=f"xl sysrq {guest.name} c")
    t0, found = watched["t0"], watched["found"]
    report.crash_to_panic_s = round(found[PANIC]["t"] - t0, 2)
    report.crash_to_guest_booting_s = round(found[UP]["t"] - t0, 2)
    report.normal_reboot_s = round(found[READY]["t"] - t0, 2)
    report.new_domid = guest.domid
    report.recovered = report.new_domid != report.old_domid


def run_demo(images: LabImages | None = None, build_seconds: float = 0.0) -> DemoReport:
    """Run the whole demo and return what it measured."""
    report = DemoReport(lab_build_s=round(build_seconds, 2))
    if images is None:
        start = time.monotonic()
        images = build()
        report.lab_build_s = round(time.monotonic() - start, 2)
    workdir = artifacts_root() / time.strftime("demo-%Y%m%d-%H%M%S")
    with XenHost(images, workdir) as host:
        try:
            report.qemu_to_dom0_ready_s = round(host.boot_seconds or 0.0, 2)
            info = host.run("xl info | grep -E '^xen_(major|minor|extra)'").stdout.split()
            report.xen_version = f"{info[2]}.{info[5]}{info[8]}"
            guest = LabDomain(host, "demo", mode="service", on_crash="restart")
            start = time.monotonic()
            guest.create()
            guest.watch_console([READY], timeout=180)
            report.guest_create_to_ready_s = round(time.monotonic() - start, 2)
            _crash_and_recover(host, guest, report)
        except Exception:
            host.collect_artifacts(workdir / "failure")
            raise
    return report


def render(report: DemoReport) -> str:
    """The demo's result as a readable table."""
    rows = [
        ("Xen version", report.xen_version),
        ("lab build (cached after the first run)", f"{report.lab_build_s:.1f} s"),
        ("QEMU start -> dom0 ready", f"{report.qemu_to_dom0_ready_s:.1f} s"),
        ("guest create -> service ready", f"{report.guest_create_to_ready_s:.1f} s"),
        ("recovery method", report.recovery_method),
        ("crash -> kernel panic on console", f"{report.crash_to_panic_s:.2f} s"),
        ("crash -> guest kernel booting again", f"{report.crash_to_guest_booting_s:.2f} s"),
        ("crash -> service ready again (downtime)", f"{report.normal_reboot_s:.2f} s"),
        ("recovered", f"{report.recovered} (domid {report.old_domid} -> {report.new_domid})"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["xenpbr lab demo: a PV guest crashes on real Xen and is recovered", ""]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    lines += ["", "Times are under QEMU TCG (software emulation), roughly 10x slower than "
              "native; compare ratios, not absolutes."]
    return "\n".join(lines)


def write_report(report: DemoReport, path: Path) -> None:
    """Write the report as JSON (for automation and later comparison)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
