"""The fault campaign of docs/faults.md on real Xen (``make faults``, ``xenpbr-lab faults``).

One guest (the consistency proof's: ext4 root disk ``snapshot``, ext4 data disk
``persistent`` with the acknowledging record writer, phases kernel, services, app) also
runs busybox's ``watchdog`` on Xen's watchdog (``xen_wdt``, ``on_watchdog =
"phasereboot"``) and boots with ``oops=panic``. Each injection:

1. ``xenpbr inject GUEST --fault KIND --seed N`` in dom0 (the record says what changed);
2. waits up to ``observe_s`` for xenpbrd to record a recovery: its trigger (``crash`` or
   ``watchdog``) is the outcome class, the time from the injection to xenpbrd seeing it
   the detection time;
3. if none comes, the outcome is ``silent`` (the console lines the kernel printed, if
   any, explain it); ``xenpbr fault-check`` says what became of the fault (its bytes
   still in place or overwritten, and for text and operand faults how often the
   altered instruction ran: the guest's agent counted it with a kprobe, ``--count-
   runs``); then the guest is rejuvenated (``xenpbr reboot``), so faults never pile up;
4. the service must come back: the writer resumes after the highest record on the disk
   and acknowledges a new one;
5. the second checked workload, the resurrection proof's key-value application
   (``xenpbr_resurrect = 1``), restarts and loads what dom0 read out of the crashed
   memory: after a crash or a hang every key must come back with its last acknowledged
   value (or a later one), and records dom0 rejected (checksums) are counted as
   *detected* corruption of application data. A rejuvenation (``xenpbr reboot`` of the
   running guest) extracts nothing by design (docs/resurrection.md), so after a silent
   fault the application starts empty: counted, not checked.

At the end of a run the guest is stopped cleanly and both disks are checked (``e2fsck``,
every acknowledged record on the data disk). Each injection is written to the report as
soon as it is classified, so a run that dies keeps what it measured; the next run adds to
the same report (seeds continue), and the summary is recomputed over all of them.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xenpbr.guestproto.reach import READY_KEY
from xenpbr.guestproto.resurrection import CAP_REASONS
from xenpbr.timeline import MARKS

from . import consistency, disks, xenpbrd
from .errors import CommandFailed, LabError, LabTimeout
from .resurrection_proof import LOADED_COUNT_RE, console_from, cycle_outcome
from .xl import LabDomain, xl_list

if TYPE_CHECKING:
    from .host import XenHost

log = logging.getLogger(__name__)

#: Guests are named f-1, f-2, ...: with ``guests > 1`` each runs its own injections in a
#: thread (an injection is mostly waiting out its observation window, so several guests
#: multiply the rate while xenpbrd serves them one event at a time).
GUEST_PREFIX = "f-"
MEMORY_MIB = 192
KINDS = ("stack", "text", "operand", "hang", "crash")
#: ``lkdtm:TYPE`` (any LKDTM crash type the guest's agent offers; lab.lkdtm=1 loads it).
LKDTM_PREFIX = "lkdtm:"
#: Kinds whose altered instruction the guest's reach-counter counts (``--count-runs``).
COUNTED_KINDS = ("text", "operand")


#: ``--kinds lkdtm``: LKDTM's types that model a fault in a running x86-64 kernel, in
#: source order (left out: the ones that only report or time something, REPORT_STACK*,
#: ATOMIC_TIMING, REFCOUNT_TIMING, and other architectures', DOUBLE_FAULT, CORRUPT_PAC,
#: PPC_SLB_MULTIHIT).
LKDTM_TYPES = (
    "PANIC BUG WARNING WARNING_MESSAGE EXCEPTION LOOP EXHAUST_STACK CORRUPT_STACK "
    "CORRUPT_STACK_STRONG UNALIGNED_LOAD_STORE_WRITE SOFTLOCKUP HARDLOCKUP SPINLOCKUP "
    "HUNG_TASK OVERFLOW_SIGNED OVERFLOW_UNSIGNED ARRAY_BOUNDS CORRUPT_LIST_ADD "
    "CORRUPT_LIST_DEL STACK_GUARD_PAGE_LEADING STACK_GUARD_PAGE_TRAILING UNSET_SMEP "
    "CFI_FORWARD_PROTO CFI_BACKWARD FORTIFY_STR_OBJECT FORTIFY_STR_MEMBER "
    "FORTIFY_MEM_OBJECT FORTIFY_MEM_MEMBER FORTIFY_STRSCPY SLAB_LINEAR_OVERFLOW "
    "VMALLOC_LINEAR_OVERFLOW WRITE_AFTER_FREE READ_AFTER_FREE WRITE_BUDDY_AFTER_FREE "
    "READ_BUDDY_AFTER_FREE SLAB_INIT_ON_ALLOC BUDDY_INIT_ON_ALLOC SLAB_FREE_DOUBLE "
    "SLAB_FREE_CROSS SLAB_FREE_PAGE WRITE_RO WRITE_RO_AFTER_INIT WRITE_KERN WRITE_OPD "
    "EXEC_DATA EXEC_STACK EXEC_KMALLOC EXEC_VMALLOC EXEC_RODATA EXEC_USERSPACE EXEC_NULL "
    "ACCESS_USERSPACE ACCESS_NULL REFCOUNT_INC_OVERFLOW REFCOUNT_ADD_OVERFLOW "
    "REFCOUNT_INC_NOT_ZERO_OVERFLOW REFCOUNT_ADD_NOT_ZERO_OVERFLOW REFCOUNT_DEC_ZERO "
    "REFCOUNT_DEC_NEGATIVE REFCOUNT_DEC_AND_TEST_NEGATIVE REFCOUNT_SUB_AND_TEST_NEGATIVE "
    "REFCOUNT_INC_ZERO REFCOUNT_ADD_ZERO REFCOUNT_INC_SATURATED REFCOUNT_DEC_SATURATED "
    "REFCOUNT_ADD_SATURATED REFCOUNT_INC_NOT_ZERO_SATURATED "
    "REFCOUNT_ADD_NOT_ZERO_SATURATED REFCOUNT_DEC_AND_TEST_SATURATED "
    "REFCOUNT_SUB_AND_TEST_SATURATED STACKLEAK_ERASING USERCOPY_SLAB_SIZE_TO "
    "USERCOPY_SLAB_SIZE_FROM USERCOPY_SLAB_WHITELIST_TO USERCOPY_SLAB_WHITELIST_FROM "
    "USERCOPY_STACK_FRAME_TO USERCOPY_STACK_FRAME_FROM USERCOPY_STACK_BEYOND "
    "USERCOPY_VMALLOC USERCOPY_FOLIO USERCOPY_KERNEL").split()


def expand_kinds(kinds: Sequence[str]) -> list[str]:
    """``--kinds``: ``lkdtm`` stands for every one of LKDTM_TYPES, in turn."""
    return [k for kind in kinds
            for k in ([LKDTM_PREFIX + t for t in LKDTM_TYPES] if kind == "lkdtm" else [kind])]


def known_kind(kind: str) -> bool:
    """A kind the campaign can inject: one of KINDS or ``lkdtm:TYPE``."""
    from xenpbr.guestproto.provoke import TYPE_NAME
    return kind in KINDS or (kind.startswith(LKDTM_PREFIX)
                             and TYPE_NAME.fullmatch(kind.removeprefix(LKDTM_PREFIX)) is not None)
#: Seconds Xen's watchdog waits for the guest's next kick (busybox kicks every 2 s: a
#: kernel that schedules no process for 10 kicks in a row has stopped).
WATCHDOG_S = 20
#: With ``liveness=True`` the guest has no watchdog: the agent beats every second and
#: xenpbrd's liveness check (xenpbr_liveness_timeout) declares a hang after this long.
LIVENESS_TIMEOUT_S = 15
#: A fault with no effect this long after the injection is classified silent. It must
#: exceed the watchdog (a hang is noticed only after WATCHDOG_S) with room to spare.
OBSERVE_S = 40.0
#: A hang detector, not a deadline: the writer is back within seconds when all is well.
SERVICE_WAIT_S = 600.0
#: Also a hang detector: a first boot captures three images, which takes longer the
#: bigger the guest (two 1.7 GB guests booting beside another lab took over 600 s).
BOOT_WAIT_S_PER_GIB = 1200.0
KALLSYMS = "/run/xenpbr-lab-kallsyms"
KALLSYMS_LINE = r"XENPBR-KALLSYMS: \d+"
ACK = r"XENPBR-WRITER: acked \d+"
#: What a kernel prints about a fault it survived (it kept running: the outcome is
#: still silent, but explained).
KERNEL_SAID = re.compile(r"(BUG: .*|kernel BUG at .*|Oops: .*|general protection fault.*|"
                         r"WARNING: CPU.*|watchdog: .*|INFO: task .* blocked.*|"
                         r"UBSAN: .*|refcount_t: .*|lkdtm: (?:X?FAIL|Unexpected|Good).*|"
                         r"Kernel panic.*)")
FIRST_SEED = 1000
#: The key-value application's load: writes/s over this many keys (each write one console
#: line: the console is read from an offset, never whole).
APP_KEYS = 20
APP_RATE = 5


def _guest(host: XenHost, name: str, memory_mib: int, liveness: bool,
           lkdtm: bool = False) -> LabDomain:
    """The campaign's guest: hangs caught by Xen's watchdog, or with *liveness* by
    xenpbrd's liveness check on the agent's heartbeat (and no watchdog at all); with
    *lkdtm*, LKDTM loaded and the agent's provoke-listener running."""
    made = disks.make_disks(host, name)
    hang_detector = ({"xenpbr_liveness_timeout": LIVENESS_TIMEOUT_S} if liveness else {})
    return LabDomain(host, name, memory_mib=memory_mib, mode="consist",
                     on_crash="phasereboot", on_watchdog="phasereboot",
                     # loglevel=5 after xl.py's "quiet": the kernel's warnings (WARN,
                     # refcount, UBSAN) reach the console and explain silent faults
                     extra=("lab.root=/dev/xvda lab.hazard=none lab.kallsyms=1 oops=panic "
                            "loglevel=5 "
                            f"lab.keys={APP_KEYS} lab.rate={APP_RATE} lab.reach=1 "
                            + ("lab.lkdtm=1 " if lkdtm else "")
                            + ("lab.heartbeat=1" if liveness else f"lab.watchdog={WATCHDOG_S}")),
                     xenpbr_resurrect=1, **hang_detector,
                     disk=made.specs, xenpbr_disks=["xvda=snapshot", "xvdb=persistent"],
                     # faults crash the guest again and again, on purpose: never let the
                     # crash-loop guard abandon the app image for them
                     xenpbr_crash_loop_window=1, xenpbr_healthy_after=0,
                     xenpbr_image_failures=100)


def _boot(host: XenHost, guest: LabDomain) -> None:
    """Create the guest under xenpbr; wait for its last phase, its writer and its
    symbols; copy the symbols into dom0 for the injector (every guest runs the same
    kernel: the first one's serve all)."""
    guest.write_config()
    xenpbrd.cli(host, "create", guest.config_path)
    memory_mib = int(guest.config["memory"])  # type: ignore[call-overload]
    quiet = max(SERVICE_WAIT_S, BOOT_WAIT_S_PER_GIB * memory_mib / 1024)
    for pattern in (consistency.LAST_BOUNDARY, consistency.WRITER_START, KALLSYMS_LINE,
                    LOADED_COUNT_RE):
        _await_line(guest, pattern, quiet)  # in any order
    if host.run(["test", "-s", KALLSYMS], check=False).rc == 0:
        return
    data = f"{disks.DISK_DIR}/{guest.name}-data.img"
    host.run(["debugfs", "-R", f"dump /kallsyms {KALLSYMS}", data], timeout=300)
    lines = int(host.run(["wc", "-l", KALLSYMS]).stdout.split()[0])
    log.info("guest kernel symbols: %d lines in dom0's %s", lines, KALLSYMS)


def _await_line(guest: LabDomain, pattern: str, quiet_s: float) -> None:
    """Wait for *pattern* on the console. A hang detector, not a deadline: it gives up
    only after *quiet_s* in which neither the pattern nor any new output appeared (a
    guest dumping its symbols beside two other labs took over 600 s, printing all along)."""
    while True:
        seen = guest.console_size()
        try:
            guest.watch_console([pattern], timeout=quiet_s)
            return
        except LabTimeout:
            if guest.console_size() == seen:
                raise
            log.info("%s: no %r yet after %.0f s, but its console moves: waiting on",
                     guest.name, pattern, quiet_s)


def _history(host: XenHost, name: str) -> list[dict[str, Any]]:
    return list(xenpbrd.cli(host, "history", name))


def _wall(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _inject(host: XenHost, name: str, kind: str, seed: int) -> dict[str, Any]:
    if kind.startswith(LKDTM_PREFIX):
        _await_offer(host, name)
    args = ["inject", name, "--fault", kind]
    if kind != "crash" and not kind.startswith(LKDTM_PREFIX):
        args += ["--seed", str(seed), "--system-map", KALLSYMS]
    if kind in COUNTED_KINDS:
        _await_key(host, name, READY_KEY, "reach-counter")  # lab.reach=1 starts it
        args += ["--count-runs"]
    # a hang detector, not a deadline: with --count-runs the command waits up to its
    # --wait (120 s) for the guest's counter, which a loaded machine may need
    return dict(xenpbrd.cli(host, *args, timeout=SERVICE_WAIT_S))


def _await_key(host: XenHost, name: str, key: str, who: str) -> str:
    """The value of *name*'s xenstore *key*, once its agent's *who* wrote it (these
    start after the last phase, so after a recovery they may not be up yet); a hang
    detector, not a deadline."""
    deadline = time.monotonic() + SERVICE_WAIT_S
    script = f'xenstore-read "/local/domain/$(xl domid {name})/{key}"'
    while (done := host.run(script, check=False, timeout=300)).rc != 0:
        if time.monotonic() > deadline:
            raise LabTimeout(f"{name}'s {who} wrote no {key} within "
                             f"{SERVICE_WAIT_S:.0f} s (its console says why)")
        time.sleep(1.0)
    return done.stdout.strip()


#: A function each campaign guest runs all the time (its writer, its application and the
#: console write), for the reach-counter's check before the first injection.
REACH_CHECK_SYMBOL = "vfs_write"
REACH_CHECK_S = 5.0


def reach_check(host: XenHost, name: str) -> dict[str, Any]:
    """Proof that the guest's reach-counter counts on this kernel: a counter on
    :data:`REACH_CHECK_SYMBOL`, its hits after :data:`REACH_CHECK_S` seconds (more than
    0, or the counts that explain silent faults mean nothing)."""
    from xenpbr.guestproto.reach import ANSWER_KEY, REQUEST_KEY, ReachRequest, parse_answer
    found = host.run(["awk", f'$3 == "{REACH_CHECK_SYMBOL}" {{ print $1; exit }}', KALLSYMS])
    address = int(found.stdout.strip(), 16)
    _await_key(host, name, READY_KEY, "reach-counter")
    home = f"/local/domain/$(xl domid {name})"
    host.run(f'xenstore-write "{home}/{REQUEST_KEY}" "{ReachRequest(1, address).encode()}"')
    _await_key(host, name, ANSWER_KEY, "reach-counter")
    time.sleep(REACH_CHECK_S)
    answer = parse_answer(host.run(f'xenstore-read "{home}/{ANSWER_KEY}"').stdout.strip()
                          .encode())
    log.info("%s: reach-counter on %s: %s", name, REACH_CHECK_SYMBOL, answer.encode())
    return {"symbol": REACH_CHECK_SYMBOL, "address": f"{address:#x}",
            "seconds": REACH_CHECK_S, "state": answer.state.value, "hits": answer.hits,
            "reason": answer.reason}


def _after_window(host: XenHost, name: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """What became of a silent memory fault by the end of its window (``xenpbr
    fault-check``: its bytes now, and how often an altered instruction ran)."""
    if not row["change"]:
        return None
    try:
        checked = dict(xenpbrd.cli(host, "fault-check", name, timeout=SERVICE_WAIT_S))
    except CommandFailed as exc:  # the guest changed under the check (a late crash)
        log.warning("%s: fault-check failed: %s", name, exc)
        return {"bytes": None, "now": None, "reach": None, "error": str(exc)[-300:]}
    return {"bytes": checked["bytes"], "now": checked["now"], "reach": checked["reach"]}


def _await_offer(host: XenHost, name: str) -> set[str]:
    """The LKDTM types *name*'s provoke-listener offers, once it does (is LKDTM loaded?
    the console says)."""
    from xenpbr.guestproto.provoke import OFFER_KEY, parse_offer
    return set(parse_offer(_await_key(host, name, OFFER_KEY, "provoke-listener").encode()))


def _agent_said(host: XenHost, name: str) -> str | None:
    """The state of the provoke-listener's last answer (``started``: the write to LKDTM
    has not returned), or None if there is none or it is not readable."""
    from xenpbr.guestproto.provoke import TAKEN_KEY, ProvokeMalformed, parse_taken
    done = host.run(f'xenstore-read "/local/domain/$(xl domid {name})/{TAKEN_KEY}"',
                    check=False, timeout=300)
    try:
        return parse_taken(done.stdout.strip().encode()).state.value if done.rc == 0 else None
    except ProvokeMalformed:
        return None


def _check_offer(host: XenHost, name: str, kinds: Sequence[str]) -> None:
    """Before the first injection: every lkdtm:TYPE asked for is one the guest offers."""
    wanted = {k.removeprefix(LKDTM_PREFIX) for k in kinds if k.startswith(LKDTM_PREFIX)}
    missing = sorted(wanted - _await_offer(host, name)) if wanted else []
    if missing:
        raise LabError(f"{name}'s LKDTM has no {', '.join(missing)}: drop them from --kinds")


def _await_recovery(host: XenHost, name: str, seen: int,
                    observe_s: float) -> dict[str, Any] | None:
    """The first recovery xenpbrd records after the *seen* ones, or None if none starts
    within *observe_s* (one that has started is waited for, however long it takes)."""
    deadline = time.monotonic() + observe_s
    while True:
        history = _history(host, name)
        if len(history) > seen and history[seen].get("outcome") != "in-progress":
            return history[seen]
        if (time.monotonic() > deadline and len(history) == seen
                and not _recovering(host, name) and not _down(host, name)
                and len(_history(host, name)) == seen):  # none ended while we looked
            return None
        time.sleep(1.0)


def _down(host: XenHost, name: str) -> bool:
    """The domain crashed or its watchdog fired and xenpbrd has not started on it yet
    (it serves one recovery at a time: another guest's may hold it up)."""
    entry = xl_list(host).get(name)
    return entry is None or "s" in entry.state


def _recovering(host: XenHost, name: str) -> bool:
    """A recovery of *name* is under way: its intent is on record (from before the
    destroy until after its timeline is in the history; the restored guest runs a
    moment before that, longer on a loaded machine)."""
    intent = f"{xenpbrd.STATE}/domains/{name}/recovering.json"
    return host.run(["test", "-e", intent], check=False).rc == 0


def _kernel_said(console: str) -> list[str]:
    return [m.group(1).strip()[:160] for m in KERNEL_SAID.finditer(console)][:5]


def _service_back(guest: LabDomain, after: int) -> bool:
    """Whether the writer started again after console offset *after* (the restore) and
    acknowledged a record after that (waits up to SERVICE_WAIT_S: a hang detector)."""
    try:
        guest.watch_console([consistency.WRITER_START, ACK], after=after,
                            timeout=SERVICE_WAIT_S)
    except LabTimeout:
        return False
    return True


def _app_outcome(guest: LabDomain, since: int, injected: int,
                 recovery: dict[str, Any] | None) -> dict[str, Any]:
    """The key-value application after this injection's recovery: its acknowledged writes
    (console from *since*, before its current run started, to the injection at
    *injected*) against what it loaded when it started again, and what dom0's extraction
    kept and rejected (the recovery's history entry; none for a rejuvenation)."""
    try:
        guest.watch_console([LOADED_COUNT_RE], after=injected, timeout=SERVICE_WAIT_S)
    except LabTimeout:
        return {"restarted": False}
    outcome = cycle_outcome(console_from(guest, since), 0, injected - since, APP_KEYS)
    extracted = [a for a in (recovery or {}).get("resurrection", []) if a.get("app") == "kvdemo"]
    return {"restarted": True, "expected": recovery is not None,
            "acked_writes": outcome["acked_writes"], "loaded": outcome["loaded"],
            "lost_keys": outcome["lost_keys"], "lost": outcome["lost"],
            "kept_records": sum(a.get("records", 0) for a in extracted),
            "extract_s": round(sum(a.get("seconds", 0.0) for a in extracted), 3),
            "rejected": {k: v for a in extracted for k, v in a.get("rejected", {}).items()}}


def inject_once(host: XenHost, guest: LabDomain, n: int, kind: str, seed: int,
                observe_s: float, since: int = 0) -> dict[str, Any]:
    """One injection, classified, with the guest back in service (or said not to be).
    *since*: a console offset before the key-value application's current run (the
    previous injection's)."""
    offset, seen = guest.console_size(), len(_history(host, guest.name))
    record = _inject(host, guest.name, kind, seed)
    injected = _wall(record["injected_at"])
    recovery = _await_recovery(host, guest.name, seen, observe_s)
    console = console_from(guest, offset)
    row: dict[str, Any] = {"n": n, "guest": guest.name, "kind": kind, "seed": record["seed"],
                           "console_offset": offset,
                           "change": record["change"], "paused_s": record["paused_s"],
                           "provoked": record.get("provoked"), "reach": record.get("reach"),
                           "kernel_said": _kernel_said(console)}
    if recovery is None:
        row["outcome"] = "silent"
        row["detected_s"] = None
        if row["provoked"]:  # what the agent said last: did LKDTM's write ever return?
            row["provoked"]["after_window"] = _agent_said(host, guest.name)
        row["after_window"] = _after_window(host, guest.name, row)
        rebooted = xenpbrd.cli(host, "reboot", guest.name, timeout=SERVICE_WAIT_S)
        row["recovered_by"] = f"rejuvenated: {rebooted.get('method')}"
        row["recovery_outcome"] = rebooted.get("outcome")
        row["downtime_s"] = rebooted.get("downtime_s")
    else:
        row["outcome"] = "hang" if recovery.get("trigger") == "watchdog" else recovery.get(
            "trigger")
        row["detected_s"] = round(recovery["marks"][0]["wall"] - injected, 3)
        row["recovered_by"] = recovery.get("method")
        row["recovery_outcome"] = recovery.get("outcome")
        row["downtime_s"] = recovery.get("downtime_s")
    row["service_back"] = _service_back(guest, offset)
    # read again now the guest is back: its ack and ready marks come after the recovery
    history = _history(host, guest.name)
    if len(history) > seen:
        row["stages_s"] = stages(history[seen].get("since_crash") or {})
    row["app"] = _app_outcome(guest, since, offset, recovery)
    return row


def _stop_and_check(host: XenHost, guest: LabDomain) -> dict[str, Any]:
    """Stop the guest as a clean shutdown would leave its disks; check them."""
    said = host.run(f"grep -ao 'XENPBR-WRITER: acked [0-9]*' {guest.console_log}",
                    check=False, timeout=300).stdout
    consistency._stop_cleanly(host, guest)
    root, data = (f"{disks.DISK_DIR}/{guest.name}-{kind}.img" for kind in ("root", "data"))
    root_clean, root_said = disks.fsck(host, root)
    data_clean, data_said = disks.fsck(host, data)
    acked = {int(n) for n in consistency.ACKED.findall(said)}
    on_disk = [int(n) for n in consistency.RECORD.findall(disks.read_file(host, data,
                                                                           "/records"))]
    return {"acked_records": len(acked), "lost_records": len(acked - set(on_disk)),
            "duplicate_records": len(on_disk) - len(set(on_disk)),
            "fsck_root_clean": root_clean, "fsck_data_clean": data_clean,
            "fsck_root": root_said.splitlines()[-1:], "fsck_data": data_said.splitlines()[-1:]}


def load_report(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {"runs": [], "injections": []}
    report = json.loads(path.read_text())
    report.setdefault("runs", [])
    report.setdefault("injections", [])
    return dict(report)


def run_campaign(host: XenHost, count: int, kinds: Sequence[str] = KINDS, *,
                 memory_mib: int = MEMORY_MIB, observe_s: float = OBSERVE_S, guests: int = 1,
                 liveness: bool = False,
                 report_path: Path | None = None, command: str = "",
                 progress: Callable[[str], None] = lambda line: None,
                 evidence: Path | None = None) -> dict[str, Any]:
    """Run *count* injections (kinds in turn) in a booted lab, spread over *guests*
    guests, adding them to the report at *report_path* (written after each one);
    return the report."""
    from .bench import machine
    report = load_report(report_path)
    run: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "command": command, "guest_memory_mib": memory_mib,
                           "guests": guests, "observe_s": observe_s,
                           "hang_detector": (f"xenpbrd liveness check, {LIVENESS_TIMEOUT_S} s"
                                             if liveness else f"Xen watchdog, {WATCHDOG_S} s"),
                           "machine": machine(), "injections": 0, "checks": {}}
    report["runs"].append(run)
    numbers = _Numbers(len(report["injections"]), count)
    lock = threading.Lock()

    def record(row: dict[str, Any]) -> None:
        with lock:
            row.update(run=len(report["runs"]), guest_memory_mib=memory_mib)
            report["injections"].append(row)
            run["injections"] += 1
            _save(report, report_path)
        progress(_line(row))

    xenpbrd.start(host)
    made: list[LabDomain] = []
    try:
        for i in range(1, guests + 1):
            made.append(_guest(host, f"{GUEST_PREFIX}{i}", memory_mib, liveness,
                               lkdtm=any(k.startswith(LKDTM_PREFIX) for k in kinds)))
            _boot(host, made[-1])
            _check_offer(host, made[-1].name, kinds)
            run.setdefault("reach_check", {})[made[-1].name] = reach_check(host, made[-1].name)
        _in_threads([functools.partial(_inject_until_done, host, g, numbers, kinds,
                                       observe_s, record) for g in made])
        for guest in made:
            run["checks"][guest.name] = _stop_and_check(host, guest)
    finally:
        for guest in made:
            if evidence is not None:
                evidence.mkdir(parents=True, exist_ok=True)
                (evidence / f"{guest.name}.console.log").write_text(guest.console())
            try:
                guest.destroy()
            except LabError as exc:  # never hide the error that ended the run
                log.error("could not destroy %s: %s", guest.name, exc)
        log_text = xenpbrd.stop(host)
        if evidence is not None:
            (evidence / "xenpbrd.log").write_text(log_text)
        host.run(f"rm -rf {xenpbrd.STATE} {disks.DISK_DIR}/{GUEST_PREFIX}* {KALLSYMS}",
                 check=False)
        with lock:
            _save(report, report_path)
    return report


#: Set (``xenpbr-lab faults`` does on SIGINT/SIGTERM) to start no further injection: the
#: ones under way finish, and the run ends with its disk checks, as after its count.
STOP = threading.Event()


class _Numbers:
    """Hands out the report's next injection numbers to the guests' threads."""

    def __init__(self, done: int, count: int) -> None:
        self._next, self._last = done + 1, done + count
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next > self._last or STOP.is_set():
                return None
            self._next += 1
            return self._next - 1


def _inject_until_done(host: XenHost, guest: LabDomain, numbers: _Numbers,
                       kinds: Sequence[str], observe_s: float,
                       record: Callable[[dict[str, Any]], None]) -> None:
    since = 0
    while (n := numbers.take()) is not None:
        row = inject_once(host, guest, n, kinds[(n - 1) % len(kinds)], FIRST_SEED + n,
                          observe_s, since)
        since = row["console_offset"]
        record(row)


def _in_threads(jobs: list[Callable[[], None]]) -> None:
    """Run *jobs* at once; re-raise the first failure once all have ended."""
    errors: list[BaseException] = []

    def wrap(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller
            # logged here: the caller's cleanup may fail too and hide it (a run died
            # with only "xl destroy f-1 (timed out)" to show, 2026-12-08)
            log.exception("%s failed", threading.current_thread().name)
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _where(row: dict[str, Any]) -> str:
    """Where the fault was: the symbol changed, the agent's answer to an LKDTM
    request, or sysrq c."""
    if row.get("provoked"):
        said = row["provoked"]["taken"] or "no answer"
        later = row["provoked"].get("after_window")
        return f"agent: {said}" + (f", then {later}" if later and later != said else "")
    return str((row["change"] or {}).get("symbol", "sysrq c"))


def _line(row: dict[str, Any]) -> str:
    where = f" at {_where(row)}" if row["change"] or row.get("provoked") else ""
    detected = f" detected in {row['detected_s']:.1f} s" if row["detected_s"] else ""
    return (f"#{row['n']} {row['kind']}{where}: {row['outcome']}{detected}, "
            f"recovered by {row['recovered_by']}, service "
            f"{'back' if row['service_back'] else 'NOT BACK'}")


def stages(since_crash: dict[str, Any]) -> dict[str, float]:
    """Seconds between consecutive marks of one recovery (``"destroyed->restore_started"``),
    over the timeline's marks (:data:`xenpbr.timeline.MARKS`) it has, in time order."""
    present = sorted((m for m in MARKS if isinstance(since_crash.get(m), (int, float))),
                     key=lambda m: since_crash[m])
    return {f"{a}->{b}": round(since_crash[b] - since_crash[a], 3)
            for a, b in zip(present, present[1:])}


def _stage_medians(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """outcome -> guest memory (MiB) -> stage -> median seconds, over the rows that
    recorded their stages (runs before 2026-12-07 did not)."""
    grouped: dict[tuple[str, str], dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    for row in rows:
        for stage, seconds in (row.get("stages_s") or {}).items():
            grouped[(row["outcome"], str(row["guest_memory_mib"]))][stage].append(seconds)
    out: dict[str, dict[str, dict[str, float]]] = collections.defaultdict(dict)
    for (outcome, memory), by_stage in sorted(grouped.items()):
        out[outcome][memory] = {k: round(statistics.median(v), 2) for k, v in by_stage.items()}
        out[outcome][memory]["n"] = max(len(v) for v in by_stage.values())
    return dict(out)


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Counts over every injection of every run: by kind and outcome, recovery methods,
    detection times, service and data checks."""
    rows = report["injections"]
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in rows:
        by_kind[row["kind"]][row["outcome"]] += 1
    detected = collections.defaultdict(list)
    for row in rows:
        if row["detected_s"] is not None:
            detected[row["outcome"]].append(row["detected_s"])
    checks = [c for r in report["runs"] for c in _run_checks(r)]
    checked_runs = {i for i, r in enumerate(report["runs"], 1) if _run_checks(r)}
    apps = [r["app"] for r in rows if "app" in r]  # rows of runs with the application
    carried = [a for a in apps if a.get("expected")]
    return {
        "injections": len(rows),
        "by_memory_mib": dict(collections.Counter(str(r["guest_memory_mib"]) for r in rows)),
        # injections whose run ended with its disk checks (a run stopped hard has none)
        "disks_checked_by_memory_mib": dict(collections.Counter(
            str(r["guest_memory_mib"]) for r in rows if r.get("run") in checked_runs)),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "outcomes": dict(collections.Counter(r["outcome"] for r in rows)),
        "recovered_by": dict(collections.Counter(r["recovered_by"] for r in rows)),
        "service_back": sum(r["service_back"] for r in rows),
        "detection_s": {k: _spread(v, digits=2) for k, v in sorted(detected.items())},
        "silent_with_kernel_message": sum(1 for r in rows
                                          if r["outcome"] == "silent" and r["kernel_said"]),
        "silent_why": _silent_reasons(rows),
        "acked_records": sum(c["acked_records"] for c in checks),
        "lost_records": sum(c["lost_records"] for c in checks),
        "duplicate_records": sum(c["duplicate_records"] for c in checks),
        "fsck_clean_runs": sum(c["fsck_root_clean"] and c["fsck_data_clean"] for c in checks),
        "checked_runs": len(checks),
        "app_injections": len(apps),
        "app_restarted": sum(bool(a.get("restarted")) for a in apps),
        "app_checked": len(carried),
        "app_all_keys_back": sum(bool(a.get("restarted")) and a["lost_keys"] == 0
                                 for a in carried),
        "app_keys_lost": sum(a.get("lost_keys", 0) for a in carried),
        "app_detected_corruption": sum(bool(_corruption(a)) for a in carried),
        "app_cut_by_caps": sum(bool(set(a.get("rejected", {})) & CAP_REASONS)
                               for a in carried),
        "app_extract_s": _spread([a["extract_s"] for a in carried if "extract_s" in a]),
        "stages_s": _stage_medians(rows),
    }


#: Why a silent fault showed nothing, as far as the run could tell (:func:`why_silent`).
NOT_EXAMINED = "not examined (a run before these checks)"


def why_silent(row: dict[str, Any]) -> str:
    """The explanation one silent injection's record supports: what the kernel printed,
    what LKDTM's write did, whether the altered instruction ever ran (its kprobe count),
    or what became of the altered bytes."""
    if row["kernel_said"]:
        return "the kernel printed a warning and went on"
    if row.get("provoked"):
        if "after_window" not in row["provoked"]:  # runs before the agent was asked
            return NOT_EXAMINED
        state = row["provoked"]["after_window"]
        return {"returned": "LKDTM's write returned: the kernel lived through it",
                "started": "LKDTM's write never returned (its thread stuck, the rest ran)"
                }.get(state or "", f"LKDTM's write: {state or 'no answer'}")
    after = row.get("after_window")
    if not after:
        return NOT_EXAMINED
    if after.get("error"):
        return "not examined: the check failed (the guest changed under it)"
    reach = after.get("reach") or {}
    if reach.get("state") == "counting":
        return ("the altered instruction never ran" if reach.get("hits") == 0 else
                "the altered instruction ran, without visible effect")
    return {"in-place": "the altered bytes were still in place, unused or harmless",
            "overwritten": "the altered bytes were overwritten before they mattered",
            "original": "the kernel put the original bytes back",
            "gone": "the domain was gone before the check"}[after["bytes"]]


def _silent_reasons(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """For each kind, how many silent injections each explanation covers."""
    reasons: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in rows:
        if row["outcome"] == "silent":
            reasons[row["kind"].split(":")[0]][why_silent(row)] += 1
    return {kind: dict(counts.most_common()) for kind, counts in sorted(reasons.items())}


def _corruption(app: dict[str, Any]) -> dict[str, int]:
    """The application's records dom0 rejected for what they held (checksums, format)."""
    return {k: v for k, v in app.get("rejected", {}).items() if k not in CAP_REASONS}


def _spread(values: list[float], digits: int = 3) -> dict[str, float] | None:
    """Count, median and max of *values* (None if there are none: older runs did not
    time extraction)."""
    if not values:
        return None
    return {"n": len(values), "median": round(statistics.median(values), digits),
            "max": max(values)}


def _app_cell(row: dict[str, Any]) -> str:
    app = row.get("app")
    if app is None:
        return "-"
    if not app.get("restarted"):
        return "NOT RESTARTED"
    if not app.get("expected"):
        return f"not carried (rejuvenation), {app['acked_writes']} acked"
    rejected = ", ".join(f"{k} x{v}" for k, v in sorted(app.get("rejected", {}).items()))
    return (f"{app['acked_writes']} acked, {app['loaded']} loaded, "
            f"**{app['lost_keys']}** keys lost" + (f", rejected {rejected}" if rejected else ""))


def _extract_time(spread: dict[str, float] | None) -> str:
    if spread is None:
        return ""
    return (f", extraction took median {spread['median']} s, at most {spread['max']} s "
            f"(n={spread['n']})")


def _stages_markdown(medians: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Where a recovery's time went: per outcome and guest memory, the median seconds
    between consecutive marks of its timeline (a silent fault's is the rejuvenation)."""
    if not medians:
        return []
    lines = ["## Where a recovery's time goes", "",
             "Median seconds between consecutive marks of the recovery's timeline "
             "(`xenpbr history`), read once the guest was back; a silent fault's recovery "
             "is its rejuvenation. Recorded by the runs after the tenth.", ""]
    for outcome, by_memory in sorted(medians.items()):
        columns = sorted({k for stages_ in by_memory.values() for k in stages_ if k != "n"},
                         key=_stage_order)
        lines += [f"{outcome}:", "", "| memory MiB | n | " + " | ".join(
                      f"`{c}`" for c in columns) + " |",
                  "|---:|---:|" + "---:|" * len(columns)]
        for memory, by_stage in sorted(by_memory.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {memory} | {int(by_stage['n'])} | " + " | ".join(
                str(by_stage.get(c, "")) for c in columns) + " |")
        lines.append("")
    return lines


def _stage_order(stage: str) -> tuple[int, int]:
    """``"a->b"`` sorts by where its marks come in a timeline."""
    order = {m: i for i, m in enumerate(MARKS)}
    start, _, end = stage.partition("->")
    return order.get(start, len(order)), order.get(end, len(order))


def _run_checks(run: dict[str, Any]) -> list[dict[str, Any]]:
    checks = run.get("checks") or {}
    return [checks] if "lost_records" in checks else list(checks.values())


def _save(report: dict[str, Any], path: Path | None) -> None:
    report["summary"] = summarise(report)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(report))


def _reach_checked(run: dict[str, Any]) -> str:
    checked = run.get("reach_check") or {}
    said = [f"{name} {c['symbol']} {c['hits']} runs in {c['seconds']:g} s"
            if c["state"] == "counting" else f"{name} refused ({c['reason']})"
            for name, c in sorted(checked.items())]
    return f"; reach-counter check: {', '.join(said)}" if said else ""


def _silent_cell(row: dict[str, Any]) -> str:
    if row["outcome"] != "silent":
        return ""
    why = why_silent(row)
    reach = (row.get("after_window") or {}).get("reach") or {}
    if reach.get("state") == "counting" and reach.get("hits"):
        why += f" ({reach['hits']} times)"
    return why


def _silent_markdown(reasons: dict[str, dict[str, int]]) -> list[str]:
    """The section saying why silent faults showed nothing, per kind."""
    if not reasons:
        return []
    lines = ["## Why silent faults showed nothing", "",
             "After each silent fault's window, before the rejuvenation: what the kernel "
             "printed, what LKDTM's write did, how often the altered instruction ran (a "
             "kprobe the guest's agent armed on it, `xenpbr inject --count-runs`) or what "
             "became of the altered bytes (`xenpbr fault-check`).", "",
             "| kind | why | injections |", "|---|---|---:|"]
    for kind, counts in reasons.items():
        lines += [f"| {kind} | {why} | {n} |" for why, n in counts.items()]
    return lines + [""]


def markdown(report: dict[str, Any]) -> str:
    """The report as docs/faults/report.md shows it."""
    s = report["summary"]
    lines = ["# Fault campaign (generated by `xenpbr-lab faults`; do not edit)", "",
             f"{s['injections']} injections over {len(report['runs'])} run(s); guest "
             f"memory (MiB: injections) {s['by_memory_mib']}, of which in runs that ended "
             f"with their disk checks {s['disks_checked_by_memory_mib']}.", "",
             f"- back in service: **{s['service_back']} of {s['injections']}**",
             f"- acknowledged records: {s['acked_records']}, lost: **{s['lost_records']}**, "
             f"duplicated: {s['duplicate_records']}",
             f"- guests whose two disks passed e2fsck at the end of their run: "
             f"{s['fsck_clean_runs']} of {s['checked_runs']} checked",
             f"- key-value application (resurrection; {s.get('app_injections', 0)} "
             f"injections ran it): restarted after {s.get('app_restarted', 0)}; after the "
             f"{s.get('app_checked', 0)} crashes and hangs, every key back with its last "
             f"acknowledged value after **{s.get('app_all_keys_back', 0)}**, keys lost "
             f"**{s.get('app_keys_lost', 0)}**, records rejected by dom0 (detected "
             f"corruption) after {s.get('app_detected_corruption', 0)}, region cut off "
             f"by dom0's caps (time or size) after {s.get('app_cut_by_caps', 0)}"
             f"{_extract_time(s.get('app_extract_s'))}; after silent faults "
             "the rejuvenation carries nothing (by design)", "",
             "| kind | " + " | ".join(("crash", "hang", "silent")) + " |", "|---|---|---|---|"]
    for kind, counts in s["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0))
                                                for o in ("crash", "hang", "silent")) + " |")
    lines += ["", "Recovered by: " + ", ".join(f"{k} {v}" for k, v in
                                              sorted(s["recovered_by"].items(),
                                                     key=lambda kv: str(kv[0]))), "",
              "Detection time, injection to xenpbrd seeing it (s): " + ", ".join(
                  f"{k}: median {v['median']}, max {v['max']} (n={v['n']})"
                  for k, v in s["detection_s"].items()), "",
              *_stages_markdown(s.get("stages_s") or {}),
              *_silent_markdown(s.get("silent_why") or {}),
              "## Injections", "",
              "| # | guest | kind | where | bytes | outcome | detected s | recovered by | "
              "downtime s | service back | application data | kernel said | why silent |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["injections"]:
        c = r["change"] or {}
        lines.append(f"| {r['n']} | {r.get('guest', 'f-main')} | {r['kind']} | "
                     f"{_where(r)} | "
                     f"{c.get('old', '')}→{c.get('new', '')} | {r['outcome']} | "
                     f"{r['detected_s'] if r['detected_s'] is not None else '-'} | "
                     f"{r['recovered_by']} | {r.get('downtime_s')} | "
                     f"{'yes' if r['service_back'] else 'NO'} | {_app_cell(r)} | "
                     f"{'; '.join(r['kernel_said'])[:120].replace('|', '/')} | "
                     f"{_silent_cell(r)} |")
    lines += ["", "## Runs", ""]
    for i, run in enumerate(report["runs"], 1):
        m = run.get("machine", {})
        checks = _run_checks(run)
        verdict = (f"lost records {sum(c['lost_records'] for c in checks)}, e2fsck clean "
                   f"{sum(c['fsck_root_clean'] and c['fsck_data_clean'] for c in checks)} of "
                   f"{len(checks)} guests" if checks else "disks not checked (run ended early)")
        lines.append(f"{i}. {run['started']} `{run['command']}`: {run['injections']} "
                     f"injections into {run.get('guests', 1)} guest(s) of "
                     f"{run['guest_memory_mib']} MiB; {verdict}; machine {m.get('cpu')}, "
                     f"{m.get('cpus')} CPUs, {m.get('accelerator')}{_reach_checked(run)}")
    return "\n".join(lines) + "\n"
