"""xenpbr's persistent state: registered domains, their phase state and recovery history.

Everything the daemon knows lives here, so ``xenpbrd`` can be killed and restarted at
any moment (DESIGN.md: "survives its own restart"). Layout under the state root
(``/var/lib/xenpbr``, or ``$XENPBR_STATE_DIR``)::

    domains/<name>/domain.json      registration + phase state (atomic rewrite)
    domains/<name>/xl.cfg           the config handed to xl (phasereboot translated)
    domains/<name>/history/<n>.json one recovery timeline each, n increasing
    domains/<name>/recovering.json  present while a recovery runs (see recovery.py)
    images/                         the image store

Domain names become path components, so they are validated here (they come from the
operator's config, never from a guest).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from xenpbr.errors import XenpbrError
from xenpbr.fsutil import atomic_write, atomic_write_json
from xenpbr.phases import CrashLoopGuard, DomainPhases, ImageInfo, Trial
from xenpbr.timeline import Timeline

DEFAULT_ROOT = Path("/var/lib/xenpbr")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HISTORY_KEEP = 100
log = logging.getLogger(__name__)
T = TypeVar("T")


class StateError(XenpbrError):
    """The state directory is unusable or a record in it is damaged."""


class UnknownDomain(StateError):
    """The domain is not registered with xenpbr."""


def state_root() -> Path:
    """The state root: ``$XENPBR_STATE_DIR``, else ``[state] dir`` of the config file
    (docs/settings.md), else /var/lib/xenpbr."""
    from xenpbr import settings  # settings imports nothing of xenpbr but errors
    return settings.current().state_dir


def check_name(name: str) -> str:
    """A domain name safe to use as a directory name."""
    if not _NAME.match(name) or name in (".", ".."):
        raise StateError(f"domain name {name!r} is not usable by xenpbr: use letters, "
                         "digits, '_', '.', '-' (at most 64, starting with a letter/digit)")
    return name


def phases_to_json(p: DomainPhases) -> dict[str, Any]:
    return {"name": p.name, "phases": list(p.phases), "fingerprint": p.fingerprint,
            "generation": p.generation,
            "images": {k: asdict(v) for k, v in p.images.items()},
            "guard": asdict(p.guard),
            # the restore on trial survives xenpbrd's restart: a crash after it still
            # counts against the image (each image's failure count is in "images")
            "trial": None if p.trial is None else asdict(p.trial)}


def phases_from_json(d: dict[str, Any]) -> DomainPhases:
    return DomainPhases(name=d["name"], phases=tuple(d.get("phases", ())),
                        fingerprint=d.get("fingerprint", ""),
                        generation=int(d.get("generation", 0)),
                        images={k: ImageInfo(**v) for k, v in d.get("images", {}).items()},
                        guard=CrashLoopGuard(**d.get("guard", {})),
                        trial=Trial(**d["trial"]) if d.get("trial") else None)


class StateDir:
    """Read and write xenpbr's state below ``root``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or state_root()

    @property
    def images_root(self) -> Path:
        return self.root / "images"

    def _domain_dir(self, name: str) -> Path:
        return self.root / "domains" / check_name(name)

    def register(self, name: str, settings: dict[str, Any], xl_config_text: str,
                 source: str, uuid: str | None = None) -> None:
        """Record a domain xenpbr manages (``xenpbr create``); keeps existing phase
        state if the domain was registered before (its images stay usable if valid).
        ``uuid`` is the one xl was told to give the domain: xenpbrd adopts only it."""
        record = self.load_record(name) if self.is_registered(name) else {}
        record.update({"name": name, "settings": settings, "source": source,
                       "phases": record.get("phases") or phases_to_json(DomainPhases(name))})
        if uuid is not None:
            record["uuid"] = uuid
        atomic_write(self._domain_dir(name) / "xl.cfg", xl_config_text.encode())
        atomic_write_json(self._domain_dir(name) / "domain.json", record)

    def registration_files(self, name: str) -> dict[str, bytes] | None:
        """The registration's files as they are now (None if not registered), so a
        ``xenpbr create`` whose ``xl create`` failed can put them back."""
        if not self.is_registered(name):
            return None
        d = self._domain_dir(name)
        return {f: (d / f).read_bytes() for f in ("domain.json", "xl.cfg") if (d / f).exists()}

    def restore_registration(self, name: str, files: dict[str, bytes] | None) -> None:
        """Undo a registration: back to ``files`` (from :meth:`registration_files`), or
        not registered at all when there were none."""
        if files is None:
            if self._domain_dir(name).exists():
                self.unregister(name)
            return
        for file, data in files.items():
            atomic_write(self._domain_dir(name) / file, data)

    def registered_uuid(self, name: str) -> str | None:
        """The UUID ``xenpbr create`` gave the domain (None: registered before xenpbr
        recorded one, or the domain is not registered)."""
        try:
            record = self.load_record(name)
        except UnknownDomain:
            return None
        value = record.get("uuid") or record.get("settings", {}).get("uuid")
        return str(value).lower() if value else None

    def is_registered(self, name: str) -> bool:
        return (self._domain_dir(name) / "domain.json").exists()

    def domains(self) -> list[str]:
        """Names of the registered domains, sorted."""
        base = self.root / "domains"
        return sorted(p.name for p in base.iterdir()
                      if (p / "domain.json").exists()) if base.is_dir() else []

    def domain_setting(self, name: str, read: Callable[[Any], T],
                       fallback: str) -> T | None:
        """One setting of a registered domain, read by *read* (a :mod:`xenpbr.domconfig`
        policy function) from its recorded config; None, logged with *fallback*, when
        the config is unusable: a recovery or a check must not fail over a setting."""
        from xenpbr import domconfig
        settings = self.load_record(name).get("settings", {})
        try:
            return read(domconfig.DomainConfig(self.xl_config_path(name), settings))
        except domconfig.ConfigError as exc:
            log.error("%s: %s; %s", name, exc, fallback)
            return None

    def load_record(self, name: str) -> dict[str, Any]:
        path = self._domain_dir(name) / "domain.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise UnknownDomain(f"domain {name!r} is not registered with xenpbr "
                                "(create it with `xenpbr create CONFIG`)") from exc
        except ValueError as exc:
            raise StateError(f"{path} is damaged ({exc}); remove it and re-register the "
                             "domain with `xenpbr create`") from exc

    def xl_config_path(self, name: str) -> Path:
        return self._domain_dir(name) / "xl.cfg"

    def phases(self, name: str) -> DomainPhases:
        return phases_from_json(self.load_record(name)["phases"])

    def save_phases(self, state: DomainPhases) -> None:
        record = self.load_record(state.name)
        record["phases"] = phases_to_json(state)
        atomic_write_json(self._domain_dir(state.name) / "domain.json", record)

    def unregister(self, name: str) -> None:
        """Forget a domain's registration and history (its images are GC'd separately)."""
        d = self._domain_dir(name)
        if not d.exists():
            raise UnknownDomain(f"domain {name!r} is not registered with xenpbr")
        for path in sorted(d.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        d.rmdir()

    # -- history ---------------------------------------------------------------------

    def _history_dir(self, name: str) -> Path:
        return self._domain_dir(name) / "history"

    def add_history(self, timeline: Timeline) -> Path:
        """Store a finished (or failed) recovery's timeline; keep the newest 100."""
        hdir = self._history_dir(timeline.domain)
        hdir.mkdir(parents=True, exist_ok=True)
        numbers = sorted(int(p.stem) for p in hdir.glob("*.json") if p.stem.isdigit())
        path = hdir / f"{(numbers[-1] + 1) if numbers else 1:06d}.json"
        atomic_write_json(path, timeline.to_json())
        for old in numbers[:max(0, len(numbers) + 1 - HISTORY_KEEP)]:
            (hdir / f"{old:06d}.json").unlink(missing_ok=True)
        return path

    def _latest_history_path(self, name: str) -> Path | None:
        hdir = self._history_dir(name)
        numbers = sorted(int(p.stem) for p in hdir.glob("*.json")
                         if p.stem.isdigit()) if hdir.is_dir() else []
        return hdir / f"{numbers[-1]:06d}.json" if numbers else None

    @staticmethod
    def _load_timeline(path: Path) -> Timeline:
        try:
            return Timeline.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StateError(f"recovery record {path} is damaged: {exc}") from exc

    def latest_history(self, name: str) -> Timeline | None:
        """The newest recovery timeline of ``name`` (reads one file, not the history)."""
        path = self._latest_history_path(name)
        return None if path is None else self._load_timeline(path)

    def amend_latest_history(self, name: str, amend: Callable[[Timeline], bool]) -> bool:
        """Apply ``amend`` to the newest timeline of ``name``; rewrite it if it returns
        True (late marks: the guest's ack and service ready come after the recovery)."""
        path = self._latest_history_path(name)
        if path is None:
            return False
        timeline = self._load_timeline(path)
        if not amend(timeline):
            return False
        atomic_write_json(path, timeline.to_json())
        return True

    def history(self, name: str) -> Iterator[Timeline]:
        """The domain's recovery timelines, oldest first."""
        hdir = self._history_dir(name)
        for path in sorted(hdir.glob("*.json")) if hdir.is_dir() else []:
            yield self._load_timeline(path)

    # -- injected faults ---------------------------------------------------------------

    def _faults_path(self, name: str) -> Path:
        return self._domain_dir(name) / "faults.jsonl"

    def record_fault(self, name: str, record: dict[str, Any]) -> None:
        """Append what ``xenpbr inject`` changed in the domain (one JSON line, synced):
        a recovery after a fault is only explained if the fault is on record."""
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self._faults_path(name), "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def faults(self, name: str) -> list[dict[str, Any]]:
        """The faults injected into the domain, oldest first (damaged lines skipped)."""
        try:
            lines = self._faults_path(name).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s: damaged fault record skipped", name)
        return out

    # -- recovery intents --------------------------------------------------------------

    def _intent_path(self, name: str) -> Path:
        return self._domain_dir(name) / "recovering.json"

    def begin_recovery(self, name: str, fields: dict[str, Any]) -> None:
        """Record (or update) that a recovery of ``name`` is under way."""
        intent = self.recovery_intent(name) or {"started_wall": time.time()}
        intent.update(fields)
        atomic_write_json(self._intent_path(name), intent)

    def recovery_intent(self, name: str) -> dict[str, Any] | None:
        """The record of an unfinished recovery of ``name``, if any. A damaged record
        still means "unfinished" (it is returned empty): resuming is the safe side."""
        try:
            data = json.loads(self._intent_path(name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s: damaged recovery record (%s); treating it as unfinished",
                        name, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def end_recovery(self, name: str) -> None:
        self._intent_path(name).unlink(missing_ok=True)

    def interrupted_recoveries(self) -> list[str]:
        """Registered domains whose last recovery never finished."""
        return [n for n in self.domains() if self._intent_path(n).exists()]


    # -- pauses held for disk snapshots ---------------------------------------------------

    def _pause_path(self, name: str) -> Path:
        return self._domain_dir(name) / "pause-held.json"

    def begin_held_pause(self, name: str, domid: int) -> None:
        """Record that a capture of ``name`` (``domid``) may leave it paused (``xl save -c
        -p``) until its disk snapshots are taken: a xenpbrd killed meanwhile would
        otherwise leave the guest paused for good."""
        atomic_write_json(self._pause_path(name), {"domid": domid,
                                                   "started_wall": time.time()})

    def end_held_pause(self, name: str) -> None:
        self._pause_path(name).unlink(missing_ok=True)

    def held_pauses(self) -> list[tuple[str, int]]:
        """``(name, domid)`` of the captures a killed xenpbrd may have left paused (a
        damaged record is dropped: without its domid nothing can be unpaused safely)."""
        held = []
        for name in self.domains():
            try:
                held.append((name, int(json.loads(self._pause_path(name).read_text())
                                       ["domid"])))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("%s: damaged pause record (%s); dropped", name, exc)
                self.end_held_pause(name)
        return held


class DomainBusy(StateError):
    """A capture or a recovery of the domain holds its lock now."""


@contextmanager
def domain_lock(state: StateDir, name: str, *, wait: bool = True) -> Iterator[None]:
    """Serialise captures and recoveries of one domain across processes (daemon, CLI):
    an exclusive ``flock`` on ``locks/<name>.lock`` under the state root. With
    ``wait=False`` a held lock raises :class:`DomainBusy` at once (the fault injector
    refuses rather than queue behind a capture)."""
    path = state.root / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise DomainBusy(f"{name}: a capture or a recovery of it is running now; "
                             "try again when `xenpbr status` shows it watching") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
