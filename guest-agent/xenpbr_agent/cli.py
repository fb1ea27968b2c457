"""``xenpbr-agent``: the guest's command line.

::

    xenpbr-agent phase NAME [--config PATH] [--timeout S]   mark boundary NAME
    xenpbr-agent status [--config PATH] [--json]            what the agent last did
    xenpbr-agent invalidate PHASE [--config PATH]           drop images from PHASE on

``phase`` prints one line, ``<phase> <verdict>`` (``captured``, ``skipped``,
``refused:<reason>``, ``restored:<generation>``, ``timeout``, or ``not-marked`` when a
``start`` command failed), and exits 0 (captured, skipped, restored), 2 (usage, config,
no xenstore), 3 (refused), 4 (timeout) or 5 (a configured command failed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

from xenpbr.protocol import GENERATION_KEY, GuestStatus, VerdictKind
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
    poststeps,
)
from xenpbr_agent.boundary import (
    MOUNTS,
    PROC,
    BoundaryResult,
    mark_boundary,
    read_ack,
    report_status,
)
from xenpbr_agent.config import AgentConfig, load_config
from xenpbr_agent.state import StateStore

log = logging.getLogger("xenpbr_agent")

XenstoreFactory = Callable[[], Any]

#: What an operator can do about some refusals (the rest speak for themselves).
HINTS = {
    "disabled": "dom0 does not manage this domain with xenpbr (create it with 'xenpbr create')",
    "stale-seq": "another writer used a higher seq; the next run picks a fresh one",
    "out-of-order": "mark the phases in the order the config declares them",
    "persistent-disk-rw": "unmount persistent disks (or mount them read-only) before this "
                          "boundary; mount them with [after-last-phase] mount",
    "snapshot-not-frozen": "a snapshot disk is mounted read-write but could not be frozen "
                           "(see the agent's warning above: its file system cannot "
                           "freeze, or it holds the agent's output file); mount it "
                           "read-only before this boundary or use one that can freeze",
    "snapshot-failed": "dom0 could not snapshot a disk; see xenpbrd's log in dom0",
    "hazard": "a restartable candidate holds a non-O_APPEND write offset on a disk that is "
              "not reverted; start it in [after-last-phase] instead",
    "rate-limited": "too many boundaries in a short time; mark fewer",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenpbr-agent",
                                     description="Mark boot-phase boundaries for xenpbr's "
                                                 "phase-based reboot.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)
    phase = sub.add_parser("phase", help="mark the boundary at the end of phase NAME")
    phase.add_argument("name", metavar="NAME")
    phase.add_argument("--config", help="config file (default $XENPBR_AGENT_CONFIG or "
                                        "/etc/xenpbr/agent.conf)")
    phase.add_argument("--timeout", type=float, help="seconds to wait for dom0's ack "
                                                     "(default [agent] ack_timeout)")
    inv = sub.add_parser("invalidate", help="ask dom0 to drop this guest's images of PHASE "
                                            "and every later phase")
    inv.add_argument("name", metavar="PHASE")
    inv.add_argument("--config")
    inv.add_argument("--timeout", type=float, help="seconds to wait for dom0's answer")
    status = sub.add_parser("status", help="print the agent's last seq, verdict, generation")
    status.add_argument("--config")
    status.add_argument("--json", action="store_true", help="one JSON object")
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="xenpbr-agent[%(process)d]: %(levelname)s: %(message)s")
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


def cmd_phase(args: argparse.Namespace, xs_factory: XenstoreFactory, mounts_path: str,
              proc_path: str = PROC) -> int:
    config = load_config(args.config)
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
    steps_ok = poststeps.after_boundary(config, args.name, result.verdict)
    if generation is not None:
        report_status(xs_factory, GuestStatus("ready" if steps_ok else "steps-failed",
                                              generation))
    return _exit_code(result, steps_ok)


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
        return cmd_status(args, factory)
    except (AgentError, XenstoreError) as exc:
        print(f"xenpbr-agent: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
