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
    step_timeout = 60
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
"""

from __future__ import annotations

import configparser
import math
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenpbr.protocol import IDENTITY, MAX_PHASES, MAX_WAIT_SECONDS, PHASE_NAME
from xenpbr_agent import ConfigError

DEFAULT_PATH = "/etc/xenpbr/agent.conf"
DEFAULT_STATE_DIR = "/run/xenpbr-agent"
ENV_PATH = "XENPBR_AGENT_CONFIG"

Command = tuple[str, ...]

_AGENT_KEYS = {"identity", "ack_timeout", "step_timeout", "state_dir"}
_SECTION_KEYS = {"after-restore": {"run"}, "after-last-phase": {"start", "mount"}}
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
    step_timeout: float = 60.0
    state_dir: str = DEFAULT_STATE_DIR
    after_restore: tuple[Command, ...] = ()
    after_last_phase: tuple[Command, ...] = ()
    after_last_phase_mounts: tuple[MountSpec, ...] = ()
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


def _check_keys(section: configparser.SectionProxy, allowed: set[str], where: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")


def _agent_section(parser: configparser.ConfigParser, where: str) -> dict[str, Any]:
    if not parser.has_section("agent"):
        return {}
    section = parser["agent"]
    _check_keys(section, _AGENT_KEYS, f"{where} [agent]")
    out: dict[str, Any] = {}
    if "identity" in section:
        if not IDENTITY.fullmatch(section["identity"]):
            raise ConfigError(f"{where} [agent] identity must match {IDENTITY.pattern!r}, "
                              f"got {section['identity']!r}")
        out["identity"] = section["identity"]
    for key in ("ack_timeout", "step_timeout"):
        if key in section:
            out[key] = _seconds(section[key], f"{where} [agent] {key}")
    if "state_dir" in section:
        out["state_dir"] = section["state_dir"]
    return out


def _phase_section(parser: configparser.ConfigParser, name: str, where: str) -> PhaseConfig:
    phase = name.removeprefix("phase:")
    if not PHASE_NAME.fullmatch(phase):
        raise ConfigError(f"{where} [{name}]: phase names must match {PHASE_NAME.pattern!r}")
    section = parser[name]
    _check_keys(section, {"start"}, f"{where} [{name}]")
    return PhaseConfig(phase, _commands(section.get("start", ""), f"{where} [{name}] start"))


def _steps_section(parser: configparser.ConfigParser, name: str,
                   where: str) -> dict[str, Any]:
    """``[after-restore]`` or ``[after-last-phase]`` as AgentConfig fields."""
    section = parser[name]
    _check_keys(section, _SECTION_KEYS[name], f"{where} [{name}]")
    field = name.replace("-", "_")
    out: dict[str, Any] = {}
    for key in sorted(_SECTION_KEYS[name]):
        what = f"{where} [{name}] {key}"
        if key == "mount":
            out[f"{field}_mounts"] = _mounts(section.get(key, ""), what)
        else:
            out[field] = _commands(section.get(key, ""), what)
    return out


def parse_config(text: str, path: str | None = None) -> AgentConfig:
    """Parse config text (``path`` only names it in messages)."""
    where = path or "agent config"
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none",
                                       empty_lines_in_values=False, strict=True)
    try:
        parser.read_string(text, source=where)
    except configparser.Error as exc:
        raise ConfigError(f"{where}: {exc}") from None
    phases: list[PhaseConfig] = []
    extra: dict[str, Any] = {}
    for name in parser.sections():
        if name.startswith("phase:"):
            phases.append(_phase_section(parser, name, where))
        elif name in _SECTION_KEYS:
            extra.update(_steps_section(parser, name, where))
        elif name != "agent":
            raise ConfigError(f"{where}: unknown section [{name}] (allowed: [agent], "
                              "[phase:NAME], [after-restore], [after-last-phase])")
    if len(phases) > MAX_PHASES:
        raise ConfigError(f"{where}: {len(phases)} phases declared, at most {MAX_PHASES}")
    return AgentConfig(phases=tuple(phases), path=path, **_agent_section(parser, where),
                       **extra)


def load_config(path: str | None = None) -> AgentConfig:
    """Read the config at ``path`` (default: ``$XENPBR_AGENT_CONFIG`` or
    ``/etc/xenpbr/agent.conf``)."""
    path = path or default_path()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no agent config at {path}: create it (see guest-agent/README.md) "
                          "or pass --config PATH") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read agent config {path}: {exc}") from None
    return parse_config(text, path)
