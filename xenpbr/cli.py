"""``xenpbr``: create domains with phase-based reboot, inspect and act on them.

Every command prints a readable table and takes ``--json`` for automation. Commands
read xenpbr's state directory directly; those that act on a domain (``reboot``,
``forget``) take the same per-domain lock as the daemon, so they never race a capture
or a recovery.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xenpbr import domconfig
from xenpbr.errors import XenpbrError
from xenpbr.render import emit, table, wall_age
from xenpbr.state import StateDir


def _store(state: StateDir):
    from xenpbr.images.store import ImageStore
    return ImageStore(state.images_root)


def cmd_create(args: argparse.Namespace, state: StateDir) -> int:
    """Register the domain, hand xl the translated config, create it."""
    config = domconfig.load(Path(args.config))
    domconfig.disk_policies(config)  # validate before anything is written
    name = config.name
    state.register(name, config.settings, domconfig.render(config.for_xl()),
                   str(Path(args.config).resolve()))
    xl_cfg = state.xl_config_path(name)
    proc = subprocess.run(["xl", "create", *(["-p"] if args.paused else []), str(xl_cfg)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise XenpbrError(f"xl create {xl_cfg} failed: {proc.stderr.strip()[-800:]}")
    emit({"name": name, "xl_config": str(xl_cfg),
          "on_crash": config.settings.get("on_crash"),
          "on_watchdog": config.settings.get("on_watchdog")}, args.json,
         lambda: print(f"created {name} (xl config {xl_cfg}); on_crash = "
                       f"{config.settings.get('on_crash', 'destroy')}"))
    return 0


def _status_row(state: StateDir, name: str) -> dict[str, Any]:
    phases = state.phases(name)
    record = state.load_record(name)
    history = list(state.history(name))
    last = history[-1] if history else None
    newest = max((img.created_at for img in phases.images.values()), default=None)
    return {"name": name, "on_crash": record.get("settings", {}).get("on_crash"),
            "phases": ",".join(phases.phases) or "-",
            "images": f"{sum(i.verified for i in phases.images.values())}/{len(phases.phases)}",
            "newest_image_age": wall_age(newest), "generation": phases.generation,
            "recoveries": len(history),
            "last_recovery": f"{last.method or last.outcome} ({last.downtime()} s)" if last
            else None}


def cmd_status(args: argparse.Namespace, state: StateDir) -> int:
    rows = [_status_row(state, n) for n in state.domains()]
    emit(rows, args.json, lambda: table(rows, [
        ("name", "domain"), ("on_crash", "on_crash"), ("phases", "phases"),
        ("images", "images"), ("newest_image_age", "newest"), ("generation", "gen"),
        ("recoveries", "recoveries"), ("last_recovery", "last recovery")],
        empty="no domains registered (xenpbr create CONFIG)"))
    return 0


def cmd_images(args: argparse.Namespace, state: StateDir) -> int:
    phases = state.phases(args.domain)
    stored = {m.image_id: m for m in _store(state).images(args.domain)}
    rows = []
    for phase in phases.phases or sorted(phases.images):
        img = phases.images.get(phase)
        meta = stored.get(img.image_id) if img else None
        rows.append({"phase": phase, "image": img.image_id if img else None,
                     "valid": bool(img and img.verified and img.fingerprint == phases.fingerprint),
                     "age": wall_age(img.created_at) if img else None,
                     "seq": img.seq if img else None,
                     "capture_s": img.capture_s if img else None,
                     "paused_s": img.paused_s if img else None,
                     "disks_s": img.disks_s if img else None,
                     "disk_mechanisms": img.disk_mechanisms if img else "",
                     "raw_bytes": getattr(meta, "stream_bytes", None),
                     "stored_bytes": getattr(meta, "stored_bytes", None)})
    emit(rows, args.json, lambda: table(rows, [
        ("phase", "phase"), ("image", "image"), ("valid", "valid"), ("age", "age"),
        ("seq", "seq"), ("capture_s", "capture s"), ("paused_s", "paused s"),
        ("disks_s", "disks s"), ("disk_mechanisms", "disk snapshots"),
        ("raw_bytes", "raw bytes"), ("stored_bytes", "stored bytes")]))
    return 0


def cmd_history(args: argparse.Namespace, state: StateDir) -> int:
    state.load_record(args.domain)  # UnknownDomain rather than an empty history
    timelines = list(state.history(args.domain))
    if args.json:
        emit([t.to_json() for t in timelines], True, None)
        return 0
    rows = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.marks[0].wall))
             if t.marks else None, "trigger": t.trigger, "method": t.method,
             "outcome": t.outcome, "downtime_s": t.downtime(),
             "breakdown": " ".join(f"{k}={v}" for k, v in t.since_crash().items()
                                   if k != "crash_seen")} for t in timelines]
    table(rows, [("when", "when"), ("trigger", "trigger"), ("method", "method"),
                 ("outcome", "outcome"), ("downtime_s", "downtime s"),
                 ("breakdown", "breakdown (s after crash seen)")], empty="no recoveries yet")
    return 0


def cmd_forget(args: argparse.Namespace, state: StateDir) -> int:
    from xenpbr.daemon import domain_lock
    from xenpbr.images.errors import ImageNotFound
    with domain_lock(state, args.domain):
        phases = state.phases(args.domain)
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
    """Crash a registered domain's kernel on purpose (``xl sysrq DOMAIN c``), to test
    that its recovery works before a real fault needs it."""
    state.load_record(args.domain)  # UnknownDomain: only domains xenpbr manages
    proc = subprocess.run(["xl", "sysrq", args.domain, "c"], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise XenpbrError(f"xl sysrq {args.domain} c failed: "
                          f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    emit({"domain": args.domain, "fault": "crash", "injected_at": time.time()}, args.json,
         lambda: print(f"{args.domain}: kernel crash injected (sysrq c); follow it with "
                       f"`xenpbr history {args.domain}`"))
    return 0


def cmd_reboot(args: argparse.Namespace, state: StateDir) -> int:
    """Operator-initiated phase-based reboot (proactive rejuvenation)."""
    from xenpbr.daemon import StoreRestorer, domain_lock
    from xenpbr.protocol import PhaseProtocol
    from xenpbr.recovery import Recovery, XlToolstack
    from xenpbr.xenstore import XenstoreClient
    with domain_lock(state, args.domain), XenstoreClient() as xs:
        recovery = Recovery(state, XlToolstack(), StoreRestorer(_store(state)),
                            PhaseProtocol(xs))
        timeline = recovery.recover(args.domain, "operator", max_phase=args.phase)
    emit(timeline.to_json(), args.json,
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


def cmd_daemon(args: argparse.Namespace, state: StateDir) -> int:
    from xenpbr.daemon import main as daemon_main
    return daemon_main(state.root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenpbr", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, help="default: $XENPBR_STATE_DIR or "
                        "/var/lib/xenpbr")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    p = command("create", cmd_create, "create a domain from an xl config (phasereboot ok)")
    p.add_argument("config")
    p.add_argument("-p", "--paused", action="store_true")
    command("status", cmd_status, "registered domains, their images and recoveries")
    p = command("images", cmd_images, "a domain's restartable images")
    p.add_argument("domain")
    p = command("history", cmd_history, "a domain's recovery timelines")
    p.add_argument("domain")
    p = command("forget", cmd_forget, "drop images (a phase and all later ones, or all)")
    p.add_argument("domain")
    p.add_argument("--phase")
    p = command("reboot", cmd_reboot, "phase-based reboot now (from --phase or deepest)")
    p.add_argument("domain")
    p.add_argument("--phase")
    p = command("inject", cmd_inject, "crash a domain's kernel on purpose (sysrq c)")
    p.add_argument("domain")
    p = command("gc", cmd_gc, "reclaim store space no image uses (after forget)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for captures and restores under way (default 60)")
    command("daemon", cmd_daemon, "run xenpbrd in the foreground")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, StateDir(args.state_dir))
    except XenpbrError as exc:
        print(f"xenpbr: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
