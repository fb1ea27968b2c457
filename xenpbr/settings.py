"""dom0 settings of xenpbr and xenpbrd: one file an operator can find, environment on top.

Why: the settings used to be scattered over environment variables read in four modules
(``XENPBR_STATE_DIR``, ``XENPBR_HOT_CACHE``, ``XENPBR_LIBDIR``) or not settable at all
(the default image quota, the log level). They now live in one INI file,
``/etc/xenpbr/xenpbr.conf`` (or ``--config PATH`` / ``$XENPBR_CONFIG``), documented key
by key in docs/settings.md, with an example in hooks/xenpbr.conf. Precedence, highest
first: environment variable, file, built-in default.

The file is read strictly: an unknown section or key is an error that names the close
match (a typo must not be ignored the way ``xenpbr_disk`` once was), and so is a value
that does not parse. Errors derive from :class:`~xenpbr.errors.XenpbrError` and name where
the bad value came from (the file, or the environment variable).
"""

from __future__ import annotations

import configparser
import difflib
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from xenpbr.errors import XenpbrError

DEFAULT_PATH = Path("/etc/xenpbr/xenpbr.conf")
CONFIG_ENV = "XENPBR_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NO_LIMIT = ("", "none", "unlimited")


class SettingsError(XenpbrError):
    """The config file or an environment variable holds something xenpbr cannot use."""


@dataclass(frozen=True)
class Settings:
    """Every dom0 setting, typed. Defaults are the built-in ones."""

    #: [state] dir: registrations, phase state, histories and the image store.
    state_dir: Path = Path("/var/lib/xenpbr")
    #: [images] default_quota: bytes a domain's images may take (None: unlimited).
    image_quota: int | None = None
    #: [hot-stream] enabled: keep a ready ``xl restore`` stream of the newest image.
    hot_stream: bool = True
    #: [hot-stream] dir: where those streams live (None: <state dir>/images/hot).
    hot_stream_dir: Path | None = None
    #: [hot-stream] xen_zero_pages: auto | yes | no: hot streams leave the guest's zero
    #: pages for Xen to allocate (auto: when Xen's command line has scrub-domheap).
    xen_zero_pages: str = "auto"
    #: [log] level: xenpbrd's log threshold.
    log_level: str = "info"
    #: [xen] libdir: where Xen's libraries are (None: the dynamic loader's search).
    xen_libdir: Path | None = None

    def hot_root(self, store_root: Path) -> Path:
        """The folder holding the hot streams of the store at ``store_root``."""
        return self.hot_stream_dir or store_root / "hot"


@dataclass(frozen=True)
class Key:
    """One setting: where it is in the file, its variable and how its text parses."""

    section: str
    name: str
    env: str
    field: str
    parse: Callable[[str], Any]

    @property
    def label(self) -> str:
        return f"[{self.section}] {self.name}"


def parse_path(text: str) -> Path:
    """An absolute path (a relative one would depend on xenpbrd's working directory)."""
    path = Path(text.strip())
    if not path.is_absolute():
        raise ValueError("expected an absolute path")
    return path


def parse_optional_path(text: str) -> Path | None:
    return None if not text.strip() else parse_path(text)


def parse_bool(text: str) -> bool:
    states = configparser.ConfigParser.BOOLEAN_STATES
    try:
        return states[text.strip().lower()]
    except KeyError:
        raise ValueError("expected yes/no (also on/off, true/false, 1/0)") from None


def parse_size(text: str) -> int | None:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024); none/unlimited: no limit."""
    value = text.strip().lower()
    if value in _NO_LIMIT:
        return None
    number, unit = value.rstrip("kmgtib"), value[len(value.rstrip("kmgtib")):]
    unit = unit.removesuffix("ib").removesuffix("b")
    if not number.strip().isdigit() or unit not in _SIZE_UNITS:
        raise ValueError("expected a number of bytes with an optional K/M/G/T suffix "
                         "(e.g. 20G), or 'unlimited'")
    return int(number) * _SIZE_UNITS[unit]


def parse_auto_bool(text: str) -> str:
    """``auto``, or a yes/no answer normalised to ``yes``/``no``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return "yes" if parse_bool(text) else "no"
    except ValueError:
        raise ValueError("expected auto, or yes/no (also on/off, true/false, 1/0)") from None


def parse_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return level


KEYS = (
    Key("state", "dir", "XENPBR_STATE_DIR", "state_dir", parse_path),
    Key("images", "default_quota", "XENPBR_IMAGE_QUOTA", "image_quota", parse_size),
    Key("hot-stream", "enabled", "XENPBR_HOT_CACHE", "hot_stream", parse_bool),
    Key("hot-stream", "dir", "XENPBR_HOT_STREAM_DIR", "hot_stream_dir", parse_optional_path),
    Key("hot-stream", "xen_zero_pages", "XENPBR_XEN_ZERO_PAGES", "xen_zero_pages",
        parse_auto_bool),
    Key("log", "level", "XENPBR_LOG_LEVEL", "log_level", parse_level),
    Key("xen", "libdir", "XENPBR_LIBDIR", "xen_libdir", parse_optional_path),
)
assert {k.field for k in KEYS} == {f.name for f in fields(Settings)}


def key(field: str) -> Key:
    """The :class:`Key` of a :class:`Settings` field (for messages naming a setting)."""
    return next(k for k in KEYS if k.field == field)


def hint(field: str) -> str:
    """How an operator changes a setting, for refusal messages: file key and variable."""
    k = key(field)
    return f"{k.label} in {DEFAULT_PATH} (or ${k.env})"


def _close(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _read_file(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       default_section="\0none")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except configparser.Error as exc:
        raise SettingsError(f"config file {path}: {exc}".replace("\n", " ")) from exc
    return parser


def _check_names(path: Path, parser: configparser.ConfigParser) -> None:
    """Unknown sections and keys are errors naming the close match."""
    sections = sorted({k.section for k in KEYS})
    for section in parser.sections():
        if section not in sections:
            raise SettingsError(f"config file {path}: unknown section [{section}]"
                                f"{_close(section, sections)}; known: {', '.join(sections)}")
        names = [k.name for k in KEYS if k.section == section]
        for name in parser[section]:
            if name not in names:
                raise SettingsError(f"config file {path}: unknown key {name!r} in "
                                    f"[{section}]{_close(name, names)}; known: "
                                    f"{', '.join(names)}")


def _parse(k: Key, text: str, where: str) -> Any:
    try:
        return k.parse(text)
    except ValueError as exc:
        raise SettingsError(f"{where}: {text!r} is not usable: {exc}") from None


def config_path(explicit: Path | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[Path, bool]:
    """The config file to read and whether it must exist (named explicitly)."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return Path(explicit), True
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), True
    return DEFAULT_PATH, False


def load(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults, overridden by the file, overridden by the environment.

    ``path``: the ``--config`` file; without it ``$XENPBR_CONFIG``; without that
    /etc/xenpbr/xenpbr.conf if it exists. A file named explicitly must exist.
    :raises SettingsError: unreadable file, unknown name, value that does not parse."""
    env = os.environ if environ is None else environ
    path, required = config_path(path, env)
    values: dict[str, Any] = {}
    if required or path.exists():
        parser = _read_file(path)
        _check_names(path, parser)
        for k in KEYS:
            if parser.has_option(k.section, k.name):
                values[k.field] = _parse(k, parser.get(k.section, k.name),
                                         f"config file {path}: {k.label}")
    for k in KEYS:
        if k.env in env:
            values[k.field] = _parse(k, env[k.env], f"environment variable {k.env}")
    return Settings(**values)


_current: Settings | None = None


def current() -> Settings:
    """The process's settings: those set by :func:`use` (xenpbrd after parsing its
    command line), else loaded now (cheap: a small file; the environment may change
    between calls in tests and tools, so nothing is cached)."""
    return _current if _current is not None else load()


def use(settings: Settings | None) -> None:
    """Make ``settings`` the process's settings (None: load them on each use again)."""
    global _current
    _current = settings


def with_overrides(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with command-line values (those not None) on top."""
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
