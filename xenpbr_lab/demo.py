"""``make demo``: a guest's kernel crashes on real Xen; xenpbr brings it back from its
application-phase image. The same guest is then recovered by a normal reboot
(``on_crash = "restart"``) in the same run, and the demo prints both downtimes.

The guest boots in three phases (kernel; system services; an application whose warm-up
builds an index, :mod:`xenpbr_lab.demo_app`) marked by the guest agent. Downtime is from
the crash (``xl sysrq DOMAIN c``) to the application answering again (its first heartbeat
after the panic), timed inside dom0 (:mod:`xenpbr_lab.console_watch`).

The crash comes only once the app image is fully ready, its hot stream written
(:mod:`xenpbr.images.hotcache`): that is what an operator's guest has minutes after its
first boot. The report names the restore path xenpbrd's log says it took (``hot stream``
or ``regenerated`` from the page store), so a figure is never mistaken for the other.

Nothing here assumes a fast machine: every wait is a deadline for detecting a hang
(``WAIT_S``, several times what a machine four times slower than the development one
needs), never a limit that stops software that is still working.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import xenpbrd
from .build import LabImages, build
from .errors import LabError
from .host import XenHost
from .paths import artifacts_root
from .xl import LabDomain

log = logging.getLogger(__name__)

#: Seconds any one wait may take before the demo reports a hang (the app's first boot
#: took 40 s on an idle development machine and about 160 s under a CPU hog).
WAIT_S = 1800.0
PANIC = r"Kernel panic - not syncing"
ALIVE = r"XENPBR-APP: alive"
APP_CAPTURED = r"XENPBR-AGENT: app (captured|skipped) rc=0"
WARM_UP = r"XENPBR-APP: warm-up done in ([\d.]+) s"
DOCUMENTS = 20000
MEMORY_MIB = 192  # kernel + unpacked initramfs + the app's index
HOT_READY = r"hot stream of {name}/{image} ready"
#: xenpbrd's restore log line (:mod:`xenpbr.images.restore`): the hot stream's says so.
RESTORED = re.compile(r"restored .*? as domain (?P<name>\S+) \(domid \d+[^)]*\)"
                      r"(?P<hot> from its hot stream)?")


@dataclass
class DemoReport:
    """What the demo measured (seconds; guest events timed on dom0's clock)."""

    xen_version: str = ""
    lab_build_s: float = 0.0
    qemu_to_dom0_ready_s: float = 0.0
    first_boot_to_app_ready_s: float = 0.0
    app_warm_up_s: float = 0.0
    normal_reboot_s: float = 0.0
    phase_reboot_s: float = 0.0
    reduction_pct: float = 0.0
    recovered_from_phase: str = ""
    phase_reboot_breakdown: dict[str, float] = field(default_factory=dict)
    #: "hot stream" (xl read the ready-made file) or "regenerated" (from the page store)
    restore_path: str = ""
    hot_stream_wait_s: float = 0.0  # after the app boundary, until its stream was ready
    cpu_hog_processes: int = 0  # busy processes run beside QEMU (:mod:`.cpuhog`)
    guest_memory_mib: int = MEMORY_MIB
    notes: list[str] = field(default_factory=list)


def _guest(host: XenHost, name: str, on_crash: str) -> LabDomain:
    return LabDomain(host, name, memory_mib=MEMORY_MIB, mode="demo", on_crash=on_crash,
                     extra=f"lab.docs={DOCUMENTS}")


def _crash_to_alive(guest: LabDomain) -> float:
    """Crash the guest's kernel; seconds until its application answers again."""
    watched = guest.watch_console([PANIC, ALIVE], after=guest.console_size(),
                                  timeout=WAIT_S, trigger=f"xl sysrq {guest.name} c")
    return round(watched["found"][ALIVE]["t"] - watched["t0"], 2)


def _phase_reboot(host: XenHost, report: DemoReport) -> None:
    guest = _guest(host, "demo-pbr", "phasereboot")
    guest.write_config()
    start = time.monotonic()
    xenpbrd.cli(host, "create", guest.config_path)
    guest.watch_console([APP_CAPTURED], timeout=WAIT_S)
    report.first_boot_to_app_ready_s = round(time.monotonic() - start, 2)
    warm_up = re.search(WARM_UP, guest.console())
    if warm_up is None:
        raise LabError(f"{guest.name} never printed its warm-up time ({WARM_UP})")
    report.app_warm_up_s = float(warm_up.group(1))
    report.hot_stream_wait_s = _wait_for_hot_stream(host, guest.name)
    report.phase_reboot_s = _crash_to_alive(guest)
    report.restore_path = restore_path(xenpbrd.log_text(host), guest.name)
    last = xenpbrd.cli(host, "history", guest.name)[-1]
    report.recovered_from_phase = last["method"].removeprefix("phase:")
    report.phase_reboot_breakdown = last["since_crash"]
    guest.destroy()


def _wait_for_hot_stream(host: XenHost, name: str, phase: str = "app") -> float:
    """Wait until the hot stream of ``phase``'s image (the one a crash restores) is
    written; return the seconds waited."""
    start = time.monotonic()
    image = next(r["image"] for r in xenpbrd.cli(host, "images", name) if r["phase"] == phase)
    xenpbrd.wait_for_log(host, HOT_READY.format(name=name, image=image), timeout=WAIT_S)
    return round(time.monotonic() - start, 2)


def restore_path(xenpbrd_log: str, name: str) -> str:
    """The path of ``name``'s newest restore in xenpbrd's log: "hot stream" or
    "regenerated" ("" if the log has no restore of it)."""
    found = [m for m in RESTORED.finditer(xenpbrd_log) if m["name"] == name]
    if not found:
        return ""
    return "hot stream" if found[-1]["hot"] else "regenerated"


def _normal_reboot(host: XenHost, report: DemoReport) -> None:
    guest = _guest(host, "demo-normal", "restart")
    guest.create()
    guest.watch_console([ALIVE], timeout=WAIT_S)
    report.normal_reboot_s = _crash_to_alive(guest)
    guest.destroy()


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
            xenpbrd.start(host)
            _phase_reboot(host, report)
            _normal_reboot(host, report)
            if report.normal_reboot_s > 0:
                report.reduction_pct = round(
                    100 * (1 - report.phase_reboot_s / report.normal_reboot_s), 1)
        except Exception:
            host.collect_artifacts(workdir / "failure")
            raise
        finally:
            (workdir / "xenpbrd.log").write_text(xenpbrd.stop(host))
    return report


def render(report: DemoReport) -> str:
    """The demo's result as a readable table."""
    rows = [
        ("Xen version", report.xen_version),
        ("CPU hog beside QEMU", f"{report.cpu_hog_processes} busy processes"
         if report.cpu_hog_processes else "none"),
        ("QEMU start -> dom0 ready", f"{report.qemu_to_dom0_ready_s:.1f} s"),
        ("first boot: create -> app phase captured", f"{report.first_boot_to_app_ready_s:.1f} s"),
        ("  of which the app's warm-up", f"{report.app_warm_up_s:.1f} s"),
        ("app image's hot stream ready after", f"{report.hot_stream_wait_s:.1f} s more"),
        ("downtime, normal reboot (crash -> app answers)", f"{report.normal_reboot_s:.2f} s"),
        ("downtime, phase-based reboot (crash -> app answers)", f"{report.phase_reboot_s:.2f} s"),
        ("reduction", f"{report.reduction_pct:.1f} %"),
        ("recovered from phase", report.recovered_from_phase),
        ("restore path (xenpbrd's log)", report.restore_path or "unknown"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["xenpbr demo: a PV guest's kernel crashes on real Xen 4.17", ""]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    breakdown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(
        report.phase_reboot_breakdown.items(), key=lambda kv: kv[1]) if k != "crash_seen")
    lines += ["", f"  xenpbrd timeline (s after the crash was seen): {breakdown}", "",
              "Both recoveries ran in this one session, side by side. Times are under QEMU "
              "TCG (software emulation), roughly 10x slower than native: compare the ratio."]
    return "\n".join(lines)


def write_report(report: DemoReport, path: Path) -> None:
    """Write the report as JSON (for automation and later comparison)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
