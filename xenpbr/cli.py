"""``xenpbr``: create domains with phase-based reboot, inspect and act on them.

Every command prints a readable table and takes ``--json`` for automation. Commands
read xenpbr's state directory directly; those that act on a domain (``reboot``,
``forget``) take the same per-domain lock as the daemon, so they never race a capture
or a recovery. The ``--json`` shapes are a contract: ``docs/cli-json.md``.

Exit codes: 0 success; 1 runtime failure (an error of xenpbr, a missing ``xl``, an
unusable state directory: one line on stderr saying what to do); 2 usage error (bad
arguments); 141 when the reader of the output went away (``xenpbr history D | head``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from xenpbr import __version__, domconfig, settings
from xenpbr.errors import XenpbrError
from xenpbr.render import age_of, emit, local_time, table, utc
from xenpbr.state import StateDir

if TYPE_CHECKING:
    from xenpbr.images.store import ImageStore
    from xenpbr.phases import DomainPhases
    from xenpbr.timeline import Timeline

#: A subcommand: ``xenpbr COMMAND`` runs ``func(args, state)`` and exits with its result.
Command = Callable[[argparse.Namespace, StateDir], int]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PIPE = 0, 1, 2, 141
EXIT_CODES = """exit codes:
  0    success
  1    runtime failure (xenpbr error, no xl, unusable state directory)
  2    usage error (bad arguments)
  141  the reader of the output went away (| head)"""


class UnknownPhase(XenpbrError):
    """An operator named a phase the domain does not declare (a typo, usually)."""


def plain(text: str | None) -> str:
    """Docstring text without reST markup (``x``, :meth:`y`), for ``--help``."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text or "")
    text = text.replace("``", "").replace("`", "")
    return textwrap.fill(" ".join(text.split()), 79)


def _store(state: StateDir) -> ImageStore:
    from xenpbr.images.store import ImageStore
    from xenpbr.settings import current
    return ImageStore(state.images_root, default_quota=current().image_quota)


def cmd_create(args: argparse.Namespace, state: StateDir) -> int:
    """Register the domain and create it with xl (phasereboot translated to preserve).

    The registration is kept only if xl succeeds; otherwise xl's message is the error and
    nothing is registered. A name xenpbr manages already is refused unless --update is
    given: the new settings replace the old, and the images whose fingerprint still
    matches the new config stay valid (the others are recaptured at the next boundary).
    A read-write disk of a phasereboot domain needs a policy in xenpbr_disks."""
    from xenpbr import lifecycle
    row = lifecycle.create(Path(args.config), state, paused=args.paused, update=args.update)
    emit(row, args.json, lambda: print(
        f"{'updated' if row['updated'] else 'created'} {row['name']} (uuid {row['uuid']}, "
        f"xl config {row['xl_config']}); on_crash = {row['on_crash']}, on_watchdog = "
        f"{row['on_watchdog']}; disks: {_policies_text(row['disk_policies'])}"))
    return 0


def _policies_text(policies: dict[str, str]) -> str:
    return ", ".join(f"{vdev}={policy}" for vdev, policy in policies.items()) or "none"


def cmd_check(args: argparse.Namespace, state: StateDir) -> int:
    """Validate an xl config without acting: its grammar, the xenpbr_* keys, the disk
    policies, then xl's own dry run (xl -N create) of the translated config. Exit 0 if
    valid, 1 if not (the errors say what to change)."""
    from xenpbr import lifecycle
    report = lifecycle.check(Path(args.config))
    emit(report, args.json, lambda: print(_check_text(report)))
    return 0 if report["valid"] else 1


def _check_text(report: dict[str, Any]) -> str:
    if not report.get("name") or report["errors"] and not report.get("translated_config"):
        return "\n".join(f"{report['config']}: invalid: {e}" for e in report["errors"])
    lines = [f"{report['config']}: {'valid' if report['valid'] else 'INVALID'}",
             f"  name            {report['name']}",
             *(f"  {key:<15} {value}" for key, value in report["actions"].items()),
             f"  disk policies   {_policies_text(report['disk_policies'])}",
             f"  uuid            {report['uuid'] or 'none (xenpbr create makes one)'}",
             f"  translated      {report['translated_config']} (xl -N create: "
             f"{'ok' if report['xl_dry_run_ok'] else 'refused'})"]
    return "\n".join([*lines, *(f"  error: {e}" for e in report["errors"])])


def cmd_unregister(args: argparse.Namespace, state: StateDir) -> int:
    """Stop managing a domain: drop its images, disk snapshots, hot streams, state and
    published xenstore keys. A running domain is not destroyed: it runs on as a plain xl
    domain whose on_crash is preserve (what xenpbr gave xl)."""
    from xenpbr import lifecycle
    row = lifecycle.unregister(state, args.domain)
    emit(row, args.json, lambda: print(_unregister_text(row)))
    return 0


def _unregister_text(row: dict[str, Any]) -> str:
    text = (f"{row['name']}: no longer managed by xenpbr ({row['images_dropped']} image(s), "
            f"{row['resurrected_dropped']} application(s)' resurrected data, "
            f"state{' and published keys' if row['unpublished'] else ''} removed).")
    if row["domid"] is None:
        return text
    return (f"{text}\nThe domain still runs (domid {row['domid']}) as a plain xl domain: it "
            f"was not destroyed. xl has on_crash = preserve for it, so a crash now leaves it "
            f"crashed until `xl destroy {row['name']}`; recreate it with your own "
            "on_crash when convenient.")


def _last_recovery(history: list[Any]) -> dict[str, Any] | None:
    if not history:
        return None
    last = history[-1]
    return {"method": last.method or None, "outcome": last.outcome,
            "downtime_s": last.downtime(),
            "started_at": utc(last.marks[0].wall) if last.marks else None}


def _status_row(state: StateDir, name: str,
                refusals: dict[str, int] | None = None) -> dict[str, Any]:
    phases = state.phases(name)
    settings = state.load_record(name).get("settings", {})
    history = list(state.history(name))
    newest = max((img.created_at for img in phases.images.values()), default=None)
    valid = sum(i.verified and i.fingerprint == phases.fingerprint
                for i in phases.images.values())
    return {"name": name, "on_crash": settings.get("on_crash"),
            "phases": list(phases.phases),
            "images": {"valid": valid, "phases": len(phases.phases)},
            "newest_image_at": utc(newest), "generation": phases.generation,
            "recoveries": len(history), "last_recovery": _last_recovery(history),
            "disk_policies": domconfig.stored_disk_policies(settings),
            "refusals": refusals or {},
            "resurrected_waiting": _resurrected_waiting(state, name),
            "standby": _standby(state, name)}


def _standby(state: StateDir, name: str) -> dict[str, Any] | None:
    """The standby domain xenpbrd prepared for ``name`` (``xenpbr_standby = 1``)."""
    from xenpbr.images import standby
    held = standby.held(state.images_root, name)
    return None if held is None else {"name": held.name, "domid": held.domid,
                                      "image": held.image_id, "memory_mib": held.memory_mib}


def _resurrected_waiting(state: StateDir, name: str) -> int:
    """How many applications' resurrected data dom0's vault holds for ``name``, each
    waiting for the guest to confirm its delivery (``xenpbr resurrected`` shows it)."""
    from xenpbr.resurrection.vault import Vault
    return len(Vault.in_state(state.root).held(name))


def _published_refusals(names: list[str]) -> dict[str, dict[str, int]]:
    """Each domain's refusal counters as xenpbrd published them in xenstore (the daemon
    keeps them in memory, per running domid); {} each outside dom0 or without xenstored."""
    from xenpbr import publish
    from xenpbr.xenstore import XenstoreClient
    if not names:
        return {}
    try:
        with XenstoreClient() as xs:
            return {name: publish.read_refusals(xs, name) for name in names}
    except (XenpbrError, OSError) as exc:
        logging.getLogger(__name__).debug("no published refusals: %s", exc)
        return {}


def _refusals_cell(refusals: dict[str, int]) -> str:
    """``12 (rate-limited 9, bad-request:phase 3)``, the most frequent first; ``0``."""
    total = sum(refusals.values())
    top = sorted(refusals.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    return f"{total} ({', '.join(f'{r} {n}' for r, n in top)})" if total else "0"


def _recovery_cell(last: dict[str, Any] | None) -> str:
    if last is None:
        return "-"
    seconds = "?" if last["downtime_s"] is None else last["downtime_s"]
    return f"{last['method'] or last['outcome']} ({seconds} s)"


def cmd_status(args: argparse.Namespace, state: StateDir) -> int:
    """Registered domains: phases, valid images, generation, last recovery, disks."""
    from xenpbr import why
    names = list(state.domains())
    refusals = _published_refusals(names)
    rows = [_status_row(state, n, refusals.get(n)) for n in names]
    reasons = why.no_image_reasons([r["name"] for r in rows if not r["images"]["valid"]],
                                   refusals)
    for row in rows:
        row["no_image_why"] = None if row["images"]["valid"] else reasons.get(row["name"])
    emit(rows, args.json, lambda: table(rows, [
        ("name", "domain"), ("on_crash", "on_crash"), ("phases", "phases"),
        ("images", "images", lambda v: f"{v['valid']}/{v['phases']}"),
        ("newest_image_at", "newest", age_of), ("generation", "gen"),
        ("recoveries", "recoveries"), ("last_recovery", "last recovery", _recovery_cell),
        ("disk_policies", "disks"), ("refusals", "refusals", _refusals_cell),
        ("resurrected_waiting", "resurrected"),
        ("standby", "standby", lambda v: f"{v['name']} ({v['domid']})" if v else "-"),
        ("no_image_why", "why no image", lambda v: v or "-")],
        empty="no domains registered (xenpbr create CONFIG)"))
    return 0


def _mechanisms(text: str) -> dict[str, str]:
    """``xvda=reflink,xvdc=copy`` (as ImageInfo keeps it) as a map for JSON."""
    return dict(item.partition("=")[::2] for item in text.split(",") if item)


def cmd_images(args: argparse.Namespace, state: StateDir) -> int:
    """One row per phase: its image, whether it is valid, its capture figures."""
    phases = state.phases(args.domain)
    stored = {m.image_id: m for m in _store(state).images(args.domain)}
    rows = []
    for phase in phases.phases or sorted(phases.images):
        img = phases.images.get(phase)
        meta = stored.get(img.image_id) if img else None
        rows.append({"phase": phase, "image": img.image_id if img else None,
                     "valid": bool(img and img.verified and img.fingerprint == phases.fingerprint
                                   and not img.abandoned(_image_failures(state, args.domain))),
                     "created_at": utc(img.created_at) if img else None,
                     "seq": img.seq if img else None,
                     "failures": img.failures if img else None,
                     "capture_s": img.capture_s if img else None,
                     "paused_s": img.paused_s if img else None,
                     "disks_s": img.disks_s if img else None,
                     "disk_mechanisms": _mechanisms(img.disk_mechanisms) if img else {},
                     "raw_bytes": getattr(meta, "stream_bytes", None),
                     "stored_bytes": getattr(meta, "stored_bytes", None)})
    emit(rows, args.json, lambda: table(rows, [
        ("phase", "phase"), ("image", "image"), ("valid", "valid"), ("created_at", "age", age_of),
        ("seq", "seq"), ("failures", "failures"), ("capture_s", "capture s"),
        ("paused_s", "paused s"), ("disks_s", "disks s"), ("disk_mechanisms", "disk snapshots"),
        ("raw_bytes", "raw bytes"), ("stored_bytes", "stored bytes")]))
    return 0


def _image_failures(state: StateDir, name: str) -> int:
    """The domain's ``xenpbr_image_failures`` (the default if its config is unusable)."""
    from xenpbr import domconfig
    from xenpbr.phases import HEALTH_DEFAULTS
    try:
        return domconfig.health_policy(domconfig.DomainConfig(
            state.xl_config_path(name), state.load_record(name).get("settings", {})))[1]
    except domconfig.ConfigError:
        return HEALTH_DEFAULTS[1]


def history_row(timeline: Timeline) -> dict[str, Any]:
    """A recovery as ``history --json`` and ``reboot --json`` give it: the stored
    timeline plus its start as an ISO time."""
    row = timeline.to_json()
    row["method"] = timeline.method or None  # none succeeded (yet)
    for mark in row["marks"]:
        mark["at"] = utc(mark["wall"])
    row["started_at"] = utc(timeline.marks[0].wall) if timeline.marks else None
    return row


def _recovery_details(row: dict[str, Any]) -> list[str]:
    """The lines under a recovery in the table: why it went the way it did."""
    lines = [f"attempt {i}: {text}{' (brought it back)' if text == row['method'] else ''}"
             for i, text in enumerate(row["attempts"], 1)]
    lines += [f"skipped {text}" for text in row["skipped"]]
    marks = " ".join(f"{k}={v}" for k, v in row["since_crash"].items() if k != "crash_seen")
    lines += [f"s after crash seen: {marks}"] if marks else []
    lines += _resurrection_details(row)
    return [wrapped for line in lines
            for wrapped in textwrap.wrap(line, 96, subsequent_indent="    ")]


def _resurrection_details(row: dict[str, Any]) -> list[str]:
    """The extraction's lines: its mark's detail, then one line per application."""
    from xenpbr.timeline import AppResurrection
    extracted = [m["detail"] for m in row["marks"] if m["name"] == "extracted"]
    lines = [f"resurrection: {detail}" for detail in extracted]
    return lines + [f"resurrection {AppResurrection(**app).brief()}"
                    for app in row["resurrection"]]


def cmd_history(args: argparse.Namespace, state: StateDir) -> int:
    """A domain's recoveries, each with its attempts, skipped images and breakdown."""
    state.load_record(args.domain)  # UnknownDomain rather than an empty history
    rows = [history_row(t) for t in state.history(args.domain)]
    emit(rows, args.json, lambda: table(rows, [
        ("started_at", "when", local_time), ("trigger", "trigger"), ("method", "method"),
        ("outcome", "outcome"), ("downtime_s", "downtime s")], empty="no recoveries yet",
        details=_recovery_details))
    return 0


def resurrected_row(held: Any, exported: Path | None) -> dict[str, Any]:
    """One application's data in the vault, as ``resurrected --json`` gives it."""
    from xenpbr.resurrection.vault import rejection_to_json
    lost = [{k: v for k, v in rejection_to_json(r).items() if k in ("reason", "seq", "key")}
            for r in held.lost]
    return {"app": held.app, "generation": held.generation, "records": len(held.records),
            "lost": lost, "bytes": held.bytes, "extracted_at": utc(held.extracted_at),
            "damaged": None, "exported_to": None if exported is None else str(exported)}


def damaged_row(damaged: Any) -> dict[str, Any]:
    """A vault file that failed its check: listed, never delivered or exported."""
    return {"app": damaged.app, "generation": None, "records": None, "lost": None,
            "bytes": None, "extracted_at": None, "damaged": damaged.reason,
            "exported_to": None}


def _lost_cell(row: dict[str, Any]) -> str:
    if row["damaged"] is not None:
        return f"DAMAGED: {row['damaged']}"
    reasons: dict[str, int] = {}
    for lost in row["lost"]:
        reasons[lost["reason"]] = reasons.get(lost["reason"], 0) + 1
    return ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) or "0"


def cmd_resurrected(args: argparse.Namespace, state: StateDir) -> int:
    """What dom0 holds for a domain's applications from its crashes (xenpbr_resurrect),
    waiting to be delivered back into the guest: per application the generation of its
    region, records kept, records lost (with reasons), bytes and when it was extracted.
    --export DIR writes each application's records to DIR/APP.json (keys and values in
    base64); exits 1 if a damaged vault file could not be exported."""
    from xenpbr.resurrection.vault import Vault
    state.load_record(args.domain)  # UnknownDomain rather than an empty list
    vault = Vault.in_state(state.root)
    contents = vault.contents(args.domain)
    exported: dict[str, Path] = {}
    if args.export is not None:
        exported = {p.stem: p for p in vault.export(args.domain, args.export)}
    rows = [resurrected_row(h, exported.get(h.app)) for h in contents.held]
    rows += [damaged_row(d) for d in contents.damaged]
    rows.sort(key=lambda r: r["app"])
    shown = [{**row, "lost": _lost_cell(row)} for row in rows]
    emit(rows, args.json, lambda: table(shown, [
        ("app", "app"), ("generation", "generation"), ("records", "records"),
        ("lost", "lost"), ("bytes", "bytes"), ("extracted_at", "extracted", local_time)],
        empty="nothing held"))
    if contents.damaged and args.export is not None:
        print(f"xenpbr: error: {len(contents.damaged)} damaged vault file(s) not exported: "
              f"{', '.join(str(d.path) for d in contents.damaged)}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _check_phase(name: str, phases: DomainPhases, phase: str | None) -> None:
    """Refuse a phase the domain does not have: a typo must not read as 'nothing to
    forget' (the operator would believe the images gone)."""
    known = list(phases.phases) or sorted(phases.images)
    if phase is not None and phase not in known:
        raise UnknownPhase(f"{name} has no phase {phase!r}; its phases are "
                           f"{', '.join(known) or 'not known yet (no image captured)'}")


def cmd_forget(args: argparse.Namespace, state: StateDir) -> int:
    """Drop the images of a phase and every later one (all without --phase)."""
    from xenpbr.state import domain_lock
    from xenpbr.images.errors import ImageNotFound
    with domain_lock(state, args.domain):
        phases = state.phases(args.domain)
        _check_phase(args.domain, phases, args.phase)
        dropped = phases.forget(args.phase)
        store = _store(state)
        for img in dropped:
            try:
                store.delete(args.domain, img.image_id)
            except ImageNotFound:  # already gone from the store: forgetting it is the point
                logging.getLogger(__name__).info("%s: image %s was not in the store",
                                                 args.domain, img.image_id)
        state.save_phases(phases)
    _republish(state, args.domain)
    rows = [{"phase": i.phase, "image": i.image_id} for i in dropped]
    emit(rows, args.json, lambda: table(rows, [("phase", "forgotten phase"),
                                               ("image", "image")], empty="nothing to forget"))
    return 0


def _republish(state: StateDir, name: str) -> None:
    """Refresh the state xenpbrd publishes in xenstore (best effort: outside dom0, or
    without xenstored, there is nothing to refresh)."""
    from xenpbr import publish
    from xenpbr.xenstore import XenstoreClient
    try:
        with XenstoreClient() as xs:
            publish.refresh(xs, state, name)
    except (XenpbrError, OSError) as exc:
        logging.getLogger(__name__).debug("not republished: %s", exc)


def cmd_inject(args: argparse.Namespace, state: StateDir) -> int:
    """Inject a fault into a registered domain's kernel on purpose, to test that its
    recovery works before a real fault needs it. ``crash`` is ``xl sysrq DOMAIN c``; the
    others alter the paused kernel from dom0 (xenpbr.faults) and record what changed."""
    from xenpbr.faults.inject import InjectionRefused
    from xenpbr.faults.kinds import FaultKind
    from xenpbr.faults.provoke import FAULT_PREFIX
    from xenpbr.state import domain_lock
    record = state.load_record(args.domain)  # UnknownDomain: only domains xenpbr manages
    if state.recovery_intent(args.domain) is not None:
        raise InjectionRefused(f"{args.domain}: a recovery of it is under way; inject "
                               "after it ends (xenpbr history)")
    if args.count_runs and args.fault not in (FaultKind.TEXT.value, FaultKind.OPERAND.value):
        raise InjectionRefused(f"--count-runs counts how often an altered instruction "
                               f"runs: only with --fault text or operand, not {args.fault}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    with domain_lock(state, args.domain, wait=False):  # DomainBusy: capture or recovery
        if args.fault.startswith(FAULT_PREFIX):
            row = _inject_provoked(args)
        elif not FaultKind(args.fault).memory:
            row = _inject_crash(args.domain)
        else:
            row = _inject_memory(args, record, FaultKind(args.fault), seed)
        row["reach"] = _count_runs(row, args.wait) if args.count_runs else None
    state.record_fault(args.domain, row)
    shown = {**row, "injected_at": utc(row["injected_at"])}
    emit(shown, args.json, lambda: _print_injection(shown))
    return 0


def _inject_crash(domain: str) -> dict[str, Any]:
    from xenpbr.xl import commands as xl_commands
    injected_at = time.time()  # the panic may be seen before xl returns
    proc = xl_commands.sysrq(domain, "c")  # a domain that is not running: xl says so
    if proc.returncode != 0:
        raise XenpbrError(f"xl sysrq {domain} c failed: "
                          f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return {"domain": domain, "domid": None, "fault": "crash", "seed": None,
            "injected_at": injected_at, "paused_s": 0.0, "change": None, "provoked": None}


def _inject_provoked(args: argparse.Namespace) -> dict[str, Any]:
    """``lkdtm:TYPE``: the guest's agent provokes it (xenpbr.faults.provoke)."""
    from xenpbr.faults.provoke import FAULT_PREFIX, provoke
    from xenpbr.xenstore import XenstoreClient
    domid = _running_domid(args.domain)
    lkdtm_type = args.fault.removeprefix(FAULT_PREFIX)
    with XenstoreClient() as xs:
        done = provoke(xs, domid, args.domain, lkdtm_type, args.wait,
                       alive=lambda: _current_domid(args.domain) == domid)
    return {"domain": args.domain, "domid": domid, "fault": args.fault, "seed": None,
            # the fault runs between the request and dom0 reading the answer (a crash
            # may be seen first): from the request, detection times are never negative
            "injected_at": done.requested_at, "paused_s": 0.0, "change": None,
            "provoked": {"id": done.request.id, "type": lkdtm_type,
                         "taken_after_s": round(done.taken_at - done.requested_at, 3),
                         "taken": done.taken.state.value if done.taken else None}}


def _count_runs(row: dict[str, Any], wait: float) -> dict[str, Any]:
    """Ask the guest's agent to count runs of the instruction *row* altered
    (xenpbr.faults.reach); the record of what it answered."""
    from xenpbr.faults import reach
    from xenpbr.xenstore import XenstoreClient
    why_not = reach.uncountable(row["change"])
    if why_not is not None:
        return reach.not_counted(why_not)
    with XenstoreClient() as xs:
        return reach.request(xs, row["domid"], int(row["change"]["address"], 16), wait)


def cmd_fault_check(args: argparse.Namespace, state: StateDir) -> int:
    """Say what became of the last fault injected into a domain: whether its bytes are
    still there, and how often the altered instruction ran when it was injected with
    --count-runs. Reads the paused guest's memory once; changes nothing."""
    from functools import partial

    from xenpbr.faults.check import check, last_memory_fault
    from xenpbr.faults.inject import read_now
    from xenpbr.hypervisor.libxc import LibxcHypervisor
    from xenpbr.xenstore import XenstoreClient
    state.load_record(args.domain)  # UnknownDomain: only domains xenpbr manages
    record = last_memory_fault(state.faults(args.domain), args.domain)
    hypervisor = LibxcHypervisor()
    try:
        reader = partial(read_now, hypervisor, hypervisor.machine_frames)
        report = check(record, _current_domid(args.domain), reader, XenstoreClient)
    finally:
        hypervisor.close()
    shown = {**report, "injected_at": utc(report["injected_at"])}
    emit(shown, args.json, lambda: _print_fault_check(shown))
    return 0


def _print_fault_check(report: dict[str, Any]) -> None:
    said = {"in-place": "still there", "original": "back to the original bytes",
            "overwritten": "overwritten", "gone": "gone with the domain it went into",
            "probed": "under the counter's kprobe (a jump): not comparable"}
    print(f"{report['domain']}: {report['fault']} fault at {report['address']} "
          f"({report['symbol']}), injected {report['injected_at']}")
    print(f"  {'bytes':<12} {report['old']} -> {report['new']}, now "
          f"{report['now'] or '-'}: {said[report['bytes']]}")
    counted = report["reach"]
    if counted is None:
        return
    runs = (f"{counted['hits']} times" if counted["state"] == "counting"
            else f"not counted: {counted.get('reason')}")
    print(f"  {'ran':<12} {runs}{' (last count seen)' if counted.get('stale') else ''}")


def _current_domid(domain: str) -> int | None:
    """The domain's id now, or None if it is not running."""
    from xenpbr.xl import commands as xl_commands
    proc = xl_commands.run(["domid", domain])
    ok = proc.returncode == 0 and proc.stdout.strip().isdigit()
    return int(proc.stdout) if ok else None


def _running_domid(domain: str) -> int:
    """The domain's id; InjectionRefused if it is not running."""
    from xenpbr.faults.inject import InjectionRefused
    domid = _current_domid(domain)
    if domid is None:
        raise InjectionRefused(f"{domain} is not running: nothing to inject into")
    return domid


def _inject_memory(args: argparse.Namespace, record: dict[str, Any], kind: Any,
                   seed: int) -> dict[str, Any]:
    from xenpbr.faults.inject import InjectionRefused, Injector
    from xenpbr.faults.symbols import KernelSymbols, SymbolMapError, system_map_for
    from xenpbr.hypervisor.libxc import LibxcHypervisor
    domid = _running_domid(args.domain)
    path = args.system_map
    if path is None:
        kernel = record.get("settings", {}).get("kernel")
        if not kernel:
            raise SymbolMapError(f"{args.domain} boots no dom0 kernel file (pygrub?): "
                                 "pass the guest's /proc/kallsyms with --system-map")
        path = system_map_for(str(kernel))
    symbols = KernelSymbols.load(path)
    hypervisor = LibxcHypervisor()
    try:
        injection = Injector(hypervisor, hypervisor.machine_frames, symbols).inject(
            args.domain, domid, kind, seed)
    finally:
        hypervisor.close()
    return injection.to_json()


def _fault_arg(text: str) -> str:
    """``--fault``: a kind of :class:`FaultKind` or ``lkdtm:TYPE``."""
    from xenpbr.faults.kinds import FaultKind
    from xenpbr.faults.provoke import FAULT_PREFIX
    from xenpbr.guestproto.provoke import TYPE_NAME
    kinds = [k.value for k in FaultKind]
    if text in kinds:
        return text
    if text.startswith(FAULT_PREFIX) and TYPE_NAME.fullmatch(text.removeprefix(FAULT_PREFIX)):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is no fault kind: one of {', '.join(kinds)}, or lkdtm:TYPE with TYPE an "
        "LKDTM crash type in capitals (lkdtm:BUG)")


def _print_injection(row: dict[str, Any]) -> None:
    change = row["change"]
    if row.get("provoked"):
        provoked = row["provoked"]
        said = (f"it said {provoked['taken']} after {provoked['taken_after_s']} s"
                if provoked["taken"] else "the domain went away before it said it took it")
        print(f"{row['domain']}: LKDTM {provoked['type']} requested of its agent "
              f"(request {provoked['id']}); {said}; follow it with "
              f"`xenpbr history {row['domain']}`")
        return
    if change is None:
        print(f"{row['domain']}: kernel crash injected (sysrq c); follow it with "
              f"`xenpbr history {row['domain']}`")
        return
    print(f"{row['domain']}: {row['fault']} fault injected (seed {row['seed']}, guest paused "
          f"{row['paused_s']:.3f} s)")
    details = [("address", f"{change['address']} ({change['symbol']})"),
               ("target", change["target"]), ("bytes", f"{change['old']} -> {change['new']}")]
    if change["before"] or change["after"]:
        details.append(("instruction", f"{change['before'] or '?'} -> {change['after']}"))
    for label, value in details:
        print(f"  {label:<12} {value}")
    print(f"follow it with `xenpbr history {row['domain']}`")


@contextlib.contextmanager
def _guest_pages_for(store: ImageStore) -> Iterator[None]:
    """Let ``store``'s restores read a restored domain's pages back (libxc, as xenpbrd
    does): a hot stream that left zero pages to Xen is then used, not regenerated
    (docs/images.md, "Zero pages left to Xen"). Without libxc the restore regenerates."""
    from xenpbr.hypervisor.libxc import LibxcHypervisor
    try:
        hypervisor = LibxcHypervisor()
    except (OSError, XenpbrError) as exc:
        logging.getLogger(__name__).info("no guest memory reader (%s): zero pages are "
                                         "copied, not left to Xen", exc)
        yield
        return
    store.guest_pages = hypervisor.read_restored_pfns
    try:
        yield
    finally:
        store.guest_pages = None
        hypervisor.close()


def cmd_reboot(args: argparse.Namespace, state: StateDir) -> int:
    """Operator-initiated phase-based reboot (proactive rejuvenation)."""
    from xenpbr.guestproto.control import PhaseProtocol
    from xenpbr.recovery import Recovery
    from xenpbr.state import domain_lock
    from xenpbr.store_restorer import StoreRestorer
    from xenpbr.xl.toolstack import XlToolstack
    from xenpbr.xenstore import XenstoreClient
    store = _store(state)
    with domain_lock(state, args.domain), XenstoreClient() as xs, \
            _guest_pages_for(store):
        recovery = Recovery(state, XlToolstack(), StoreRestorer(store), PhaseProtocol(xs))
        timeline = recovery.recover(args.domain, "operator", max_phase=args.phase).timeline
    emit(history_row(timeline), args.json,
         lambda: print(f"{args.domain}: {timeline.outcome} via {timeline.method} in "
                       f"{timeline.downtime()} s"))
    return 0


def cmd_gc(args: argparse.Namespace, state: StateDir) -> int:
    """Reclaim the pages, disk snapshots and hot streams no image uses any more."""
    report = _store(state).gc(wait=args.wait)
    row = {"before_bytes": report.bytes_before, "after_bytes": report.bytes_after,
           "reclaimed_bytes": report.reclaimed, "live_pages": report.live_pages,
           "packs_deleted": len(report.packs_deleted),
           "packs_compacted": len(report.packs_compacted),
           "snapshots_removed": len(report.orphan_snapshots_removed),
           "hot_streams_removed": report.hot_streams_removed}
    emit([row], args.json, lambda: table([row], [(k, k.replace("_", " ")) for k in row]))
    return 0


def cmd_scrub(args: argparse.Namespace, state: StateDir) -> int:
    """Verify every page, manifest and hot stream of the image store; mark the images
    that need a bad object invalid (with the reason), and drop bad page records and hot
    streams so the next capture writes them afresh. Exit 0 even when damage was found:
    ``clean`` (JSON) or the first line says whether the store is sound."""
    report = _store(state).scrub()
    row = report.to_json()
    emit(row, args.json, lambda: print(_scrub_text(row)))
    return 0


def _scrub_text(row: dict[str, Any]) -> str:
    """The scrub report for people: a verdict, what was read, then one line per finding."""
    lines = [f"{'clean' if row['clean'] else 'DAMAGE FOUND'}: {row['objects']} page records in "
             f"{row['packs']} packs ({row['bytes']} bytes), {row['images']} images, "
             f"{row['hot_streams']} hot streams checked in {row['seconds']} s"]
    lines += [f"bad page {b['sha256'][:16]}... pack {b['pack']} offset {b['offset']}: "
              f"{b['reason']} -> {b['action']}" for b in row["bad_objects"]]
    lines += [f"unusable pack {p['pack']}: {p['reason']} (xenpbr gc rebuilds its index)"
              for p in row["unusable_packs"]]
    lines += [f"invalid image {i['domain']}/{i['image']}"
              f"{' (marked now)' if i['marked_now'] else ''}: {i['reason']}"
              for i in row["invalid_images"]]
    lines += [f"bad hot stream {h['path']}: {h['reason']} -> {h['action']}"
              for h in row["bad_hot_streams"]]
    return "\n".join(lines)


def cmd_daemon(args: argparse.Namespace, state: StateDir) -> int:
    """Run xenpbrd in the foreground, as its service does (logs on stderr)."""
    from xenpbr.xenpbrd import main as daemon_main
    return daemon_main(["--state-dir", str(state.root)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xenpbr", description=plain(__doc__.split("\n\n")[0]),
        epilog=f"{EXIT_CODES}\n\nJSON shapes of --json: docs/cli-json.md",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", type=Path, metavar="PATH", dest="settings_file",
                        help="dom0 settings file (default: $XENPBR_CONFIG, else "
                        "/etc/xenpbr/xenpbr.conf if it exists; docs/settings.md)")
    parser.add_argument("--state-dir", type=Path, help="xenpbr's state directory (default: "
                        "[state] dir of the settings, $XENPBR_STATE_DIR or /var/lib/xenpbr)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what xenpbr does (debug messages on stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="one of these (xenpbr COMMAND --help for its options)")

    def command(name: str, func: Command, help_: str,
                json: bool = True) -> argparse.ArgumentParser:
        doc = plain(func.__doc__)
        p = sub.add_parser(name, help=help_, epilog=EXIT_CODES, description=doc or help_,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if json:  # a command without output must refuse --json, not ignore it
            p.add_argument("--json", action="store_true",
                           help="machine-readable output (docs/cli-json.md)")
        p.set_defaults(func=func)
        return p

    p = command("create", cmd_create, "create a domain from an xl config (phasereboot ok)")
    p.add_argument("config", help="the xl domain config (xl.cfg(5) plus xenpbr's keys)")
    p.add_argument("-p", "--paused", action="store_true",
                   help="leave the domain paused after creating it (xl create -p)")
    p.add_argument("--update", action="store_true",
                   help="replace the settings of a domain xenpbr manages already "
                        "(keeps the images whose fingerprint still matches)")
    p = command("check", cmd_check, "validate an xl config without acting (xl -N create)")
    p.add_argument("config", help="the xl domain config to validate")
    p = command("unregister", cmd_unregister, "stop managing a domain (drops its images "
                "and state; a running domain keeps running)")
    p.add_argument("domain", help="a domain registered with xenpbr create")
    p = command("remove", cmd_unregister, "the same as unregister")
    p.add_argument("domain", help="a domain registered with xenpbr create")
    command("status", cmd_status, "registered domains, their images and recoveries")
    domain_help = "a domain registered with xenpbr create (see xenpbr status)"
    p = command("images", cmd_images, "a domain's restartable images")
    p.add_argument("domain", help=domain_help)
    p = command("history", cmd_history, "a domain's recovery timelines")
    p.add_argument("domain", help=domain_help)
    p = command("resurrected", cmd_resurrected, "what dom0 holds from a domain's "
                "applications after its crashes (resurrection); export it")
    p.add_argument("domain", help=domain_help)
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="also write each application's records to DIR/APP.json")
    p = command("forget", cmd_forget, "drop images (a phase and all later ones, or all)")
    p.add_argument("domain", help=domain_help)
    p.add_argument("--phase", help="forget this phase's image and every later phase's "
                   "(default: all images)")
    p = command("reboot", cmd_reboot, "phase-based reboot now (from --phase or deepest)")
    p.add_argument("domain", help=domain_help)
    p.add_argument("--phase", help="restore no deeper than this phase (default: the "
                   "deepest valid image)")
    p = command("inject", cmd_inject, "inject a fault into a domain's kernel on purpose "
                "(docs/faults.md)")
    p.add_argument("domain", help=domain_help)
    p.add_argument("--fault", default="crash", type=_fault_arg,
                   metavar="{crash,stack,text,operand,hang,lkdtm:TYPE}",
                   help="crash: sysrq c (default); stack: one bit of a live word on the "
                   "kernel stack of the thread on a vCPU; text: one bit of an instruction; "
                   "operand: one operand of an instruction; hang: jmp . at the idle "
                   "routine's entry; lkdtm:TYPE: the guest's agent runs LKDTM's TYPE "
                   "(BUG, EXCEPTION, SOFTLOCKUP...) if it offers it")
    p.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="lkdtm, --count-runs: seconds the guest's agent has to answer "
                   "the request before it is withdrawn (default 120)")
    p.add_argument("--seed", type=int, help="choose the target with this seed (default: "
                   "random; the record says which)")
    p.add_argument("--system-map", type=Path, metavar="FILE",
                   help="the guest kernel's symbols: a System.map or a copy of the guest's "
                   "/proc/kallsyms (default: System.map-VERSION beside the domain's kernel)")
    p.add_argument("--count-runs", action="store_true",
                   help="text, operand: ask the guest's agent (xenpbr-agent reach-counter) "
                   "to count how often the altered instruction runs; read the count with "
                   "xenpbr fault-check")
    p = command("fault-check", cmd_fault_check, "what became of the last fault injected "
                "into a domain: its bytes now, how often it ran (docs/faults.md)")
    p.add_argument("domain", help=domain_help)
    p = command("gc", cmd_gc, "reclaim store space no image uses (after forget)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for captures and restores under way (default 60)")
    command("scrub", cmd_scrub, "verify the whole image store; reject images that need a "
            "bad object, drop bad objects so later captures rewrite them")
    command("daemon", cmd_daemon, "run xenpbrd in the foreground", json=False)
    return parser


def _silence_stdout() -> None:
    """The reader of our output left (``| head``): point stdout at /dev/null so the
    interpreter's final flush does not print a BrokenPipe traceback (Python docs, "Note
    on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured): nothing to silence
        pass


def os_error_message(exc: OSError, state: StateDir) -> str:
    """One line saying what to do about an OSError a command ran into."""
    name = str(exc.filename or "")
    if isinstance(exc, FileNotFoundError) and Path(name).name == "xl":
        return ("`xl` was not found on PATH: run xenpbr in dom0 with Xen's toolstack "
                "installed (Debian: apt install xen-utils)")
    if name and Path(name).resolve().is_relative_to(state.root.resolve()):
        return (f"state directory {state.root} is unusable ({exc.strerror}: {name}): run "
                "as root, or choose another with --state-dir or XENPBR_STATE_DIR")
    return f"{exc.strerror or exc}{f': {name}' if name else ''}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code says how it went (module docstring)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    state = StateDir(args.state_dir or Path("/var/lib/xenpbr"))  # for messages until loaded
    try:
        conf = settings.load(args.settings_file)
        settings.use(conf)
        if conf.xen_libdir and not os.environ.get("XENPBR_LIBDIR"):  # for every binding
            os.environ["XENPBR_LIBDIR"] = str(conf.xen_libdir)
        state = StateDir(args.state_dir)
        code = args.func(args, state)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_PIPE
    except XenpbrError as exc:
        print(f"xenpbr: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"xenpbr: error: {os_error_message(exc, state)}", file=sys.stderr)
    finally:
        settings.use(None)  # a caller in the same process (tests) loads its own again
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
