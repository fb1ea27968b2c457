"""``make bench``: downtime of three recovery methods, side by side, on real Xen.

For each workload (``bare`` kernel, kernel + ``services``, an ``app`` with a real warm-up:
:mod:`xenpbr_lab.demo_app`) and each guest memory size, in one lab session:

* ``normal``: ``on_crash = "restart"``, xl reboots the guest;
* ``phasereboot``: ``xenpbr create`` with ``on_crash = "phasereboot"``, xenpbrd restores
  the deepest phase image;
* ``xl-restore``: the obvious hand-made alternative: one ``xl save -c`` after the boot,
  and on a crash a script that waits for xl to show the domain crashed, destroys it and
  ``xl restore``s the checkpoint;
* ``phasereboot-standby``: phase-based reboot with ``xenpbr_standby = 1``: xenpbrd keeps
  the newest image restored and paused beside the guest, and a crash is recovered by a
  rename and an unpause (:mod:`xenpbr.images.standby`); each crash waits until the
  standby replacing the one used is ready (it is prepared in the background);
* ``phasereboot-fifo`` (on request, ``--methods``): phase-based reboot with the hot stream
  off (``xenpbr_hot_stream = 0``): the stream is regenerated from the page store into
  xl, every page verified. Run beside ``phasereboot`` it measures what the hot stream
  buys. ``phasereboot`` waits until xenpbrd reports the newest image's stream ready
  before the first crash (it is built in the background after the capture; a crash
  before then is restored the ``phasereboot-fifo`` way).

Downtime is from the crash (``xl sysrq DOMAIN c``) to the service answering again (the
first heartbeat line after the panic), timed in dom0 by :mod:`xenpbr_lab.console_watch`.
Each method is repeated ``repeats`` times per configuration; the three methods of one
configuration run back to back in the same dom0, so their ratios are comparable even on
a noisy machine. Absolute times are under QEMU TCG (software emulation), roughly ten
times slower than native: lead with the ratios.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import xenpbrd
from .host import XenHost
from .xl import LabDomain

log = logging.getLogger(__name__)

WORKLOADS = ("bare", "services", "app")
METHODS = ("normal", "phasereboot", "xl-restore", "phasereboot-fifo", "phasereboot-standby")
DEFAULT_METHODS = ("normal", "phasereboot", "xl-restore", "phasereboot-standby")
#: Run order within a configuration: xl-restore's checkpoint is deleted before xenpbrd's
#: store fills up, since dom0's root file system (RAM) cannot hold both at 512 MiB.
RUN_ORDER = ("normal", "xl-restore", "phasereboot-fifo", "phasereboot-standby", "phasereboot")
HOT_READY = r"hot stream of {name}/{image} ready"
MEMORY_MIB = (128, 256, 512, 1024, 1740)  # 1740: the paper's 1.7 GB guest
DEFAULT_MEMORY_MIB = (128, 256, 512)
PANIC = r"Kernel panic - not syncing"
ALIVE = r"XENPBR-APP: alive"
LAST_BOUNDARY = {"bare": r"XENPBR-AGENT: kernel \S+ rc=",
                 "services": r"XENPBR-AGENT: services \S+ rc=",
                 "app": r"XENPBR-AGENT: app \S+ rc="}


#: The smallest guest each workload fits in. The lab guest's root file system lives in
#: its RAM (an initramfs with Python, about 60 MiB unpacked): at 128 MiB the app's parent
#: is OOM-killed during its warm-up (seen in the lab), so app starts at 192 MiB.
MIN_MEMORY_MIB = {"bare": 64, "services": 64, "app": 192}


def fits(workload: str, memory_mib: int) -> str | None:
    """Why ``workload`` cannot run in ``memory_mib`` (None if it can)."""
    need = MIN_MEMORY_MIB.get(workload, 0)
    if memory_mib < need:
        return (f"{workload} needs at least {need} MiB in the lab (its root file system "
                f"lives in RAM; at {memory_mib} MiB the app is OOM-killed)")
    return None


def host_sizes(memories: list[int]) -> dict[str, int]:
    """QEMU's and dom0's memory (``XenHost`` keywords) for guests up to ``max(memories)``.

    dom0's root file system is RAM and holds, for the largest guest, xenpbrd's store
    (about one guest's memory once pages are shared between phases), the hot stream
    (another) and ``xl-restore``'s checkpoint (a third, deleted before xenpbrd's turn);
    Xen holds the guest and its standby beside dom0. Up to 512 MiB the lab's defaults
    (4096 / 2048) have always sufficed; above, both grow with the guest.
    """
    biggest = max(memories)
    if biggest <= 512:
        return {}
    dom0 = 1024 + 3 * biggest
    return {"dom0_memory_mib": dom0, "memory_mib": dom0 + 2 * biggest + 768}


def documents(memory_mib: int) -> int:
    """The app's data set for a guest of ``memory_mib``: what the kernel and the unpacked
    initramfs leave free (about 96 MiB go to them) is filled the way a server fills its
    caches: 128 MiB -> 2560 documents, 256 -> 12800, 512 -> 33280 (make demo: 20000 in
    192 MiB)."""
    return max(1000, (memory_mib - 96) * 80)

CHECKPOINT_DIR = "/var/lib/xenpbr-bench"
# The hand-made alternative, as an operator would script it: poll until crashed.
_XL_RESTORE = ("while ! xl list {name} | tail -1 | awk '{{print $5}}' | grep -q c; do "
               "sleep 0.1; done; xl destroy {name} && xl restore {chk} >/dev/null 2>&1")


@dataclass
class Sample:
    """One crash and recovery."""

    workload: str
    memory_mib: int
    method: str
    run: int
    downtime_s: float
    breakdown: dict[str, float] = field(default_factory=dict)  # xenpbrd's timeline


@dataclass
class ConfigFacts:
    """What one (workload, memory) configuration cost besides downtime."""

    workload: str
    memory_mib: int
    first_boot_s: dict[str, float] = field(default_factory=dict)  # per method
    capture: list[dict[str, Any]] = field(default_factory=list)  # per phase image
    dom0_copy_mib_s: float = 0.0  # the fastest native copy of the guest's size, in dom0
    dom0_copy_by_method: dict[str, float] = field(default_factory=dict)  # memcpy, dd_tmpfs
    # xenpbrd's resident MiB: "idle" (started, nothing registered) and "protecting" (the
    # phasereboot guest past its last boundary, hot stream ready, before any crash)
    xenpbrd_rss_mib: dict[str, float | None] = field(default_factory=dict)
    # the newest image's hot stream as xenpbrd wrote it (smaller than the raw stream
    # when it left the zero pages to Xen); None: not found in its log
    hot_stream_bytes: int | None = None


def _guest(host: XenHost, workload: str, memory_mib: int, method: str) -> LabDomain:
    on_crash = "phasereboot" if method.startswith("phasereboot") else {
        "normal": "restart", "xl-restore": "preserve"}[method]
    name = f"b-{workload}-{memory_mib}-{method}".replace("phasereboot", "pbr")
    # The bench crashes a guest again seconds after its recovery, on purpose: the
    # crash-loop guard would (rightly) answer that with earlier phases and normal
    # reboots, so for the bench it only looks one second back; and the per-image
    # failure history would abandon the image these deliberate crashes hit, so a
    # restore is healthy once it reported ready and the image is never abandoned.
    guard: dict[str, int] = ({"xenpbr_crash_loop_window": 1, "xenpbr_healthy_after": 0,
                              "xenpbr_image_failures": 100}
                             if method.startswith("phasereboot") else {})
    if method == "phasereboot-fifo":
        guard["xenpbr_hot_stream"] = 0
    if method == "phasereboot-standby":
        guard["xenpbr_standby"] = 1
    return LabDomain(host, name, memory_mib=memory_mib, mode="bench", on_crash=on_crash,
                     extra=f"lab.workload={workload} lab.docs={documents(memory_mib)}", **guard)


def hot_stream_bytes(log: str, name: str) -> int | None:
    """The size of the last hot stream xenpbrd's log says it wrote for domain ``name``."""
    sizes = re.findall(rf"hot stream of {re.escape(name)}/\S+ ready: (\d+) bytes", log)
    return int(sizes[-1]) if sizes else None


def _start(host: XenHost, guest: LabDomain, method: str, workload: str) -> float:
    """Create the guest the way ``method`` needs; seconds until it has passed its last
    boundary (so every phase image exists) and answers. The app answers before its
    boundary: crashing it on its first heartbeat hit the capture of the app phase."""
    start = time.monotonic()
    if method.startswith("phasereboot"):
        guest.write_config()
        xenpbrd.cli(host, "create", guest.config_path)
    else:
        guest.create()
    guest.watch_console([LAST_BOUNDARY[workload], ALIVE], timeout=600)
    took = time.monotonic() - start
    if method == "phasereboot":  # the newest image's stream, not an earlier phase's
        newest = xenpbrd.newest_image(host, guest.name)
        xenpbrd.wait_for_log(host, HOT_READY.format(name=guest.name, image=newest),
                             timeout=600)
    if method == "phasereboot-standby":
        xenpbrd.wait_for_standby(host, guest.name, 1)
    if method == "xl-restore":
        host.run(["mkdir", "-p", CHECKPOINT_DIR])
        guest.save_checkpoint(f"{CHECKPOINT_DIR}/{guest.name}.chk", timeout=600)
    return round(took, 2)


def _crash_and_time(host: XenHost, guest: LabDomain, method: str) -> float:
    """Crash the guest; seconds from the crash to its first heartbeat after the panic."""
    trigger = f"xl sysrq {guest.name} c"
    if method == "xl-restore":
        trigger += "; " + _XL_RESTORE.format(name=guest.name,
                                             chk=f"{CHECKPOINT_DIR}/{guest.name}.chk")
    watched = guest.watch_console([PANIC, ALIVE], after=guest.console_size(), timeout=600,
                                  trigger=trigger)
    return round(watched["found"][ALIVE]["t"] - watched["t0"], 3)


#: dom0's memory bandwidth for the guest's size, natively: libc's memcpy (through ctypes,
#: over buffers touched first, so no page fault is timed) and dd from /dev/zero into tmpfs;
#: the best of three of each, in MiB/s, as JSON. The restore's physical yardstick. memcpy
#: copies the guest's size through buffers of at most 256 MiB, far beyond any cache: two
#: buffers of a 1740 MiB guest's size took dom0 past the bench's time limit under TCG
#: (faulting 3.4 GiB in), which measured nothing about bandwidth.
NATIVE_COPY = """
import ctypes, json, os, subprocess, sys, time
mib = int(sys.argv[1])
n = min(mib, 256) << 20
rounds, rest = divmod(mib << 20, n)
src, dst = ctypes.create_string_buffer(n), ctypes.create_string_buffer(n)
ctypes.memset(src, 0x5A, n)
ctypes.memset(dst, 0, n)
def copy_all():
    for _ in range(rounds):
        ctypes.memmove(dst, src, n)
    ctypes.memmove(dst, src, rest)
def best(copy):
    times = []
    for _ in range(3):
        t = time.perf_counter()
        copy()
        times.append(time.perf_counter() - t)
    return round(mib / min(times), 1)
rates = {"memcpy": best(copy_all)}
del src, dst
target = ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp") + "/xenpbr-yardstick"
try:
    rates["dd_tmpfs"] = best(lambda: subprocess.run(
        ["dd", "if=/dev/zero", "of=" + target, "bs=1M", "count=%d" % mib],
        check=True, capture_output=True))
finally:
    if os.path.exists(target):
        os.unlink(target)
print(json.dumps(rates))
"""


def _dom0_copy_rates(host: XenHost, memory_mib: int) -> dict[str, float]:
    """MiB/s of native copies of ``memory_mib`` MiB in dom0, by method (NATIVE_COPY)."""
    # a limit that grows with the size: a slow machine must not cut a working copy off
    rates = json.loads(host.run(["python3", "-c", NATIVE_COPY, str(memory_mib)],
                                timeout=300 + memory_mib).stdout)
    return {str(k): float(v) for k, v in rates.items()}


#: Set (``xenpbr-lab bench`` does on SIGINT/SIGTERM) to start no further method or
#: configuration: the method under way finishes its crashes, and what was measured
#: is written.
STOP = threading.Event()


def run_config(host: XenHost, workload: str, memory_mib: int, repeats: int,
               progress: Callable[[str], None], evidence: Path | None = None,
               methods: tuple[str, ...] = DEFAULT_METHODS
               ) -> tuple[list[Sample], ConfigFacts]:
    """All methods for one configuration, ``repeats`` crashes each; xenpbrd's log and
    the guests' consoles go to ``evidence`` if given."""
    samples: list[Sample] = []
    rates = _dom0_copy_rates(host, memory_mib)
    facts = ConfigFacts(workload, memory_mib, dom0_copy_mib_s=max(rates.values()),
                        dom0_copy_by_method=rates)
    xenpbrd.start(host)  # fresh state: each configuration starts with an empty store
    facts.xenpbrd_rss_mib["idle"] = xenpbrd.rss_mib(host)
    guests: list[LabDomain] = []
    try:
        for method in (m for m in RUN_ORDER if m in methods):
            if STOP.is_set():
                progress(f"{workload} {memory_mib} MiB: stopped before {method}")
                break
            guest = _guest(host, workload, memory_mib, method)
            guests.append(guest)
            facts.first_boot_s[method] = _start(host, guest, method, workload)
            if method == "phasereboot":
                facts.xenpbrd_rss_mib["protecting"] = xenpbrd.rss_mib(host)
                facts.hot_stream_bytes = hot_stream_bytes(xenpbrd.log_text(host), guest.name)
            for run in range(1, repeats + 1):
                if method == "phasereboot-standby":  # the one replacing the last used
                    xenpbrd.wait_for_standby(host, guest.name, run)
                downtime = _crash_and_time(host, guest, method)
                breakdown: dict[str, float] = {}
                if method.startswith("phasereboot"):
                    breakdown = _settled_breakdown(host, guest.name, run)
                samples.append(Sample(workload, memory_mib, method, run, downtime, breakdown))
                progress(f"{workload:8} {memory_mib:4} MiB  {method:11} run {run}/{repeats}: "
                         f"{downtime:.2f} s")
            if method == "phasereboot" or (method.startswith("phasereboot")
                                           and not facts.capture):
                # every phase-based method captures the same phases; without plain
                # phasereboot in the run, the restore throughput still needs the sizes
                facts.capture = [{k: r.get(k) for k in ("phase", "capture_s", "paused_s",
                                                        "raw_bytes", "stored_bytes")}
                                 for r in xenpbrd.cli(host, "images", guest.name)]
            if evidence is not None:
                evidence.mkdir(parents=True, exist_ok=True)
                (evidence / f"{guest.name}.console.log").write_text(guest.console())
            guest.destroy()
            host.run(f"rm -rf {CHECKPOINT_DIR}", check=False)
    finally:
        for guest in guests:  # after a failure too: the next configuration needs the room
            host.run(["xl", "destroy", guest.name], check=False)
        log_text = xenpbrd.stop(host)
        if evidence is not None:
            (evidence / f"xenpbrd-{workload}-{memory_mib}.log").write_text(log_text)
        host.run(f"rm -rf {CHECKPOINT_DIR} {xenpbrd.STATE}", check=False)
    return samples, facts


def _settled_breakdown(host: XenHost, name: str, run: int) -> dict[str, float]:
    """The recovery's timeline once the guest reported service ready (or 10 s passed)."""
    deadline = time.monotonic() + 10
    while True:
        history = xenpbrd.cli(host, "history", name)
        last = history[-1] if len(history) >= run else {}
        marks = last.get("since_crash", {})
        if "service_ready" in marks or time.monotonic() > deadline:
            return marks
        time.sleep(0.3)


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per (workload, memory, method): runs, median, min, max, spread, the
    reduction of the median against the normal reboot of the same configuration and, for
    the phase-based methods, the median's ratio to the hand-made ``xl-restore``'s (below
    1: faster than it)."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for s in samples:
        groups.setdefault((s.workload, s.memory_mib, s.method), []).append(s.downtime_s)
    rows = []
    for (workload, memory, method), values in groups.items():
        median = statistics.median(values)
        normal = groups.get((workload, memory, "normal"))
        reduction = (round(100 * (1 - median / statistics.median(normal)), 1)
                     if normal and method != "normal" else None)
        by_hand = groups.get((workload, memory, "xl-restore"))
        vs_xl_restore = (round(median / statistics.median(by_hand), 3)
                         if by_hand and method.startswith("phasereboot") else None)
        rows.append({"workload": workload, "memory_mib": memory, "method": method,
                     "runs": len(values), "median_s": round(median, 3),
                     "min_s": min(values), "max_s": max(values),
                     "stdev_s": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
                     "reduction_pct": reduction, "vs_xl_restore": vs_xl_restore})
    return rows


def step_medians(breakdowns: list[dict[str, float]]) -> dict[str, Any]:
    """Median duration of each step of xenpbrd's recovery timelines, and the largest."""
    order = ("image_chosen", "destroyed", "restore_started", "restore_finished",
             "guest_ack", "service_ready")
    steps: dict[str, list[float]] = {}
    for marks in breakdowns:
        previous = "crash_seen"
        for mark in order:
            if mark in marks and previous in marks:
                steps.setdefault(f"{previous}->{mark}", []).append(marks[mark] - marks[previous])
                previous = mark
    medians = {k: round(statistics.median(v), 3) for k, v in steps.items()}
    return {"steps_median_s": medians,
            "biggest": max(medians, key=lambda step: medians[step]) if medians else None}


def biggest_piece(samples: list[Sample], method: str = "phasereboot") -> dict[str, Any]:
    """:func:`step_medians` of the recoveries by ``method``."""
    return step_medians([s.breakdown for s in samples if s.method == method])


def machine() -> dict[str, Any]:
    """Where the bench ran (the host; the guests ran under QEMU TCG on it)."""
    import os
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "accelerator": "QEMU TCG (no KVM)"}


def as_json(rows: list[dict[str, Any]], samples: list[Sample], facts: list[ConfigFacts],
            meta: dict[str, Any]) -> dict[str, Any]:
    return {"meta": meta, "rows": rows, "samples": [asdict(s) for s in samples],
            "configs": [asdict(f) for f in facts], "breakdown": biggest_piece(samples),
            "breakdown_fifo": biggest_piece(samples, "phasereboot-fifo")}
