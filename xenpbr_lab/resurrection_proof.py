"""The resurrection proof of issue 15, on real Xen (``make resurrect``).

A key-value application (:mod:`xenpbr_lab.resurrect_app`) writes a steady stream of
values in a guest and prints every write it acknowledged (``ACK <seq> <key> <digest>``);
after a restart it prints what came back (``LOADED <key> <digest>``, ``LOADED-COUNT n``).
In one boot of the lab, one guest after the other (each recovery method needs its own xl
config, and one at a time so that none of them slows another's recovery under TCG):

1. **resurrection**: ``on_crash = "phasereboot"`` with ``xenpbr_resurrect = 1``;
2. **phasereboot**: the same without ``xenpbr_resurrect`` (the app image predates every
   write, so every acknowledged write is lost);
3. **normal**: xl's own ``on_crash = "restart"``, the same application started at boot.

Each guest is crashed ``cycles`` times at a random moment after the application has
acknowledged at least two rounds of writes over every key, and recovered; the harness
compares the last acknowledged value of each key with what the application loaded.
Then a probe guest (``on_crash = "preserve"``, a shell on its console) measures the
application's throughput with and without its region (alternating, three runs each), and
is crashed with the application writing: dom0 flips one byte of a record and then one
byte of the region header in the crashed memory; extraction must reject the record
(reason ``crc``) and then the whole region, and return nothing that was not written.

The report (``build/resurrection-report.json`` and a ``.md`` beside it) is built from
pure functions of the consoles and of xenpbrd's history, tested without the lab in
tests/unit/test_resurrection_proof.py. Every wait is a hang detector, not a schedule.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import xenpbrd
from .errors import LabTimeout
from .resurrect_app import APP, digest, value_for
from .xl import LabDomain

if TYPE_CHECKING:
    from .host import XenHost

log = logging.getLogger(__name__)

CYCLES = 20
CYCLES_WITHOUT = 3
KEYS = 30
RATE = 20
VALUE_SIZE = 64
MAX_DELAY_S = 3.0
OVERHEAD_RUNS = 3
OVERHEAD_SECONDS = 10
METHODS = ("resurrection", "phasereboot", "normal")

PANIC = "Kernel panic - not syncing"
CRASHING = r"Kernel panic|sysrq: Trigger a crash"
LAST_BOUNDARY = r"XENPBR-AGENT: app .* rc="
LOADED_COUNT_RE = r"LOADED-COUNT \d+"
# not anchored at the line's start: the guest's shell prompt leaves an escape sequence
# ("/ # \x1b[6n") in front of the application's first line
LINE_START = r"(?:^|\x1b\[[0-9;?]*[A-Za-z])"
ACK = re.compile(LINE_START + r"ACK (\d+) (k\d{6}) ([0-9a-f]{16})\r?$", re.M)
LOADED = re.compile(LINE_START + r"LOADED (k\d{6}) ([0-9a-f]{16})\r?$", re.M)
LOADED_COUNT = re.compile(r"LOADED-COUNT (\d+)")
DONE = re.compile(r"OVERHEAD (region|plain) (\d+) DONE (\d+) ([\d.]+) ([\d.]+)")


# -- parsing and arithmetic (no lab) -----------------------------------------------------


def acked_writes(console: str) -> list[tuple[str, str]]:
    """(key, digest) of every write the application acknowledged, in order."""
    return [(key, dig) for _, key, dig in ACK.findall(console)]


def loaded_values(console: str) -> tuple[dict[str, str], int | None]:
    """What a restarted application loaded: key -> digest, and its ``LOADED-COUNT``."""
    count = LOADED_COUNT.search(console)
    return dict(LOADED.findall(console)), int(count.group(1)) if count else None


def lost_keys(acked: list[tuple[str, str]], loaded: dict[str, str], keys: int,
              value_size: int = VALUE_SIZE) -> list[str]:
    """Keys whose loaded value is older than their last acknowledged write.

    Write ``i`` goes to key ``i % keys`` and its value is unique to ``i`` (the count
    starts at 0 each time the application starts: ``acked`` is one run's); a write
    acknowledged too late for its console line to be seen before the crash is newer than
    the last one seen, so any write ``j >= i`` of the same key counts as not lost. ``i`` is
    found from the digest, so a console line lost on the way shifts nothing."""
    numbers = {digest(value_for(j, value_size)): j for j in range(2 * len(acked) + 20 * keys)}
    last: dict[str, int] = {}
    for position, (key, dig) in enumerate(acked):
        last[key] = numbers.get(dig, position)
    lost = []
    for key, i in last.items():
        later = {digest(value_for(j, value_size)) for j in range(i, i + 20 * keys, keys)}
        if loaded.get(key) not in later:
            lost.append(key)
    return sorted(lost)


def genuine(key: str, value: bytes, keys: int, value_size: int = VALUE_SIZE) -> bool:
    """True if ``value`` is one the application really wrote to ``key`` (write ``i``
    writes ``value_for(i)`` to key ``i % keys``)."""
    head, sep, _ = value.partition(b":")
    if not sep or not head.isdigit() or not re.fullmatch(r"k\d{6}", key):
        return False
    i = int(head)
    return i % keys == int(key[1:]) and value == value_for(i, value_size)


def cycle_outcome(console: str, start: int, crash: int, keys: int) -> dict[str, Any]:
    """One crash's data outcome from the console: the writes acknowledged between
    ``start`` (after the previous restart) and the restarted application's first line
    after the panic at or after ``crash`` (or after ``crash`` when there is no panic: a
    hang), against what the restarted application loaded. The writes counted are those
    of the application's run that the crash interrupted: after its ``LOADED-COUNT``."""
    panic = console.find(PANIC, crash)
    panic = crash if panic < 0 else panic
    runs = list(LOADED_COUNT.finditer(console, start, panic))
    start = runs[-1].end() if runs else start
    # every write the interrupted run acknowledged counts, up to the restarted run's
    # first line: a hang takes effect only when a vCPU next goes idle, and the
    # application went on acknowledging hundreds of writes after the injection (runs
    # 11-12 of the fault campaign), whose values it must get back as well
    restarted = LOADED.search(console, panic) or LOADED_COUNT.search(console, panic)
    acked = acked_writes(console[start:restarted.start() if restarted else len(console)])
    after = console[panic:]
    end = LOADED_COUNT.search(after)
    loaded, count = loaded_values(after[:end.end()] if end else after)
    lost = lost_keys(acked, loaded, keys)
    lost_set = set(lost)
    return {"acked_writes": len(acked), "keys_written": len({k for k, _ in acked}),
            "loaded": count, "lost_keys": len(lost),
            "lost_acked_writes": sum(key in lost_set for key, _ in acked),
            "lost": lost[:10]}


def outcomes_from_console(console: str, keys: int) -> list[dict[str, Any]]:
    """Every crash's outcome from a whole console log (one per kernel panic): to check a
    run again from its evidence (lab-artifacts/resurrect-*/<guest>.console.log)."""
    outcomes, previous = [], 0
    for panic in (m.start() for m in re.finditer(re.escape(PANIC), console)):
        outcomes.append(cycle_outcome(console, previous, panic, keys))
        previous = panic + 1
    return outcomes


def summary(values: list[float]) -> dict[str, Any] | None:
    """Runs, median, min and max of some seconds (None if there are none)."""
    if not values:
        return None
    return {"runs": len(values), "median": round(statistics.median(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


def overhead(rates: dict[str, list[float]]) -> dict[str, Any]:
    """The write throughput with registration (``region``) against without (``plain``):
    medians, their ratio and the overhead in percent (positive: the region costs)."""
    region, plain = (statistics.median(rates[m]) if rates.get(m) else None
                     for m in ("region", "plain"))
    ratio = region / plain if region is not None and plain else None
    return {"region_writes_per_s": rates.get("region", []),
            "plain_writes_per_s": rates.get("plain", []),
            "region_median": region, "plain_median": plain,
            "ratio": None if ratio is None else round(ratio, 4),
            "overhead_pct": None if ratio is None else round((1 - ratio) * 100, 2)}


def done_rates(console: str) -> dict[str, list[float]]:
    """writes/s of each ``OVERHEAD <mode> <run> DONE <writes> <s> <rate>`` line, per mode
    in run order."""
    out: dict[str, list[float]] = {"region": [], "plain": []}
    for mode, _, _, _, rate in DONE.findall(console):
        out[mode].append(float(rate))
    return out


def history_figures(history: list[dict[str, Any]], cycles: int) -> dict[str, Any]:
    """xenpbrd's own downtime, methods and extraction seconds over the last ``cycles``
    recoveries of its history."""
    last = history[-cycles:] if cycles else []
    downtime = [h["downtime_s"] for h in last if h.get("downtime_s") is not None]
    extraction = [app["seconds"] for h in last for app in h.get("resurrection") or []
                  if app.get("app") == APP and app.get("seconds") is not None]
    methods: dict[str, int] = {}
    for h in last:
        methods[str(h.get("method"))] = methods.get(str(h.get("method")), 0) + 1
    return {"recoveries": len(last), "methods": methods,
            "xenpbrd_downtime_s": summary(downtime), "extraction_s": summary(extraction),
            "rejected": sum(len(app.get("rejected") or []) for h in last
                            for app in h.get("resurrection") or [])}


def method_figures(cycles: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of one method's cycles (each from :func:`cycle_outcome` plus ``downtime_s``)."""
    return {"cycles": len(cycles),
            "acked_writes": sum(c["acked_writes"] for c in cycles),
            "lost_keys": sum(c["lost_keys"] for c in cycles),
            "lost_acked_writes": sum(c["lost_acked_writes"] for c in cycles),
            "downtime_s": summary([c["downtime_s"] for c in cycles if "downtime_s" in c])}


def build_report(per_method: dict[str, list[dict[str, Any]]],
                 histories: dict[str, dict[str, Any]], rates: dict[str, list[float]],
                 corrupt: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The report: the issue's keys first, then the detail behind them."""
    figures = {m: method_figures(c) for m, c in per_method.items()}
    res = figures.get("resurrection", method_figures([]))
    res_history = histories.get("resurrection", {})
    return {
        "cycles": {m: f["cycles"] for m, f in figures.items()},
        "acked_writes": res["acked_writes"],
        "lost_writes": res["lost_keys"],
        "lost_without": {m: {"lost_keys": f["lost_keys"],
                             "lost_acked_writes": f["lost_acked_writes"],
                             "acked_writes": f["acked_writes"]}
                         for m, f in figures.items() if m != "resurrection"},
        "corrupt_detected": corrupt,
        "extraction_s": res_history.get("extraction_s"),
        "downtime_s": {m: {"crash_to_loaded": f["downtime_s"],
                           "xenpbrd": histories.get(m, {}).get("xenpbrd_downtime_s")}
                       for m, f in figures.items()},
        "overhead_pct": overhead(rates)["overhead_pct"],
        "overhead": overhead(rates),
        **meta,
        "methods": figures,
        "history": histories,
        "per_cycle": per_method,
    }


def verdict(report: dict[str, Any]) -> list[str]:
    """What makes the proof fail (empty: it passed)."""
    problems = []
    if report["lost_writes"]:
        problems.append(f"resurrection lost {report['lost_writes']} acknowledged write(s)")
    if not report["acked_writes"]:
        problems.append("no write was acknowledged under resurrection")
    corrupt = report["corrupt_detected"] or {}
    if not (corrupt.get("record") and corrupt.get("header")):
        problems.append(f"a corrupted record or header was not detected: {corrupt}")
    return problems


def markdown(report: dict[str, Any]) -> str:
    """The short human version of the report."""
    rows = ["| method | cycles | acked writes | keys lost | acked writes lost | "
            "crash -> LOADED-COUNT median (max) s | xenpbrd downtime median s |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for method, f in report["methods"].items():
        down = f["downtime_s"] or {}
        own = report["downtime_s"][method]["xenpbrd"] or {}
        rows.append(f"| {method} | {f['cycles']} | {f['acked_writes']} | {f['lost_keys']} | "
                    f"{f['lost_acked_writes']} | {down.get('median')} ({down.get('max')}) | "
                    f"{own.get('median', '-')} |")
    ext = report["extraction_s"] or {}
    ovh = report["overhead"]
    return "\n".join([
        "# Resurrection proof", "",
        f"`{report['command']}` on {report['date']} (load before: {report['load_before']}, "
        f"after: {report['load_after']}; {report['machine'].get('cpu')}, "
        f"{report['machine'].get('cpus')} CPUs, QEMU TCG).", "",
        *rows, "",
        f"- lost writes with resurrection: **{report['lost_writes']}** "
        f"of {report['acked_writes']} acknowledged",
        f"- extraction: median {ext.get('median')} s, max {ext.get('max')} s",
        f"- overhead of registration: {report['overhead_pct']} % (writes/s median "
        f"{ovh['region_median']} with, {ovh['plain_median']} without)",
        f"- corruption detected: {report['corrupt_detected']}", ""])


def write_report(report: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """The JSON report at ``path`` and its markdown beside it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown(report))
    return path, md


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- the lab ----------------------------------------------------------------------------


def _guest(host: XenHost, method: str) -> LabDomain:
    extra = f"lab.keys={KEYS} lab.rate={RATE}"
    if method == "normal":
        return LabDomain(host, "rp-normal", mode="resurrect", on_crash="restart", extra=extra)
    more = {"xenpbr_resurrect": 1} if method == "resurrection" else {}
    # crashed again seconds after each recovery on purpose: the crash-loop guard looks
    # 1 s back and a restore that reported ready is healthy at once (as consistency.py)
    return LabDomain(host, f"rp-{method[:5]}", mode="resurrect", on_crash="phasereboot",
                     extra=extra, xenpbr_crash_loop_window=1, xenpbr_healthy_after=0,
                     xenpbr_image_failures=100, **more)


def _start(host: XenHost, guest: LabDomain, method: str) -> None:
    """Create the guest (through xenpbr unless it is the normal reboot) and wait until its
    application has started (its first ``LOADED-COUNT``)."""
    if method == "normal":
        guest.create()
    else:
        guest.write_config()
        xenpbrd.cli(host, "create", guest.config_path)
    guest.watch_console([LAST_BOUNDARY, LOADED_COUNT_RE], timeout=900)


def acks_pattern(count: int) -> str:
    """A regex for ``count`` ACK lines with any other lines between them, with one way to
    match only: ``(?s)(?:\\nACK .*?){N}`` backtracks exponentially while fewer than N
    lines are there (24 lines, N = 25: 14 s; in dom0 the watcher never came back)."""
    return r"(?:\nACK [^\n]*(?:\n(?!ACK )[^\n]*)*){%d}" % count


def _wait_for_acks(guest: LabDomain, after: int, count: int, restarted: bool = False) -> None:
    """Wait (in dom0, nothing copied out) until ``count`` ACK lines follow byte ``after``
    (``restarted``: and follow the restarted application's ``LOADED-COUNT``)."""
    acks = acks_pattern(count)
    guest.watch_console([LOADED_COUNT_RE, acks] if restarted else [acks], after=after,
                        timeout=600)


def console_from(guest: LabDomain, offset: int) -> str:
    """The guest's console from byte ``offset`` on: a cycle's part only, since the
    control channel copies a whole console of thousands of ACK lines slowly under TCG."""
    return str(guest.host.run(f"tail -c +{offset + 1} {shlex.quote(guest.console_log)}",
                              check=False, timeout=300).stdout)


def _crash(guest: LabDomain, after: int, attempts: int = 3) -> dict[str, Any]:
    """``xl sysrq c`` until the kernel says it crashes; the watcher's report of the key
    that did (its ``t0``: when it was sent, dom0's clock). A guest was once seen taking
    the key without crashing (tests/lab/test_resurrection_real.py): send it again."""
    for attempt in range(1, attempts + 1):
        try:
            return guest.watch_console([CRASHING], after=after, timeout=120,
                                       trigger=f"xl sysrq {guest.name} c")
        except LabTimeout:
            log.warning("%s: sysrq c #%d, no crash within 120 s; again", guest.name, attempt)
    raise LabTimeout(f"{guest.name} did not crash after {attempts} 'xl sysrq c' (console "
                     f"log {guest.console_log})")


def _cycle(guest: LabDomain, start: int, rng: random.Random,
           restarted: bool) -> tuple[dict[str, Any], int]:
    """Crash once at a random moment while writes flow (``start``: a console byte offset
    before the application's run began writing); wait for the restarted application's
    ``LOADED-COUNT``; the outcome and the next cycle's ``start`` (this crash's offset)."""
    began = time.monotonic()
    _wait_for_acks(guest, start, 2 * KEYS, restarted)  # every key written twice this run
    writing_s = time.monotonic() - began
    delay = rng.uniform(0.0, MAX_DELAY_S)
    time.sleep(delay)
    crash = guest.console_size()
    crashed = _crash(guest, crash)
    back = guest.watch_console([LOADED_COUNT_RE], after=crash, timeout=900)
    outcome = cycle_outcome(console_from(guest, start), 0, crash - start, KEYS)
    outcome["delay_s"] = round(delay, 3)
    outcome["wait_for_writes_s"] = round(writing_s, 3)
    outcome["cycle_s"] = round(time.monotonic() - began, 3)
    outcome["downtime_s"] = round(back["found"][LOADED_COUNT_RE]["t"] - crashed["t0"], 3)
    return outcome, crash


def _history(host: XenHost, name: str, cycles: int) -> list[dict[str, Any]]:
    """xenpbrd's history of ``name`` once it holds ``cycles`` recoveries (or 120 s on)."""
    deadline = time.monotonic() + 120
    while True:
        history = xenpbrd.cli(host, "history", name)
        if len(history) >= cycles or time.monotonic() > deadline:
            return list(history)
        time.sleep(1)


def _save_console(guest: LabDomain, evidence: Path) -> None:
    """The guest's whole console, gzipped in dom0 (ACK lines compress well)."""
    evidence.mkdir(parents=True, exist_ok=True)
    packed = f"/tmp/{guest.name}.console.log.gz"
    guest.host.run(f"gzip -c {shlex.quote(guest.console_log)} > {packed}", check=False)
    (evidence / f"{guest.name}.console.log.gz").write_bytes(guest.host.get(packed))
    guest.host.run(f"rm -f {packed}", check=False)


def _forget(host: XenHost, guest: LabDomain, method: str) -> None:
    guest.destroy()
    if method != "normal":
        xenpbrd.cli(host, "forget", guest.name)  # dom0's RAM holds the store: make room
        xenpbrd.cli(host, "gc")


def run_method(host: XenHost, method: str, cycles: int, rng: random.Random,
               progress: Callable[[str], None], evidence: Path | None
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Crash one method's guest ``cycles`` times; per-cycle outcomes and history figures."""
    guest = _guest(host, method)
    outcomes: list[dict[str, Any]] = []
    try:
        _start(host, guest, method)
        progress(f"{method}: {guest.name} up, application writing")
        start = guest.console_size()  # the application has just started: the writes
        for n in range(1, cycles + 1):
            outcome, start = _cycle(guest, start, rng, restarted=n > 1)
            outcomes.append(outcome)
            progress(f"{method} cycle {n}/{cycles}: {outcome['acked_writes']} acked, "
                     f"{outcome['loaded']} loaded, {outcome['lost_keys']} keys lost, "
                     f"back in {outcome['downtime_s']:.2f} s (cycle {outcome['cycle_s']:.0f} s)")
        figures = (history_figures(_history(host, guest.name, cycles), cycles)
                   if method != "normal" else {})
    finally:
        if evidence is not None:
            evidence.mkdir(parents=True, exist_ok=True)
            _save_console(guest, evidence)
        _forget(host, guest, method)
    return outcomes, figures


def type_into_console(host: XenHost, guest: LabDomain, lines: list[str]) -> None:
    """Send shell lines to the guest's console shell (its pty in dom0, raw)."""
    tty = host.run(["xenstore-read", f"/local/domain/{guest.domid}/console/tty"]
                   ).stdout.strip()
    script = "".join(f"printf '%s\\n' {shlex.quote(line)} > {tty}; sleep 0.2\n"
                     for line in lines)
    host.run(f"stty -F {tty} raw -echo\n{script}", timeout=120)


def measure_overhead(host: XenHost, guest: LabDomain,
                     progress: Callable[[str], None]) -> dict[str, list[float]]:
    """Three runs each, alternating, of the application with and without its region."""
    for run in range(1, OVERHEAD_RUNS + 1):
        for mode in ("region", "plain"):
            log_file = f"/run/ovh-{mode}-{run}"
            after = guest.console_size()
            type_into_console(host, guest, [
                f"python3 -m xenpbr_lab.resurrect_app --mode {mode} --duration "
                f"{OVERHEAD_SECONDS} --rate 0 --log {log_file}; echo \"OVERHEAD {mode} {run} "
                f"$(tail -n 1 {log_file})\"; rm -f {log_file}"])
            found = guest.wait_for_console(rf"OVERHEAD {mode} {run} DONE \S+ \S+ \S+",
                                           after=after, timeout=600)
            progress(f"overhead: {found.group(0)}")
    return done_rates(guest.console())


CORRUPT = """
import json
from xenpbr.ctypes_libxc import XenCtrl, ForeignMemory
from xenpbr.hypervisor.guest_memory import GuestMemory
from xenpbr.resurrection.extract import GuestMemoryFrames, extract, read_registrations
from xenpbr.resurrection.model import Caps
from xenpbr.xenstore import XenstoreClient
from xenpbr.guestproto import resurrection as fmt

APP, DOMID = __APP__, __DOMID__

def layout(frames, regs):
    reg = fmt.parse_registration(APP, regs[APP])
    header = fmt.parse_header(frames.read_pfns([reg.header_pfn])[0])
    pfns = fmt.parse_directory(frames.read_pfns(list(reg.dir_pfns)), header, reg.header_pfn,
                               reg.dir_pfns)
    return reg, header, pfns[header.first_record_page:]

def flip(mem, pfn, offset):
    with mem.map_pfns([pfn], writable=True) as m:
        m.memoryview[offset] ^= 0x5A

def flip_record(mem, frames, regs):
    _, header, area_pfns = layout(frames, regs)
    area = b"".join(frames.read_pfns(list(area_pfns)))
    for slot in range(header.slot_count):
        base = slot * header.slot_size
        if area[base:base + 4] == b"XREC":
            key = area[base + 24:base + 31]
            target = base + 24 + len(key) + 3  # a byte of the value
            flip(mem, area_pfns[target // 4096], target % 4096)
            return slot, key.decode("ascii", "replace")
    raise SystemExit("no record to flip")

def run(mem, regs):
    result = extract(GuestMemoryFrames(mem), regs, Caps(), domid=DOMID)
    return {"apps": [{"app": a.app, "kept": a.kept,
                      "records": [[r.key.decode("ascii", "replace"), r.value.hex()]
                                  for r in a.records if not r.tombstone],
                      "rejections": [[r.reason, r.slot, (r.key or b"").decode("ascii", "replace")]
                                     for r in a.rejections]} for a in result.apps],
            "refused": [[r.app, r.reason] for r in result.refused]}

out = {}
with XenCtrl() as xc, ForeignMemory() as fm, XenstoreClient() as xs:
    mem = GuestMemory(xc, fm, DOMID)
    regs = read_registrations(xs, DOMID, limit=16)
    frames = GuestMemoryFrames(mem)
    out["clean"] = run(mem, regs)
    out["flipped_slot"], out["flipped_key"] = flip_record(mem, frames, regs)
    out["record"] = run(mem, regs)
    reg = fmt.parse_registration(APP, regs[APP])
    flip(mem, reg.header_pfn, 17)  # a byte of the generation: only the header CRC knows
    out["header"] = run(mem, regs)
print(json.dumps(out))
"""


def judge_corruption(result: dict[str, Any], keys: int) -> dict[str, Any]:
    """From the dom0 script's answer: was the flipped record rejected for ``crc`` (and the
    others kept), was the region with the flipped header rejected, and was every record
    returned one the application really wrote."""
    def app_of(run: dict[str, Any]) -> dict[str, Any] | None:
        return next((a for a in run["apps"] if a["app"] == APP), None)

    def records(run: dict[str, Any]) -> list[tuple[str, bytes]]:
        app = app_of(run)
        return [(k, bytes.fromhex(v)) for k, v in (app["records"] if app else [])]

    clean, flipped, header = result["clean"], result["record"], result["header"]
    flipped_app = app_of(flipped) or {"rejections": [], "kept": False}
    record_caught = (["crc", result["flipped_slot"], result["flipped_key"]]
                     in flipped_app["rejections"]
                     and result["flipped_key"] not in dict(records(flipped))
                     and len(records(flipped)) == len(records(clean)) - 1)
    header_app = app_of(header)
    header_caught = (not records(header) and (
        (header_app is not None and not header_app["kept"])
        or any(app == APP for app, _ in header["refused"])))
    wrong = [k for run in (clean, flipped, header) for k, v in records(run)
             if not genuine(k, v, keys)]
    reasons = ([r[0] for r in header_app["rejections"]] if header_app else []) + \
        [reason for app, reason in header["refused"] if app == APP]
    return {"record": record_caught, "header": header_caught, "wrong_returned": len(wrong),
            "records_clean": len(records(clean)), "records_after_record_flip":
            len(records(flipped)), "record_rejections": flipped_app["rejections"],
            "header_reasons": reasons}


def corruption(host: XenHost, guest: LabDomain,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Crash the probe guest with the application writing; flip bytes; extract."""
    after = guest.console_size()
    type_into_console(host, guest, [
        f"python3 -m xenpbr_lab.resurrect_app --keys {KEYS} --rate {RATE} &"])
    _wait_for_acks(guest, after, 2 * KEYS)
    domid = guest.domid
    _crash(guest, guest.console_size())
    guest.wait_for_state(lambda e: e.crashed, "crashed", timeout=300)
    code = CORRUPT.replace("__APP__", repr(APP)).replace("__DOMID__", str(domid))
    result = host.run(["python3", "-"], stdin=code.encode(), timeout=600, check=False)
    if result.rc != 0:
        return {"record": False, "header": False, "error": result.stderr[-2000:]}
    judged = judge_corruption(json.loads(result.stdout.strip().splitlines()[-1]), KEYS)
    progress(f"corruption: record caught {judged['record']}, header caught "
             f"{judged['header']} ({judged['header_reasons']}), wrong returned "
             f"{judged['wrong_returned']}")
    return judged


def probe(host: XenHost, progress: Callable[[str], None], evidence: Path | None
          ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The overhead runs and the corruption check, in one shell guest."""
    guest = LabDomain(host, "rp-probe", mode="shell", on_crash="preserve")
    try:
        guest.create()
        guest.wait_for_console("XENPBR-GUEST: up", timeout=600)
        rates = measure_overhead(host, guest, progress)
        corrupt = corruption(host, guest, progress)
    finally:
        if evidence is not None:
            evidence.mkdir(parents=True, exist_ok=True)
            _save_console(guest, evidence)
        guest.destroy()
    return rates, corrupt


def run_proof(host: XenHost, cycles: dict[str, int],
              progress: Callable[[str], None] = lambda line: None,
              evidence: Path | None = None, seed: int | None = None) -> dict[str, Any]:
    """Run the whole proof in a booted lab; return the report. ``cycles``: per method
    (``resurrection``, ``phasereboot``, ``normal``)."""
    seed = seed if seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            "load_before": load_average(), "seed": seed,
                            "keys": KEYS, "rate_per_s": RATE, "max_delay_s": MAX_DELAY_S}
    xenpbrd.start(host)
    per_method: dict[str, list[dict[str, Any]]] = {}
    histories: dict[str, dict[str, Any]] = {}
    try:
        for method in METHODS:
            if cycles.get(method):
                per_method[method], histories[method] = run_method(
                    host, method, cycles[method], rng, progress, evidence)
        rates, corrupt = probe(host, progress, evidence)
    finally:
        log_text = xenpbrd.stop(host)
        if evidence is not None:
            evidence.mkdir(parents=True, exist_ok=True)
            (evidence / "xenpbrd.log").write_text(log_text)
        host.run(f"rm -rf {xenpbrd.STATE}", check=False)
    meta["load_after"] = load_average()
    return build_report(per_method, histories, rates, corrupt, meta)
