"""``xenpbr-agent check``: validate the agent config without acting.

An operator edits ``/etc/xenpbr/agent.conf`` and wants to know before the next boot
whether it is right, and what the agent will run when: this reads and validates the
file and prints the phases in order with their ``start`` commands, the post-restore and
after-last-phase steps, the resurrection procedures and the timeouts, or every error found at once (with what a boot
would still salvage). It touches neither xenstore nor any command, so it is safe to run
anywhere, at any time (also in dom0 on a guest's file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from typing import Any

from xenpbr_agent import EXIT_OK, EXIT_USAGE, ConfigError, salvage
from xenpbr_agent.config import (
    AgentConfig,
    MountSpec,
    default_path,
    parse_config,
    read_config_text,
)


def _seconds(value: float | None, unset: str) -> str:
    return unset if value is None else f"{value:g} s"


def _mount_text(spec: MountSpec) -> str:
    extra = ", ".join(x for x in (spec.fstype, spec.options) if x)
    return f"{spec.device} on {spec.mount_point}" + (f" ({extra})" if extra else "")


def summary_lines(config: AgentConfig) -> list[str]:
    """The readable summary of a valid config, in the order the agent runs things."""
    lines = [f"identity: {config.identity}",
             f"ack_timeout: {_seconds(config.ack_timeout, '-')}",
             f"step_timeout: {_seconds(config.step_timeout, 'none (steps run as long as they need)')}",
             f"state_dir: {config.state_dir}",
             "phases, in boot order:"]
    for number, phase in enumerate(config.phases, 1):
        lines.append(f"  {number}. {phase.name}")
        lines += [f"       start: {shlex.join(c)}" for c in phase.start]
    lines.append("after-restore:" + ("" if config.after_restore else " nothing"))
    lines += [f"  run: {shlex.join(c)}" for c in config.after_restore]
    last = config.after_last_phase_mounts or config.after_last_phase
    lines.append("after-last-phase:" + ("" if last else " nothing"))
    lines += [f"  mount: {_mount_text(m)}" for m in config.after_last_phase_mounts]
    lines += [f"  start: {shlex.join(c)}" for c in config.after_last_phase]
    lines.append("resurrect:" + ("" if config.resurrect else " nothing"))
    lines += [f"  {app}: {shlex.join(c)}" for app, c in sorted(config.resurrect.items())]
    return lines


def summary_json(config: AgentConfig) -> dict[str, Any]:
    """The same as typed JSON: numbers, nulls, argv lists."""
    return {"identity": config.identity, "ack_timeout": config.ack_timeout,
            "step_timeout": config.step_timeout, "state_dir": config.state_dir,
            "phases": [{"name": p.name, "start": [list(c) for c in p.start]}
                       for p in config.phases],
            "after_restore": [list(c) for c in config.after_restore],
            "after_last_phase": {
                "mount": [dataclasses.asdict(m) for m in config.after_last_phase_mounts],
                "start": [list(c) for c in config.after_last_phase]},
            "resurrect": {app: list(c) for app, c in config.resurrect.items()}}


def salvage_lines(text: str, path: str) -> list[str]:
    """What a boot with this broken file would still run, phase by phase."""
    phases = [name.removeprefix("phase:") for name, _ in salvage.split_sections(text)
              if name.startswith("phase:")]
    lines = []
    for phase in dict.fromkeys(phases):
        rescue = salvage.plan(text, path, phase)
        lines += [salvage.describe(rescue), *(f"  {note}" for note in rescue.notes)]
    return lines or ["no [phase:...] header: nothing would run"]


def check(path: str) -> tuple[AgentConfig | None, list[str], list[str]]:
    """``(config or None, errors, salvage lines)`` for the file at ``path``."""
    try:
        text = read_config_text(path)
    except ConfigError as exc:
        return None, list(exc.problems), ["the file cannot be read: nothing to salvage"]
    try:
        return parse_config(text, path), [], []
    except ConfigError as exc:
        return None, list(exc.problems), salvage_lines(text, path)


def cmd_check(args: argparse.Namespace) -> int:
    path = args.config or default_path()
    config, errors, rescue = check(path)
    if args.json:
        out: dict[str, Any] = {"config": path, "valid": config is not None, "errors": errors}
        out.update(summary_json(config) if config is not None else {"salvage": rescue})
        print(json.dumps(out, sort_keys=True))
    elif config is not None:
        print("\n".join([f"{path}: valid", *summary_lines(config)]))
    else:
        count = f"{len(errors)} error{'s' if len(errors) > 1 else ''}"
        print("\n".join([f"{path}: invalid, {count}:", *(f"  {e}" for e in errors),
                         "a boot with this file marks no boundary; it would still run:",
                         *(f"  {line}" for line in rescue)]))
    return EXIT_OK if config is not None else EXIT_USAGE
