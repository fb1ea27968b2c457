"""The agent's config file (``/etc/xenpbr/agent.conf``, INI read with configparser).

Strict on purpose: an unknown section or key is an error, not ignored, because a typo in
``[after-last-phase]`` would otherwise start a non-candidate service inside an image.

Comments take whole lines (``#`` or ``;`` first): a ``#`` later in a line is part of the
value. Commands are one per line (indent continuation lines), split with ``shlex`` and run
without a shell (write ``sh -c '...'`` when you need one)::

    [agent]
    # bump the identity to invalidate this guest's images (e.g. after an upgrade)
    identity = 2026-11-23.1
    ack_timeout = 120
    # no step_timeout by default: a step still working is never killed; set one only
    # to bound a step that may hang (it is then killed, with a message naming this key)
    state_dir = /run/xenpbr-agent

    # the phases, in boot order (1 to 8); "start" runs before the boundary is marked
    [phase:kernel]
    [phase:services]
    start = /etc/init.d/ssh start
            /etc/init.d/cron start

    # only after restored:<generation>
    [after-restore]
    run = /sbin/hwclock --hctosys

    # non-candidate services: after the last boundary, whatever its verdict; "mount"
    # (DEVICE MOUNTPOINT [FSTYPE [OPTIONS]], one per line) runs first: the persistent
    # disks, which dom0 refuses to capture while they are mounted read-write
    [after-last-phase]
    mount = /dev/xvdb /data ext4 noatime
    start = /etc/init.d/auditd start

    # resurrection procedures: <app> = <command>, run once per delivery of the app's
    # recovered records, with $XENPBR_RESURRECTED_DIR naming its folder
    [resurrect]
    kvdemo = /usr/local/bin/kvdemo --reload
"""

from __future__ import annotations

import configparser
import difflib
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from xenpbr.guestproto.resurrection_delivery import APP_NAME
from xenpbr.guestproto.wire import IDENTITY, MAX_PHASES, MAX_WAIT_SECONDS, PHASE_NAME
from xenpbr_agent import ConfigError

DEFAULT_PATH = "/etc/xenpbr/agent.conf"
DEFAULT_STATE_DIR = "/run/xenpbr-agent"
ENV_PATH = "XENPBR_AGENT_CONFIG"

Command = tuple[str, ...]

_AGENT_KEYS = {"identity", "ack_timeout", "step_timeout", "state_dir"}
_SECTION_KEYS = {"after-restore": {"run"}, "after-last-phase": {"start", "mount"}}
_FIXED_SECTIONS = ("agent", *_SECTION_KEYS, "resurrect")
_T = TypeVar("_T")
#: A mount's FSTYPE: a name, never an option (``-o``) in disguise.
_FSTYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,31}")


@dataclass(frozen=True)
class MountSpec:
    """One ``[after-last-phase] mount`` line: ``DEVICE MOUNTPOINT [FSTYPE [OPTIONS]]``."""

    device: str
    mount_point: str
    fstype: str | None = None
    options: str | None = None

    def command(self) -> Command:
        """``mount [-t FSTYPE] [-o OPTIONS] DEVICE MOUNTPOINT``."""
        argv = ["mount"]
        if self.fstype:
            argv += ["-t", self.fstype]
        if self.options:
            argv += ["-o", self.options]
        return (*argv, self.device, self.mount_point)


@dataclass(frozen=True)
class PhaseConfig:
    """One boot phase: its name and the commands run before its boundary is marked."""

    name: str
    start: tuple[Command, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    phases: tuple[PhaseConfig, ...] = ()
    identity: str = "0"
    ack_timeout: float = 120.0
    #: None (the default): steps run as long as they need; a number is the operator's
    #: opt-in limit (a slow machine must not turn a long warm-up into an outage)
    step_timeout: float | None = None
    state_dir: str = DEFAULT_STATE_DIR
    after_restore: tuple[Command, ...] = ()
    after_last_phase: tuple[Command, ...] = ()
    after_last_phase_mounts: tuple[MountSpec, ...] = ()
    #: ``[resurrect]``: each application's resurrection procedure (one command)
    resurrect: dict[str, Command] = field(default_factory=dict)
    path: str | None = None

    @property
    def phase_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.phases)

    def phase(self, name: str) -> PhaseConfig:
        """The phase called ``name``; :class:`ConfigError` if the config lacks it."""
        for p in self.phases:
            if p.name == name:
                return p
        declared = ", ".join(self.phase_names) or "none"
        raise ConfigError(f"phase {name!r} is not declared in {self.path or 'the config'} "
                          f"(declared: {declared}); add a [phase:{name}] section")

    def is_last(self, name: str) -> bool:
        return bool(self.phases) and self.phases[-1].name == name


def default_path() -> str:
    return os.environ.get(ENV_PATH) or DEFAULT_PATH


def _commands(text: str, where: str) -> tuple[Command, ...]:
    """One command per non-empty line, split like a shell would (no shell runs them)."""
    commands = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            argv = tuple(shlex.split(line))
        except ValueError as exc:
            raise ConfigError(f"{where}: cannot split command {line.strip()!r}: {exc}") from None
        commands.append(argv)
    return tuple(commands)


def _mount(line: str, where: str) -> MountSpec:
    """One mount line, validated now: a typo must not surface as a failed mount after
    the last image point."""
    try:
        fields = shlex.split(line)
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot split {line.strip()!r}: {exc}") from None
    if not 2 <= len(fields) <= 4:
        raise ConfigError(f"{where}: {line.strip()!r} must be DEVICE MOUNTPOINT [FSTYPE "
                          f"[OPTIONS]] (2 to 4 fields, got {len(fields)})")
    device, mount_point, *rest = fields
    fstype = rest[0] if rest else None
    options = rest[1] if len(rest) > 1 else None
    if not device.startswith("/dev/") or device == "/dev/":
        raise ConfigError(f"{where}: the device must be a /dev/ path, got {device!r}")
    if not os.path.isabs(mount_point):
        raise ConfigError(f"{where}: the mount point must be absolute, got {mount_point!r}")
    if fstype is not None and not _FSTYPE.fullmatch(fstype):
        raise ConfigError(f"{where}: bad file system type {fstype!r} (a name like ext4)")
    if options is not None and (not options or options.startswith("-")):
        raise ConfigError(f"{where}: bad mount options {options!r} (comma-separated, "
                          "like noatime,errors=remount-ro)")
    return MountSpec(device, os.path.normpath(mount_point), fstype, options)


def _mounts(text: str, where: str) -> tuple[MountSpec, ...]:
    """One mount per non-empty line."""
    return tuple(_mount(line, where) for line in text.splitlines() if line.strip())


def _seconds(value: str, where: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_WAIT_SECONDS):
        raise ConfigError(f"{where}: must be between 0 and {MAX_WAIT_SECONDS} seconds, "
                          f"got {value!r}")
    return seconds


def _suggest(name: str, choices: list[str], show: Callable[[str], str]) -> str:
    """``(did you mean X?)`` for a close match, else the list of what is allowed: a typo
    is the usual cause, and the fix should be in the message."""
    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        return f"(did you mean {show(close[0])}?)"
    return f"(allowed: {', '.join(show(c) for c in sorted(choices))})"


def _check_keys(section: configparser.SectionProxy, allowed: set[str], where: str) -> None:
    """Refuse keys the agent does not know, one message per key (all of them at once)."""
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError.of([f"{where}: unknown key {key!r} in [{section.name}] "
                              f"{_suggest(key, sorted(allowed), repr)}" for key in unknown])


def _unknown_section(name: str, where: str) -> str:
    """The message for an unknown section: ``[phses:app]`` suggests ``[phase:app]``."""
    choices = [*_FIXED_SECTIONS, f"phase:{name.partition(':')[2] or 'NAME'}"]
    return f"{where}: unknown section [{name}] {_suggest(name, choices, '[{}]'.format)}"


class _Problems:
    """Collects every error of one config instead of stopping at the first."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def attempt(self, parse: Callable[..., _T], *args: Any) -> _T | None:
        """``parse(*args)``, or None with its errors recorded."""
        try:
            return parse(*args)
        except ConfigError as exc:
            self.errors.extend(exc.problems)
            return None

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigError.of(self.errors)


def _identity(value: str, where: str) -> str:
    if not IDENTITY.fullmatch(value):
        raise ConfigError(f"{where} [agent] identity must match {IDENTITY.pattern!r}, "
                          f"got {value!r}")
    return value


def _agent_section(parser: configparser.ConfigParser, where: str,
                   problems: _Problems) -> dict[str, Any]:
    """``[agent]`` as AgentConfig fields; every bad value is recorded in ``problems``."""
    if not parser.has_section("agent"):
        return {}
    section = parser["agent"]
    problems.attempt(_check_keys, section, _AGENT_KEYS, where)
    parsers: dict[str, Callable[[str, str], Any]] = {
        "identity": _identity, "ack_timeout": _seconds, "step_timeout": _seconds,
        "state_dir": lambda value, _where: value}
    out: dict[str, Any] = {}
    for key, parse in parsers.items():
        if key in section:
            what = where if key == "identity" else f"{where} [agent] {key}"
            value = problems.attempt(parse, section[key], what)
            if value is not None:
                out[key] = value
    return out


def _phase_section(parser: configparser.ConfigParser, name: str, where: str) -> PhaseConfig:
    phase = name.removeprefix("phase:")
    if not PHASE_NAME.fullmatch(phase):
        raise ConfigError(f"{where} [{name}]: phase names must match {PHASE_NAME.pattern!r}")
    section = parser[name]
    _check_keys(section, {"start"}, where)
    return PhaseConfig(phase, _commands(section.get("start", ""), f"{where} [{name}] start"))


def _steps_section(parser: configparser.ConfigParser, name: str,
                   where: str) -> dict[str, Any]:
    """``[after-restore]`` or ``[after-last-phase]`` as AgentConfig fields."""
    section = parser[name]
    _check_keys(section, _SECTION_KEYS[name], where)
    field = name.replace("-", "_")
    out: dict[str, Any] = {}
    for key in sorted(_SECTION_KEYS[name]):
        what = f"{where} [{name}] {key}"
        if key == "mount":
            out[f"{field}_mounts"] = _mounts(section.get(key, ""), what)
        else:
            out[field] = _commands(section.get(key, ""), what)
    return out


def _resurrect_section(parser: configparser.ConfigParser, where: str) -> dict[str, Any]:
    """``[resurrect]``: ``<app> = <command>``, one command per application."""
    procedures: dict[str, Command] = {}
    errors = []
    for app, text in parser["resurrect"].items():
        what = f"{where} [resurrect] {app}"
        if not APP_NAME.fullmatch(app):
            errors.append(f"{what}: application names must match {APP_NAME.pattern!r}")
            continue
        try:
            commands = _commands(text, what)
        except ConfigError as exc:
            errors.extend(exc.problems)
            continue
        if len(commands) != 1:
            errors.append(f"{what}: one command per application, got {len(commands)} "
                          "(write sh -c '...' for several)")
            continue
        procedures[app] = commands[0]
    if errors:
        raise ConfigError.of(errors)
    return {"resurrect": procedures}


def parse_config(text: str, path: str | None = None) -> AgentConfig:
    """Parse config text (``path`` only names it in messages)."""
    where = path or "agent config"
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none",
                                       empty_lines_in_values=False, strict=True)
    try:
        parser.read_string(text, source=where)
    except configparser.Error as exc:
        raise ConfigError(f"{where}: {exc}") from None
    problems = _Problems()
    phases: list[PhaseConfig] = []
    extra: dict[str, Any] = {}
    for name in parser.sections():
        if name.startswith("phase:"):
            phase = problems.attempt(_phase_section, parser, name, where)
            phases += [phase] if phase is not None else []
        elif name in _SECTION_KEYS:
            extra.update(problems.attempt(_steps_section, parser, name, where) or {})
        elif name == "resurrect":
            extra.update(problems.attempt(_resurrect_section, parser, where) or {})
        elif name != "agent":
            problems.errors.append(_unknown_section(name, where))
    declared = sum(name.startswith("phase:") for name in parser.sections())
    if declared > MAX_PHASES:
        problems.errors.append(f"{where}: {declared} phases declared, at most {MAX_PHASES}")
    agent = _agent_section(parser, where, problems)
    problems.raise_any()
    return AgentConfig(phases=tuple(phases), path=path, **agent, **extra)


def load_config(path: str | None = None) -> AgentConfig:
    """Read the config at ``path`` (default: ``$XENPBR_AGENT_CONFIG`` or
    ``/etc/xenpbr/agent.conf``)."""
    path = path or default_path()
    return parse_config(read_config_text(path), path)


def read_config_text(path: str) -> str:
    """The file's text; :class:`ConfigError` if it is missing or unreadable (kept apart
    from parsing so that a file that reads but does not validate can be salvaged)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no agent config at {path}: create it (see guest-agent/README.md) "
                          "or pass --config PATH") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc}") from None
