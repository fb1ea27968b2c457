"""``xenpbr-agent``: the guest's command line.

::

    xenpbr-agent phase NAME [--config PATH] [--timeout S]   mark boundary NAME
    xenpbr-agent check [--config PATH] [--json]             validate the config only
    xenpbr-agent status [--config PATH] [--json]            what the agent last did
    xenpbr-agent invalidate PHASE [--config PATH]           drop images from PHASE on
    xenpbr-agent resurrected [--wait S] [--config PATH]     hand over resurrected data
    xenpbr-agent heartbeat [--interval S]                   for dom0's liveness check
    xenpbr-agent provoke-listener [--direct PATH]           let dom0 provoke LKDTM faults
    xenpbr-agent reach-counter                              count runs of an altered instruction

``phase`` prints one line, ``<phase> <verdict>`` (``captured``, ``skipped``,
``refused:<reason>``, ``restored:<generation>``, ``timeout``, or ``not-marked`` when a
``start`` command failed or the config is broken). With a config that reads but does
not validate it marks nothing, yet still runs what validates on its own
(``[phase:NAME] start``, and ``[after-last-phase]`` for the last phase) so the guest
comes up: :mod:`xenpbr_agent.salvage`.

``resurrected`` hands each application the records dom0 recovered from the crashed
kernel's memory (:mod:`xenpbr_agent.resurrected`): one line per delivery,
``<app> ok <generation> records=<n> lost=<n>``, ``<app> bad <generation> <reason> ...``,
or ``<app> pending`` / ``<app> already-confirmed ...``. ``phase`` does the same after a
restore; an init script runs ``resurrected --wait S`` after a normal boot.

``check`` reads and validates the config and prints what it declares (or every error);
it touches neither xenstore nor any command.

Exit codes (all subcommands; systemd's unit treats 3, 4 and 5 as success):

== ==========================================================================
0  captured, skipped, or restored with its steps done; ``check``: valid config
2  usage error, config error (missing, unreadable or invalid: even when the
   salvage brought the guest up), no xenstore, or an error marking the boundary
3  ``refused:<reason>`` (from dom0, or ``disabled`` decided locally)
4  no ack for our seq within the timeout (``invalidate``: no answer)
5  a configured command failed (a ``start``, ``run`` or ``mount`` step)
== ==========================================================================
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from typing import Any

from xenpbr.guestproto.wire import (
    GENERATION_KEY,
    MAX_WAIT_SECONDS,
    AgentProblem,
    GuestStatus,
    VerdictKind,
)
from xenpbr.xenstore import XenstoreClient, XenstoreError
from xenpbr_agent import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STEP_FAILED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    AgentError,
    ConfigError,
    __version__,
    hazards,
    poststeps,
    salvage,
)
from xenpbr_agent.boundary import (
    MOUNTS,
    PROC,
    BoundaryResult,
    XenstoreFactory,
    mark_boundary,
    read_ack,
    report_problem,
    report_status,
)
from xenpbr_agent.check import cmd_check
from xenpbr_agent.config import (
    AgentConfig,
    default_path,
    load_config,
    parse_config,
    read_config_text,
)
from xenpbr_agent.state import StateStore

log = logging.getLogger("xenpbr_agent")

#: What an operator can do about some refusals (the rest speak for themselves).
HINTS = {
    "disabled": "dom0 does not manage this domain with xenpbr (create it with 'xenpbr create')",
    "stale-seq": "another writer used a higher seq; the next run picks a fresh one",
    "out-of-order": "mark the phases in the order the config declares them",
    "persistent-disk-rw": "unmount persistent disks (or mount them read-only) before this "
                          "boundary; mount them with [after-last-phase] mount",
    "snapshot-failed": "dom0 could not snapshot a disk; see xenpbrd's log in dom0",
    "hazard": "a restartable candidate holds a non-O_APPEND write offset on a disk that is "
              "not reverted; start it in [after-last-phase] instead",
    "rate-limited": "too many boundaries in a short time; mark fewer",
}


#: How dom0's ``persistent-disk-rw`` detail names the disk (xenpbr/consistency.py).
_PERSISTENT_RW = re.compile(r"^persistent disk ([a-z][a-z0-9_-]{0,31}) is mounted read-write")


def _name_persistent_writers(detail: str, proc_path: str) -> None:
    """After a ``persistent-disk-rw`` refusal, name who writes to that disk (dom0 knows
    the disk, only the guest knows the processes): the service to move to
    ``[after-last-phase]``."""
    match = _PERSISTENT_RW.match(detail)
    if match is None:
        return
    writers = hazards.writers_on(match.group(1), proc_path,
                                 skip_pids=frozenset({os.getpid()}))
    if writers:
        log.warning("writing to %s now: %s; start %s after the last phase "
                    "([after-last-phase] in the agent config)", match.group(1),
                    "; ".join(f"pid {w.pid} ({w.comm}) {w.path}" for w in writers[:8]),
                    "it" if len({w.comm for w in writers}) == 1 else "them")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenpbr-agent",
                                     description="Mark boot-phase boundaries for xenpbr's "
                                                 "phase-based reboot.", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do ('xenpbr-agent COMMAND --help' for more)")
    phase = sub.add_parser("phase", help="mark the boundary at the end of phase NAME",
                           description="Run [phase:NAME] start, mark the boundary (dom0 "
                                       "may save an image), then the steps due after it.",
                           epilog=EPILOG)
    phase.add_argument("name", metavar="NAME", help="a phase declared as [phase:NAME]")
    _config_option(phase)
    phase.add_argument("--timeout", type=float, metavar="S",
                       help="seconds to wait for dom0's ack (default [agent] ack_timeout)")
    check = sub.add_parser("check", help="validate the config without acting",
                           description="Validate the agent config and print what it "
                                       "declares, or every error; no xenstore, no command.",
                           epilog=EPILOG)
    _config_option(check)
    check.add_argument("--json", action="store_true",
                       help="one JSON object: valid, errors, and the parsed config")
    inv = sub.add_parser("invalidate", help="ask dom0 to drop this guest's images of PHASE "
                                            "and every later phase", epilog=EPILOG)
    inv.add_argument("name", metavar="PHASE", help="the first phase whose images to drop")
    _config_option(inv)
    inv.add_argument("--timeout", type=float, metavar="S",
                     help="seconds to wait for dom0's answer (default [agent] ack_timeout)")
    res = sub.add_parser("resurrected", help="hand resurrected data to the applications and "
                                             "run their [resurrect] procedures",
                         epilog=EPILOG)
    _config_option(res)
    res.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait up to SECONDS for a delivery to every [resurrect] "
                          "application (default 0: what is there now)")
    beat = sub.add_parser("heartbeat", help="keep a heartbeat for dom0's liveness check "
                                            "(xenpbr_liveness_timeout); runs until killed",
                          epilog=EPILOG)
    beat.add_argument("--interval", type=float, default=2.0, metavar="S",
                      help="seconds between beats (default 2)")
    beat.add_argument("--count", type=int, metavar="N", help="stop after N beats")
    listener = sub.add_parser("provoke-listener",
                              help="let dom0 provoke LKDTM crash types in this kernel "
                                   "(xenpbr inject --fault lkdtm:TYPE); runs until killed",
                              epilog=EPILOG)
    listener.add_argument("--direct", default=None, metavar="PATH",
                          help="LKDTM's DIRECT file (default "
                               "/sys/kernel/debug/provoke-crash/DIRECT)")
    sub.add_parser("reach-counter",
                   help="count, for dom0, how often the kernel instruction a fault altered "
                        "runs (xenpbr inject --count-runs); runs until killed",
                   epilog=EPILOG)
    status = sub.add_parser("status", help="print the agent's last seq, verdict, generation",
                            epilog=EPILOG)
    _config_option(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    return parser


EPILOG = ("exit codes: 0 ok (check: valid), 2 usage or config error, 3 refused, "
          "4 no answer in time, 5 a configured command failed")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help="config file (default $XENPBR_AGENT_CONFIG or "
                             "/etc/xenpbr/agent.conf)")


#: syslog priorities of the log levels (sd-daemon(3) line prefixes).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    """Prefixes each line with ``<priority>``: journald then files a config error at
    priority error instead of info (it strips the prefix)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def _stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal ($JOURNAL_STREAM names it)."""
    try:
        device, inode = (int(x) for x in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    fmt = "xenpbr-agent[%(process)d]: %(levelname)s: %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt)
    if _stderr_is_journal():
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JournalFormatter(fmt))
    logging.getLogger("xenpbr_agent").setLevel(level)


def _exit_code(result: BoundaryResult | None, steps_ok: bool) -> int:
    if result is None:
        return EXIT_STEP_FAILED
    if result.verdict is None:
        return EXIT_TIMEOUT
    if result.verdict.kind is VerdictKind.REFUSED:
        return EXIT_REFUSED
    return EXIT_OK if steps_ok else EXIT_STEP_FAILED


def _timeout(args: argparse.Namespace, config: AgentConfig) -> float:
    timeout = config.ack_timeout if args.timeout is None else args.timeout
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"--timeout must be a positive number of seconds, got {timeout}")
    return timeout


def _salvage(name: str, text: str | None, path: str, error: ConfigError,
             mounts_path: str, xs_factory: XenstoreFactory) -> int:
    """The config is broken: mark nothing, say so loudly (in the log, and to dom0 so that
    it can say why this guest has no image), and still bring the guest up with whatever
    validates on its own (:mod:`xenpbr_agent.salvage`)."""
    for problem in error.problems:
        log.error("config error: %s", problem)
    report_problem(xs_factory, AgentProblem("config", name, error.problems[0]))
    log.error("boundary %s is not marked: no image is taken of a guest whose config is "
              "broken; fix %s (xenpbr-agent check --config %s lists every error)",
              name, path, path)
    if text is None:
        log.error("phase %s: nothing to salvage (the config cannot be read): no [phase:%s] "
                  "start, no [after-last-phase] mounts or services were run", name, name)
        print(f"{name} not-marked", flush=True)
        return EXIT_USAGE
    rescue = salvage.plan(text, path, name)
    for note in rescue.notes:
        log.error("phase %s: %s", name, note)
    log.warning("%s", salvage.describe(rescue))
    print(f"{name} not-marked", flush=True)  # before the steps: one may run for long
    salvage.run(rescue, mounts_path=mounts_path)
    return EXIT_USAGE


def cmd_phase(args: argparse.Namespace, xs_factory: XenstoreFactory, mounts_path: str,
              proc_path: str = PROC) -> int:
    path = args.config or default_path()
    text: str | None = None
    try:
        text = read_config_text(path)
        config = parse_config(text, path)
    except ConfigError as exc:
        return _salvage(args.name, text, path, exc, mounts_path, xs_factory)
    config.phase(args.name)
    timeout = _timeout(args, config)
    if not poststeps.before_boundary(config, args.name):
        print(f"{args.name} not-marked", flush=True)
        poststeps.after_boundary(config, args.name, None)
        return _exit_code(None, False)
    try:
        with xs_factory() as xs:
            result = mark_boundary(xs, config, args.name, StateStore(config.state_dir),
                                   timeout, mounts_path=mounts_path, proc_path=proc_path)
    except (AgentError, XenstoreError) as exc:
        print(f"xenpbr-agent: error: {exc}", file=sys.stderr, flush=True)
        print(f"{args.name} not-marked", flush=True)
        poststeps.after_boundary(config, args.name, None)  # the guest still comes up
        return EXIT_USAGE
    print(f"{result.phase} {result.text}", flush=True)
    if result.detail:
        log.warning("boundary %s refused (%s): %s", result.phase, result.verdict.reason
                    if result.verdict else "?", result.detail)
        _name_persistent_writers(result.detail, proc_path)
    elif result.verdict is not None and result.verdict.reason in HINTS:
        log.warning("boundary %s refused (%s): %s", result.phase, result.verdict.reason,
                    HINTS[result.verdict.reason])
    elif result.verdict is None:
        log.warning("boundary %s: no answer from dom0 within %g s (is xenpbrd running?); "
                    "the boot goes on without an image", result.phase, timeout)
    generation = (result.verdict.generation if result.verdict is not None
                  and result.verdict.kind is VerdictKind.RESTORED else None)
    if generation is not None:
        report_status(xs_factory, GuestStatus("acked", generation))
    steps_ok = poststeps.after_boundary(
        config, args.name, result.verdict,
        resurrect=lambda: _resurrect(config, xs_factory, 0.0) == EXIT_OK)
    if generation is not None:
        report_status(xs_factory, GuestStatus("ready" if steps_ok else "steps-failed",
                                              generation))
    return _exit_code(result, steps_ok)


def _resurrect(config: AgentConfig, xs_factory: XenstoreFactory, wait: float) -> int:
    """Hand over every delivery; print one line each; EXIT_STEP_FAILED if one was bad."""
    from xenpbr_agent.resurrected import hand_over_all
    try:
        with xs_factory() as xs:
            outcomes = hand_over_all(xs, config, wait)
    except XenstoreError as exc:
        log.error("resurrected: %s", exc)
        return EXIT_USAGE
    for outcome in outcomes:
        print(outcome.text(), flush=True)
    bad = [o for o in outcomes if o.confirmation is not None and not o.confirmation.ok]
    return EXIT_STEP_FAILED if bad else EXIT_OK


def cmd_resurrected(args: argparse.Namespace, xs_factory: XenstoreFactory) -> int:
    if not (math.isfinite(args.wait) and 0 <= args.wait <= MAX_WAIT_SECONDS):
        raise ConfigError(f"--wait must be 0 to {MAX_WAIT_SECONDS} seconds, got {args.wait}")
    return _resurrect(load_config(args.config), xs_factory, args.wait)


def cmd_invalidate(args: argparse.Namespace, xs_factory: XenstoreFactory) -> int:
    """Print ``<phase> dropped:<n>`` or ``<phase> refused:<why>`` or ``<phase> timeout``."""
    from xenpbr_agent.invalidate import request_invalidation
    config = load_config(args.config)
    timeout = _timeout(args, config)
    with xs_factory() as xs:
        answer = request_invalidation(xs, config, args.name, timeout)
    if answer is None:
        print(f"{args.name} timeout", flush=True)
        log.warning("no answer from dom0 within %g s (is xenpbrd running?)", timeout)
        return EXIT_TIMEOUT
    verdict = answer.encode().split(" ", 1)[1]
    print(f"{args.name} {verdict}", flush=True)
    return EXIT_OK if answer.refused is None else EXIT_REFUSED


def _status(args: argparse.Namespace, xs_factory: XenstoreFactory) -> dict[str, Any]:
    try:
        state_dir = load_config(args.config).state_dir
    except ConfigError:
        if args.config:
            raise
        state_dir = AgentConfig().state_dir
    state = StateStore(state_dir).load()
    out: dict[str, Any] = {"last_seq": state.seq, "last_phase": state.phase,
                           "last_verdict": state.verdict, "generation": state.generation,
                           "dom0_ack": None, "dom0_generation": None, "state_dir": state_dir}
    try:
        with xs_factory() as xs:
            ack = read_ack(xs)
            out["dom0_ack"] = ack.encode() if ack else None
            gen = xs.read_or(GENERATION_KEY, None)
            out["dom0_generation"] = int(gen) if gen is not None and gen.isdigit() else None
    except XenstoreError as exc:
        out["xenstore_error"] = str(exc)
    return out


def cmd_heartbeat(args: argparse.Namespace, xs_factory: XenstoreFactory) -> int:
    from xenpbr_agent.heartbeat import MAX_INTERVAL, MIN_INTERVAL, beat
    if not (math.isfinite(args.interval) and MIN_INTERVAL <= args.interval <= MAX_INTERVAL):
        raise ConfigError(f"--interval must be {MIN_INTERVAL} to {MAX_INTERVAL} seconds, "
                          f"got {args.interval}")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be at least 1, got {args.count}")
    beat(xs_factory, args.interval, args.count)
    return EXIT_OK


def cmd_provoke_listener(args: argparse.Namespace, xs_factory: XenstoreFactory) -> int:
    from xenpbr_agent.provoke import DIRECT, listen
    listen(xs_factory, args.direct or DIRECT)
    return EXIT_OK


def cmd_reach_counter(args: argparse.Namespace, xs_factory: XenstoreFactory) -> int:
    from xenpbr_agent.reach import count
    count(xs_factory)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, xs_factory: XenstoreFactory) -> int:
    out = _status(args, xs_factory)
    if args.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for key, value in out.items():
            print(f"{key.replace('_', ' ')}: {'-' if value is None else value}")
    return EXIT_OK


def main(argv: list[str] | None = None, *, xs_factory: XenstoreFactory | None = None,
         mounts_path: str = MOUNTS, proc_path: str = PROC) -> int:
    """Entry point (console script ``xenpbr-agent``); returns the exit code.
    ``xs_factory`` replaces the xenstore client (tests pass a FakeXenstore)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return int(exc.code or 0)
    _setup_logging(args.verbose, args.quiet)
    factory = xs_factory or XenstoreClient
    try:
        if args.command == "phase":
            return cmd_phase(args, factory, mounts_path, proc_path)
        if args.command == "invalidate":
            return cmd_invalidate(args, factory)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "resurrected":
            return cmd_resurrected(args, factory)
        if args.command == "heartbeat":
            return cmd_heartbeat(args, factory)
        if args.command == "provoke-listener":
            return cmd_provoke_listener(args, factory)
        if args.command == "reach-counter":
            return cmd_reach_counter(args, factory)
        return cmd_status(args, factory)
    except (AgentError, XenstoreError) as exc:
        print(f"xenpbr-agent: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
