"""What the agent still does when its config does not validate: bring the guest up.

A typo in ``/etc/xenpbr/agent.conf`` must not leave a guest without its services: before
this, ``xenpbr-agent phase NAME`` exited on the error and the ``[after-last-phase]``
services and mounts never started. But a broken config must not produce an image either
(nobody knows what the operator meant the phases to contain). So the rule, for
``xenpbr-agent phase NAME`` with a config file that reads but does not validate:

- no boundary is marked (no xenstore request at all): the agent prints
  ``NAME not-marked``, logs every error at priority error, and exits 2;
- the sections that validate *on their own* still run, as a normal boot without xenpbr
  would run them: ``[phase:NAME] start``, then, when NAME is the last ``[phase:...]``
  header in the file, ``[after-last-phase]`` (mounts, then starts);
- a section that does not validate alone (the typo is inside it, or it appears twice)
  is not run, and the log says so: its commands cannot be trusted;
- salvaged steps have no time limit (``[agent]`` of a broken file is not trusted, and
  no limit is the default anyway).

A config that cannot be read at all (missing, unreadable, not UTF-8) leaves nothing to
salvage; the agent says so. Sections are found by their header lines, not by
configparser, so that an error configparser stops at (a line before any section, a
duplicate section) does not hide the sections that are fine.
"""

from __future__ import annotations

import configparser
from dataclasses import dataclass, field

from xenpbr_agent import ConfigError, poststeps
from xenpbr_agent.boundary import MOUNTS
from xenpbr_agent.config import AgentConfig, parse_config
from xenpbr_agent.poststeps import Runner, StepLimit, run_command

_HEADER = configparser.ConfigParser.SECTCRE
_LAST = "after-last-phase"


def split_sections(text: str) -> list[tuple[str, str]]:
    """``(section name, its text from the header on)`` in file order; lines before the
    first header belong to no section and are dropped."""
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines(keepends=True):
        match = _HEADER.match(line.rstrip()) if line[:1] == "[" else None
        if match:
            sections.append((match.group("header"), [line]))
        elif sections:
            sections[-1][1].append(line)
    return [(name, "".join(lines)) for name, lines in sections]


@dataclass
class SalvagePlan:
    """What a broken config still lets the agent run for one phase, and why not more."""

    phase: str
    phase_config: AgentConfig | None = None  # its [phase:NAME] alone, if it validates
    last_config: AgentConfig | None = None  # [after-last-phase] alone, when NAME is last
    is_last: bool = False
    notes: list[str] = field(default_factory=list)  # what is not run, and why


def _alone(sections: list[tuple[str, str]], name: str, path: str,
           notes: list[str]) -> AgentConfig | None:
    """Section ``name`` parsed on its own, or None (with a note saying why)."""
    texts = [body for header, body in sections if header == name]
    if len(texts) != 1:
        notes.append(f"[{name}] appears {len(texts)} times in {path}: not run")
        return None
    try:
        return parse_config(texts[0], path)
    except ConfigError as exc:
        notes.append(f"[{name}] is itself invalid, not run: {exc}")
        return None


def plan(text: str, path: str, phase: str) -> SalvagePlan:
    """What to run for ``xenpbr-agent phase <phase>`` when ``text`` does not validate."""
    sections = split_sections(text)
    phases = [header.removeprefix("phase:") for header, _ in sections
              if header.startswith("phase:")]
    result = SalvagePlan(phase, is_last=bool(phases) and phases[-1] == phase)
    if phase not in phases:
        result.notes.append(f"no [phase:{phase}] header in {path}: nothing of it to run")
    else:
        result.phase_config = _alone(sections, f"phase:{phase}", path, result.notes)
    if result.is_last and any(header == _LAST for header, _ in sections):
        result.last_config = _alone(sections, _LAST, path, result.notes)
    return result


def describe(result: SalvagePlan) -> str:
    """One line for the log (and ``xenpbr-agent check``): what still runs."""
    runs = []
    if result.phase_config is not None and result.phase_config.phases[0].start:
        runs.append(f"[phase:{result.phase}] start")
    last = result.last_config
    if last is not None and (last.after_last_phase_mounts or last.after_last_phase):
        keys = [k for k, v in (("mount", last.after_last_phase_mounts),
                               ("start", last.after_last_phase)) if v]
        runs.append(f"[{_LAST}] {' and '.join(keys)}")
    if not runs and result.notes:
        return f"phase {result.phase}: nothing salvaged from the broken config"
    if not runs:
        return f"phase {result.phase}: nothing to run (it declares no commands)"
    return f"phase {result.phase}: still running {' and '.join(runs)} (no boundary marked)"


def run(result: SalvagePlan, *, runner: Runner = run_command, mounts_path: str = MOUNTS) -> bool:
    """Run what ``result`` salvaged, in boot order; True if all of it succeeded (and
    something was salvageable)."""
    ok = True
    if result.phase_config is not None:
        ok &= poststeps.before_boundary(result.phase_config, result.phase, runner=runner)
    if result.last_config is not None:
        ok &= poststeps.after_last_phase(result.last_config, StepLimit(), runner=runner,
                                         mounts_path=mounts_path)
    return ok
