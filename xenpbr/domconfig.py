"""Read xl domain configs, translate xenpbr's actions for xl, derive image fingerprints.

xl rejects unknown actions (``Unknown on_crash action "phasereboot" specified``), so
``xenpbr create`` reads the operator's config, replaces ``phasereboot`` with
``preserve`` (the crashed domain must stay, with its memory, until xenpbr has dealt with
it) and hands xl the translated file. The original settings are kept so the daemon knows
what the operator asked for.

The grammar is the subset of xl.cfg(5) that domain configs use: ``KEY = VALUE`` lines,
``#`` comments, values that are strings (single or double quoted, C-style escapes),
integers, floats or (nested) lists of those. Anything else is a :class:`ConfigError`
naming the file, line and what was expected.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from xenpbr.errors import XenpbrError
from xenpbr.phases import HEALTH_DEFAULTS, Fingerprint
from xenpbr.resurrection.model import MIB, Caps

Value = Union[str, int, float, list["Value"]]

XENPBR_ACTION = "phasereboot"
ACTION_KEYS = ("on_crash", "on_watchdog")
XL_ACTIONS = {"destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
              "coredump-restart", "soft-reset"}
_TOKEN = re.compile(r"""
    (?P<space>[ \t\r]+) | (?P<comment>\#[^\n]*) | (?P<newline>\n|;)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>[+-]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d+)?))
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*) | (?P<op>\+?=|[\[\],])
""", re.X)
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}


class ConfigError(XenpbrError):
    """An xl config xenpbr cannot read or accept."""


@dataclass(frozen=True)
class DomainConfig:
    """An xl domain config as the operator wrote it, plus where it came from."""

    path: Path
    settings: dict[str, Value]

    @property
    def name(self) -> str:
        name = self.settings.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.path}: the config has no name = \"...\" setting")
        return name

    def wants_phasereboot(self, key: str = "on_crash") -> bool:
        """True if the operator asked xenpbr to handle ``key`` (on_crash/on_watchdog)."""
        return self.settings.get(key) == XENPBR_ACTION

    def for_xl(self) -> dict[str, Value]:
        """The settings xl accepts: ``phasereboot`` actions become ``preserve`` and
        xenpbr's own ``xenpbr_*`` keys are left out."""
        translated = {k: v for k, v in self.settings.items() if not k.startswith("xenpbr_")}
        for key in ACTION_KEYS:
            if translated.get(key) == XENPBR_ACTION:
                translated[key] = "preserve"
        return translated


def _tokens(text: str, path: Path) -> list[tuple[str, str, int]]:
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(f"{path}:{line}: unexpected character {text[pos]!r}")
        kind = m.lastgroup or ""
        if kind == "newline":
            out.append(("newline", m.group(), line))
            line += 1
        elif kind not in ("space", "comment"):
            out.append((kind, m.group(), line))
        pos = m.end()
    out.append(("newline", "", line))
    return out


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]], path: Path) -> None:
        self.tokens, self.pos, self.path = tokens, 0, path

    def peek(self) -> tuple[str, str, int]:
        return self.tokens[self.pos]

    def take(self, kind: str, text: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok[0] != kind or (text is not None and tok[1] != text):
            want = text or kind
            raise ConfigError(f"{self.path}:{tok[2]}: expected {want}, found {tok[1]!r}")
        self.pos += 1
        return tok

    def value(self) -> Value:
        kind, text, line = self.peek()
        if kind == "string":
            self.pos += 1
            return _unquote(text)
        if kind == "number":
            self.pos += 1
            return float(text) if "." in text else int(text, 0)
        if (kind, text) == ("op", "["):
            return self.list_value()
        raise ConfigError(f"{self.path}:{line}: expected a value, found {text!r}")

    def list_value(self) -> list[Value]:
        self.take("op", "[")
        items: list[Value] = []
        while True:
            while self.peek()[0] == "newline":
                self.pos += 1
            if self.peek()[1] == "]":
                self.pos += 1
                return items
            items.append(self.value())
            while self.peek()[0] == "newline":
                self.pos += 1
            if self.peek()[1] == ",":
                self.pos += 1
            elif self.peek()[1] != "]":
                raise ConfigError(f"{self.path}:{self.peek()[2]}: expected ',' or ']' in a "
                                  f"list, found {self.peek()[1]!r}")

    def settings(self) -> dict[str, Value]:
        result: dict[str, Value] = {}
        while self.pos < len(self.tokens):
            if self.peek()[0] == "newline":
                self.pos += 1
                continue
            _, key, line = self.take("name")
            op = self.take("op")[1]
            if op not in ("=", "+="):
                raise ConfigError(f"{self.path}:{line}: expected '=' after {key}")
            value = self.value()
            if op == "+=":
                prev = result.get(key, [])
                if not isinstance(prev, list) or not isinstance(value, list):
                    raise ConfigError(f"{self.path}:{line}: '+=' needs lists ({key})")
                value = prev + value
            result[key] = value
            self.take("newline")
        return result


def parse(text: str, path: Path = Path("<config>")) -> DomainConfig:
    """Parse xl config text, validating xenpbr's and xl's action keys."""
    settings = _Parser(_tokens(text, path), path).settings()
    for key in (*ACTION_KEYS, "on_poweroff", "on_reboot"):
        action = settings.get(key)
        if action is None:
            continue
        allowed = XL_ACTIONS | ({XENPBR_ACTION} if key in ACTION_KEYS else set())
        if action not in allowed:
            raise ConfigError(f"{path}: {key} = {action!r} is not an action; use one of "
                              f"{', '.join(sorted(allowed))}")
    check_xenpbr_keys(DomainConfig(path, settings))
    crash_loop_policy(DomainConfig(path, settings))  # ConfigError now, not at the crash
    health_policy(DomainConfig(path, settings))
    hot_stream(DomainConfig(path, settings))
    live_capture(DomainConfig(path, settings))
    standby(DomainConfig(path, settings))
    resurrect_caps(DomainConfig(path, settings))
    liveness_timeout(DomainConfig(path, settings))
    if settings.get("type", "pv") != "pv":
        if any(settings.get(k) == XENPBR_ACTION for k in ACTION_KEYS):
            raise ConfigError(f"{path}: phasereboot supports PV guests only "
                              f"(type = {settings['type']!r})")
    return DomainConfig(path, settings)


def load(path: Path) -> DomainConfig:
    """Read and parse an xl config file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read domain config {path}: {exc.strerror}") from exc
    return parse(text, path)


def render(settings: dict[str, Value]) -> str:
    """xl config text for ``settings`` (what ``xl create`` is given)."""
    def value(v: Value) -> str:
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)
    return "".join(f"{key} = {value(v)}\n" for key, v in settings.items())


#: (path, device, inode, size, mtime, ctime) -> SHA-256: every boundary, even a skip,
#: fingerprints the kernel and ramdisk; hashing them each time (seconds under TCG) let a
#: guest flooding well-formed requests block xenpbrd's loop (issue 13).
_DIGESTS: dict[tuple[object, ...], str] = {}


def file_digest(path: str | None) -> str:
    """SHA-256 of a file named in the config ('' if none): images depend on the bytes of
    the kernel and ramdisk, not on their names. Remembered while the file's identity,
    size and times are unchanged (as git's index does)."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key not in _DIGESTS:
                h = hashlib.sha256()
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
                if len(_DIGESTS) > 256:
                    _DIGESTS.clear()
                _DIGESTS[key] = h.hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} to fingerprint it: {exc.strerror}") from exc
    return _DIGESTS[key]


#: ``xenpbr_crash_loop_window`` (seconds) and ``xenpbr_crash_loop_limit`` (crashes):
#: a crash sooner than the window after a phase-based reboot recovers from one phase
#: earlier; ``limit`` such crashes in a row get a normal reboot.
CRASH_LOOP_DEFAULTS = (60.0, 3)


def crash_loop_policy(config: DomainConfig) -> tuple[float, int]:
    """``(window_s, limit)`` of the crash-loop guard for this domain."""
    window = config.settings.get("xenpbr_crash_loop_window", CRASH_LOOP_DEFAULTS[0])
    limit = config.settings.get("xenpbr_crash_loop_limit", CRASH_LOOP_DEFAULTS[1])
    if not isinstance(window, (int, float)) or not 0 < window <= 86400:
        raise ConfigError(f"{config.path}: xenpbr_crash_loop_window = {window!r}: expected a "
                          "number of seconds between 1 and 86400")
    if not isinstance(limit, int) or not 1 <= limit <= 100:
        raise ConfigError(f"{config.path}: xenpbr_crash_loop_limit = {limit!r}: expected a "
                          "whole number of crashes between 1 and 100")
    return float(window), limit


def health_policy(config: DomainConfig) -> tuple[float, int]:
    """``(xenpbr_healthy_after, xenpbr_image_failures)`` of this domain.

    A guest restored from an image has proven healthy once it reported ``ready`` (its
    post-restore steps ran) and then stayed up ``xenpbr_healthy_after`` seconds (default
    120: twice the default crash-loop window, so the crashes the guard misses are the
    ones this catches; a latent fault in an image usually fires within the first minutes
    of the work it resumes, and a healthy guest is cleared two minutes after it is ready).
    ``xenpbr_image_failures`` restores in a row that crashed before that abandon the image
    (default 2: one crash after a restore may be bad luck, outside the image; a second
    from the same saved state points at the image, and abandoning it costs only the work
    of the phases after the earlier image).
    """
    after = config.settings.get("xenpbr_healthy_after", HEALTH_DEFAULTS[0])
    failures = config.settings.get("xenpbr_image_failures", HEALTH_DEFAULTS[1])
    if isinstance(after, bool) or not isinstance(after, (int, float)) \
            or not 0 <= after <= 86400:
        raise ConfigError(f"{config.path}: xenpbr_healthy_after = {after!r}: expected a "
                          "number of seconds between 0 and 86400 (how long a restored "
                          "guest must stay up after reporting ready)")
    if isinstance(failures, bool) or not isinstance(failures, int) or not 1 <= failures <= 100:
        raise ConfigError(f"{config.path}: xenpbr_image_failures = {failures!r}: expected a "
                          "whole number of unhealthy restores between 1 and 100")
    return float(after), failures


def liveness_timeout(config: DomainConfig) -> float | None:
    """``xenpbr_liveness_timeout`` (seconds; unset or 0: off): dom0's liveness check for
    a guest without a watchdog of its own. Once the guest's agent has written a
    heartbeat (``xenpbr-agent heartbeat``), a heartbeat that stops changing for this
    long while the guest runs is a hang: xenpbrd shuts the domain down with reason
    ``watchdog``, and its ``on_watchdog`` decides what follows (``phasereboot``). At least
    10 s: a busy guest must not be taken for a hung one."""
    value = config.settings.get("xenpbr_liveness_timeout", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not (value == 0 or 10 <= value <= 86400):
        raise ConfigError(f"{config.path}: xenpbr_liveness_timeout = {value!r}: expected 0 "
                          "(off) or the seconds, between 10 and 86400, a running guest's "
                          "heartbeat may stand still before it is treated as hung")
    if value and config.settings.get("on_watchdog") != XENPBR_ACTION:
        raise ConfigError(f"{config.path}: xenpbr_liveness_timeout needs on_watchdog = "
                          f"\"{XENPBR_ACTION}\": a guest found hung is shut down with reason "
                          "watchdog, and xl's own on_watchdog actions would destroy or "
                          "restart it instead of restoring its image")
    return float(value) or None


def hot_stream(config: DomainConfig) -> bool:
    """``xenpbr_hot_stream`` (1, default, or 0): keep the newest image's stream ready as a
    file for ``xl restore`` (:mod:`xenpbr.images.hotcache`): one raw image of space for a
    faster recovery; 0 restores from the page store, verifying every page."""
    value = config.settings.get("xenpbr_hot_stream", 1)
    if value not in (0, 1) or isinstance(value, float):
        raise ConfigError(f"{config.path}: xenpbr_hot_stream = {value!r}: expected 1 (keep "
                          "the newest image's stream ready) or 0 (restore from verified pages)")
    return bool(value)


def live_capture(config: DomainConfig) -> bool:
    """``xenpbr_live_capture`` (0, default, or 1): 1 captures each phase's image while the
    guest runs (``xl migrate`` to a recorder in dom0: the guest is suspended only for the
    pages it dirtied during the copy, and for the disk snapshots); 0 uses ``xl save -c``,
    which suspends it for the whole copy of its memory (:mod:`xenpbr.xl.migrate`). Off by
    default: it needs a Xen with shadow paging (log-dirty mode for PV guests), which
    Debian 12's current hypervisor lacks (capture() then falls back to ``xl save -c``)."""
    value = config.settings.get("xenpbr_live_capture", 0)
    if value not in (0, 1) or isinstance(value, float):
        raise ConfigError(f"{config.path}: xenpbr_live_capture = {value!r}: expected 1 (copy "
                          "memory while the guest runs) or 0 (suspend it for the whole copy)")
    return bool(value)


def standby(config: DomainConfig) -> bool:
    """``xenpbr_standby`` (0, default, or 1): 1 keeps the newest image restored and paused
    beside the guest (``<name>--standby``, :mod:`xenpbr.images.standby`), so a crash is
    recovered by a rename and an unpause instead of a restore: the fastest recovery, for
    one more guest's memory in Xen while the guest runs."""
    value = config.settings.get("xenpbr_standby", 0)
    if value not in (0, 1) or isinstance(value, float):
        raise ConfigError(f"{config.path}: xenpbr_standby = {value!r}: expected 1 (keep a "
                          "paused standby domain ready, costs one more guest's memory) or 0")
    return bool(value)


#: ``xenpbr_resurrect`` caps: name -> (smallest, largest) allowed value. A guest decides
#: what it registers, so the operator bounds what dom0 reads of a crashed one: regions,
#: bytes (at most 1 GiB, read while the guest waits to be recovered) and seconds (at most
#: 30: resurrection must never hold a recovery up for long).
RESURRECT_BOUNDS: dict[str, tuple[float, float]] = {
    "regions": (1, 256), "bytes": (4096, 1024 * MIB), "seconds": (0.01, 30.0)}
_SIZE_UNITS = {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB}
_RESURRECT_HELP = ('expected 0 (off), 1 (on, with the default caps regions=8,bytes=16M,'
                   'seconds=30) or a string of caps such as "regions=8,bytes=16M,seconds=5" '
                   '(any of them; regions 1..256, bytes 4K..1G with an optional K/M/G '
                   'suffix, seconds 0.01..30)')


def resurrect_caps(config: DomainConfig) -> Caps | None:
    """``xenpbr_resurrect``: the caps of resurrection for this domain, None if it is off
    (absent or 0). ``1`` means the defaults of :class:`~xenpbr.resurrection.model.Caps`;
    a string sets any of ``regions``, ``bytes`` and ``seconds``, the rest default."""
    value = config.settings.get("xenpbr_resurrect", 0)
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return Caps() if value else None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{config.path}: xenpbr_resurrect = {value!r}: {_RESURRECT_HELP}")
    caps: dict[str, float] = {}
    for item in value.split(","):
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or name not in RESURRECT_BOUNDS or name in caps:
            raise ConfigError(f"{config.path}: xenpbr_resurrect = {value!r}: "
                              f"{item.strip()!r} is not a cap (or repeats one); "
                              f"{_RESURRECT_HELP}")
        caps[name] = _resurrect_cap(config, value, name, text)
    return Caps(regions=int(caps.get("regions", Caps.regions)),
                bytes=int(caps.get("bytes", Caps.bytes)),
                seconds=float(caps.get("seconds", Caps.seconds)))


def _resurrect_cap(config: DomainConfig, value: str, name: str, text: str) -> float:
    """One cap's number, within :data:`RESURRECT_BOUNDS`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", text)
    number: float | None = None
    if match is not None:
        unit = match.group(2).lower()
        if name == "bytes" and "." not in match.group(1):
            number = int(match.group(1)) * _SIZE_UNITS[unit]
        elif name == "seconds" and not unit:
            number = float(match.group(1))
        elif name == "regions" and not unit and "." not in match.group(1):
            number = int(match.group(1))
    low, high = RESURRECT_BOUNDS[name]
    if number is None or not low <= number <= high:
        raise ConfigError(f"{config.path}: xenpbr_resurrect = {value!r}: {name}={text!r} "
                          f"is out of range or not a number; {_RESURRECT_HELP}")
    return number


#: The ``xenpbr_*`` keys xenpbr reads; any other ``xenpbr_*`` key is a typo that would
#: otherwise be dropped without a word (``xenpbr_disk`` for ``xenpbr_disks``).
XENPBR_KEYS = ("xenpbr_disks", "xenpbr_crash_loop_window", "xenpbr_crash_loop_limit",
               "xenpbr_hot_stream", "xenpbr_healthy_after", "xenpbr_image_failures",
               "xenpbr_resurrect", "xenpbr_liveness_timeout", "xenpbr_live_capture",
               "xenpbr_standby")


def check_xenpbr_keys(config: DomainConfig) -> None:
    """Refuse ``xenpbr_*`` keys xenpbr does not know, naming the closest known one."""
    for key in config.settings:
        if key.startswith("xenpbr_") and key not in XENPBR_KEYS:
            # compared without the shared prefix, which makes every key look alike
            close = difflib.get_close_matches(key[7:], [k[7:] for k in XENPBR_KEYS], n=1,
                                              cutoff=0.6)
            hint = (f"did you mean xenpbr_{close[0]}?" if close
                    else f"xenpbr knows {', '.join(XENPBR_KEYS)}")
            raise ConfigError(f"{config.path}: unknown setting {key}: {hint}")


def config_uuid(config: DomainConfig) -> str | None:
    """The config's ``uuid`` in canonical form, None if it has none: xenpbrd adopts only
    the domain with the UUID it created (not another one that reuses the name)."""
    value = config.settings.get("uuid")
    if value is None:
        return None
    try:
        return str(uuid_mod.UUID(str(value)))
    except ValueError as exc:
        raise ConfigError(f"{config.path}: uuid = {value!r} is not a UUID (e.g. "
                          f"\"{uuid_mod.uuid4()}\", or leave it out and xenpbr create "
                          "makes one)") from exc


DISK_POLICIES = ("snapshot", "persistent", "readonly")
#: What each policy means, for the refusal of a config that leaves a disk without one.
POLICY_MEANINGS = {
    "snapshot": "reverted with the image at every phase-based reboot (data written "
                "since the image is lost)",
    "persistent": "never reverted; must not be mounted read-write inside an image "
                  "(dom0 refuses a boundary while it is)",
    "readonly": "attached read-only (access=ro in the disk spec)",
}
#: A read-write disk with no ``xenpbr_disks`` entry (registered by an older xenpbr:
#: xenpbrd still reverts it like ``snapshot``).
UNSET = "unset"


def _disk_spec(spec: str) -> tuple[str, str, str]:
    """``(vdev, target, access)`` of one xl disk spec (xl-disk-configuration(5)): keyed
    (``vdev=xvda, target=/img``) or positional (``target,[format,]vdev,access``)."""
    parts = [p.strip() for p in spec.split(",")]
    keyed = dict(p.split("=", 1) for p in parts if "=" in p)
    positional = [p for p in parts if "=" not in p]
    if len(positional) == 3:  # target,vdev,access: the format was left out
        positional.insert(1, "")
    target = keyed.get("target", positional[0] if positional else "")
    vdev = keyed.get("vdev", positional[2] if len(positional) > 2 else "")
    access = keyed.get("access", positional[3] if len(positional) > 3 else "rw")
    if not vdev:
        raise ConfigError(f"disk {spec!r}: no vdev (e.g. vdev=xvda)")
    return vdev, target, access


def _disk_specs(config: DomainConfig) -> dict[str, tuple[str, str]]:
    """``{vdev: (target, access)}`` of the config's ``disk`` list."""
    disks = config.settings.get("disk", [])
    if not isinstance(disks, list):
        raise ConfigError(f"{config.path}: disk must be a list of disk specifications")
    return {vdev: (target, access) for vdev, target, access in map(_disk_spec, map(str, disks))}


def declared_disk_policies(config: DomainConfig) -> dict[str, str]:
    """Each disk's policy as the config states it: its ``xenpbr_disks`` entry,
    ``readonly`` for a read-only disk, :data:`UNSET` for a read-write disk without one."""
    specs = _disk_specs(config)
    explicit: dict[str, str] = {}
    entries = config.settings.get("xenpbr_disks", [])
    for item in entries if isinstance(entries, list) else [entries]:
        vdev, _, policy = str(item).partition("=")
        if vdev not in specs or policy not in DISK_POLICIES:
            raise ConfigError(f"{config.path}: xenpbr_disks entry {item!r}: expected "
                              f"VDEV=POLICY with VDEV one of {sorted(specs)} and POLICY one "
                              f"of {', '.join(DISK_POLICIES)}")
        explicit[vdev] = policy
    return {vdev: explicit.get(vdev, "readonly" if access in ("r", "ro") else UNSET)
            for vdev, (target, access) in specs.items()}


def disk_policies(config: DomainConfig) -> dict[str, str]:
    """Each disk's effective consistency policy. A read-write disk without an entry
    exists only in registrations made before policies were required
    (:func:`require_disk_policies`); it is reverted like ``snapshot``, as it was then,
    so an image never runs against a disk newer than its memory."""
    return {vdev: "snapshot" if policy == UNSET else policy
            for vdev, policy in declared_disk_policies(config).items()}


def stored_disk_policies(settings: dict[str, Value]) -> dict[str, str]:
    """``{vdev: policy}`` from a registration's stored settings, for ``xenpbr status``;
    never raises (settings an older xenpbr accepted may no longer validate): then each
    disk shows what is stored for it, even a value no longer valid, ``readonly`` if it
    is attached read-only, or :data:`UNSET`."""
    config = DomainConfig(Path("<registered>"), settings)
    try:
        return declared_disk_policies(config)
    except ConfigError:
        pass
    listed = settings.get("xenpbr_disks", [])
    stored = dict(str(item).partition("=")[::2] for item in
                  (listed if isinstance(listed, list) else []))
    disks = settings.get("disk", [])
    policies = {}
    for spec in disks if isinstance(disks, list) else []:
        try:
            vdev, _, access = _disk_spec(str(spec))
        except ConfigError:
            continue
        policies[vdev] = stored.get(vdev, "readonly" if access in ("r", "ro") else UNSET)
    return policies


def require_disk_policies(config: DomainConfig) -> dict[str, str]:
    """The disks' policies, refusing a phasereboot domain with a read-write disk that
    has no ``xenpbr_disks`` entry: defaulting it to ``snapshot`` would silently roll
    its data (logs, upgrades) back at every phase-based reboot."""
    declared = declared_disk_policies(config)
    if not any(config.wants_phasereboot(key) for key in ACTION_KEYS):
        return disk_policies(config)
    unset = [vdev for vdev, policy in declared.items() if policy == UNSET]
    if unset:
        raise ConfigError(_unset_message(config, unset))
    return declared


def _unset_message(config: DomainConfig, unset: list[str]) -> str:
    specs = _disk_specs(config)
    disks = "; ".join(f"{vdev} (target {specs[vdev][0] or '?'})" for vdev in unset)
    meanings = "; ".join(f"{p}: {m}" for p, m in POLICY_MEANINGS.items())
    stated = config.settings.get("xenpbr_disks", [])
    entries = [str(e) for e in (stated if isinstance(stated, list) else [stated])]
    line = ", ".join(f'"{e}"' for e in [*entries, *(f"{v}=snapshot" for v in unset)])
    return (f"{config.path}: phasereboot needs a policy for each read-write disk, and "
            f"these have none: {disks}. Policies: {meanings}. Add to the config (choosing "
            f"each policy): xenpbr_disks = [{line}]")


#: Legacy prefixes of a disk target (``phy:/dev/vg/lv``, ``file:/img``, ``tap:aio:/img``).
_TARGET_PREFIXES = ("tap:aio:", "tap2:aio:", "phy:", "file:", "aio:", "qcow2:", "raw:")


def disk_targets(config: DomainConfig) -> dict[str, str]:
    """Each disk's target path in dom0 (the file or block device behind ``vdev``), with
    xl's legacy prefixes removed: what a snapshot copies and a revert writes."""
    targets = {}
    for vdev, target, _ in map(_disk_spec, map(str, config.settings.get("disk", []))):  # type: ignore[arg-type]
        for prefix in _TARGET_PREFIXES:
            if target.startswith(prefix):
                target = target[len(prefix):]
                break
        targets[vdev] = target
    return targets


def snapshot_disks(config: DomainConfig) -> dict[str, str]:
    """``{vdev: target}`` of the disks whose policy is ``snapshot`` (reverted with their
    image), in vdev order."""
    policies, targets = disk_policies(config), disk_targets(config)
    return {vdev: targets[vdev] for vdev in sorted(policies) if policies[vdev] == "snapshot"}


def _disk_entries(config: DomainConfig) -> tuple[tuple[str, str, str], ...]:
    policies = disk_policies(config)
    entries = [(vdev, target, policies[vdev])
               for vdev, target, _ in map(_disk_spec, map(str, config.settings.get("disk", [])))]  # type: ignore[arg-type]
    return tuple(sorted(entries))


def fingerprint(config: DomainConfig, phases: tuple[str, ...], identity: str) -> Fingerprint:
    """The image fingerprint of ``config`` with the guest's declared phases/identity."""
    s = config.settings
    kernel, ramdisk = s.get("kernel"), s.get("ramdisk")
    return Fingerprint(
        kernel=file_digest(kernel if isinstance(kernel, str) else None),
        ramdisk=file_digest(ramdisk if isinstance(ramdisk, str) else None),
        cmdline=" ".join(str(s.get(k, "")) for k in ("cmdline", "root", "extra")).strip(),
        memory_mib=int(s.get("memory", 0)),  # type: ignore[arg-type]
        vcpus=int(s.get("vcpus", 1)),  # type: ignore[arg-type]
        disks=_disk_entries(config),
        phases=phases,
        identity=identity,
    )
