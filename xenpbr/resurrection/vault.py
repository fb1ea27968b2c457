"""Dom0's durable copy of what was extracted from crashed guests, per domain and application.

Separate because extraction (reading a crashed guest, once, under a deadline), delivery
(back into the recovered guest, maybe much later, maybe after xenpbrd restarted) and the
operator's views (``xenpbr resurrected``) meet here and nowhere else: between the crash and
the guest's confirmation, this is the only copy of the application's data.

Layout under the vault root (``<state root>/resurrection``)::

    <domain>/<app>.vault     one application's latest good extraction

Each file is one atomic write (:func:`xenpbr.fsutil.atomic_write`): a first line
``xenpbr-vault 1 sha256=<hex>`` with the SHA-256 of the JSON body that follows it, checked
on every read. A file that fails the check (or cannot be parsed) is reported as damaged,
logged, and never handed out. An extraction replaces an application's file only if it kept
the region: a failed extraction never overwrites good data. Bounded: at most
``max_apps`` applications and ``max_domain_bytes`` of files per domain; an extraction over
the bound is not kept (logged), older data stays.

Application names come from the guest (validated by the region parser); they become file
names, so they are checked again here against the format's name rule.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenpbr.errors import XenpbrError
from xenpbr.fsutil import atomic_write
from xenpbr.guestproto.resurrection import APP_NAME
from xenpbr.resurrection.model import MIB, AppExtraction, Extraction, Record, Rejection
from xenpbr.state import check_name

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".vault"
_APP = APP_NAME
_HEADER = re.compile(rb"^xenpbr-vault (\d+) sha256=([0-9a-f]{64})\n")


class VaultError(XenpbrError):
    """The vault cannot store or read what it was asked to."""


@dataclass(frozen=True)
class Held:
    """One application's data the vault holds for a domain: its winning records, the
    records the crash cost it (``lost``: rejected with reasons, seq and key where they
    could be read), when it was extracted (wall time) and its payload ``bytes`` (keys and
    values of the records)."""

    app: str
    generation: int
    records: list[Record]
    lost: list[Rejection]
    extracted_at: float
    bytes: int


@dataclass(frozen=True)
class Damaged:
    """A vault file that failed its checksum or could not be read: never delivered."""

    app: str
    path: Path
    reason: str


@dataclass
class VaultContents:
    """What the vault has for a domain: the good entries and the damaged files."""

    held: list[Held] = field(default_factory=list)
    damaged: list[Damaged] = field(default_factory=list)


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes | None:
    return None if text is None else base64.b64decode(str(text), validate=True)


def record_to_json(record: Record) -> dict[str, Any]:
    return {"key": _b64(record.key), "seq": record.seq, "value": _b64(record.value),
            "tombstone": record.tombstone}


def record_from_json(data: dict[str, Any]) -> Record:
    return Record(key=_unb64(data["key"]) or b"", seq=int(data["seq"]),
                  value=_unb64(data["value"]) or b"", tombstone=bool(data["tombstone"]))


def rejection_to_json(rejection: Rejection) -> dict[str, Any]:
    return {"app": rejection.app, "reason": rejection.reason, "detail": rejection.detail,
            "slot": rejection.slot, "seq": rejection.seq, "key": _b64(rejection.key)}


def rejection_from_json(data: dict[str, Any]) -> Rejection:
    return Rejection(app=str(data["app"]), reason=str(data["reason"]),
                     detail=str(data.get("detail", "")), slot=data.get("slot"),
                     seq=data.get("seq"), key=_unb64(data.get("key")))


def held_to_json(held: Held) -> dict[str, Any]:
    """``held`` as JSON (keys and values base64): the vault file body and the export."""
    return {"format": FORMAT, "app": held.app, "generation": held.generation,
            "extracted_at": held.extracted_at, "bytes": held.bytes,
            "records": [record_to_json(r) for r in held.records],
            "lost": [rejection_to_json(r) for r in held.lost]}


def held_from_json(data: dict[str, Any]) -> Held:
    return Held(app=str(data["app"]), generation=int(data["generation"]),
                records=[record_from_json(r) for r in data["records"]],
                lost=[rejection_from_json(r) for r in data["lost"]],
                extracted_at=float(data["extracted_at"]), bytes=int(data["bytes"]))


def seal(body: bytes) -> bytes:
    """The file's bytes: the checksum line, then ``body``."""
    digest = hashlib.sha256(body).hexdigest().encode()
    return b"xenpbr-vault %d sha256=%s\n" % (FORMAT, digest) + body


def unseal(data: bytes) -> bytes:
    """The body of a vault file, after checking its format and checksum."""
    match = _HEADER.match(data)
    if match is None:
        raise VaultError("no xenpbr-vault header line")
    if int(match.group(1)) != FORMAT:
        raise VaultError(f"vault format {match.group(1).decode()} is not {FORMAT}")
    body = data[match.end():]
    if hashlib.sha256(body).hexdigest() != match.group(2).decode():
        raise VaultError("SHA-256 mismatch: the file changed after it was written")
    return body


def payload_bytes(records: list[Record]) -> int:
    """What a set of records holds: their keys and values."""
    return sum(len(r.key) + len(r.value) for r in records)


def check_app(app: str) -> str:
    """``app`` if it is a valid application name (it becomes a file name)."""
    if not _APP.fullmatch(app):
        raise VaultError(f"application name {app!r} is not valid "
                         f"({APP_NAME.pattern[:-2]}); not kept")
    return app


class Vault:
    """The vault below ``root`` (``<state root>/resurrection``)."""

    def __init__(self, root: Path, *, max_apps: int = 256,
                 max_domain_bytes: int = 256 * MIB) -> None:
        self.root, self.max_apps, self.max_domain_bytes = root, max_apps, max_domain_bytes

    @classmethod
    def in_state(cls, state_root: Path) -> Vault:
        """The vault of the state directory ``state_root``."""
        return cls(state_root / "resurrection")

    def _domain_dir(self, domain: str) -> Path:
        return self.root / check_name(domain)

    def _path(self, domain: str, app: str) -> Path:
        return self._domain_dir(domain) / f"{check_app(app)}{SUFFIX}"

    # -- writing ---------------------------------------------------------------------------

    def keep(self, domain: str, extraction: Extraction, at: float) -> list[str]:
        """Store each application of ``extraction`` whose region was kept (replacing what
        the vault had for it); returns the applications stored. ``at`` is the wall time
        of the extraction. Applications whose region was rejected keep their older data."""
        kept: list[str] = []
        for app in extraction.apps:
            if not app.kept:
                log.warning("%s: %s: region rejected (%s); the vault keeps what it had",
                            domain, app.app, _reasons(app))
                continue
            try:
                self._store(domain, self._held(app, at))
            except (VaultError, OSError) as exc:
                log.error("%s: %s: not kept in the vault: %s", domain, app.app, exc)
                continue
            kept.append(app.app)
        return kept

    @staticmethod
    def _held(app: AppExtraction, at: float) -> Held:
        live = list(app.records)
        lost = [r for r in app.rejections if r.slot is not None]
        return Held(app.app, app.generation, live, lost, at, payload_bytes(live))

    def _store(self, domain: str, held: Held) -> None:
        path = self._path(domain, held.app)
        body = json.dumps(held_to_json(held), sort_keys=True).encode()
        data = seal(body)
        self._check_bounds(domain, path, len(data))
        self._warn_if_replacing(domain, path)
        atomic_write(path, data, mode=0o600)

    def _warn_if_replacing(self, domain: str, path: Path) -> None:
        """Data still in the vault was never confirmed delivered (delivery drops it):
        replacing it loses it, so say what is lost."""
        if not path.exists():
            return
        try:
            old = self._read(path, path.name[:-len(SUFFIX)])
        except (VaultError, OSError, ValueError, KeyError, TypeError):
            return  # a damaged file: nothing deliverable is lost
        log.warning("%s: %s: a newer extraction replaces data never confirmed delivered "
                    "(generation %d, %d records, extracted at %.0f)", domain, old.app,
                    old.generation, len(old.records), old.extracted_at)

    def _check_bounds(self, domain: str, path: Path, size: int) -> None:
        others = [p for p in self._files(domain) if p != path]
        if len(others) >= self.max_apps:
            raise VaultError(f"the vault already holds {len(others)} applications for "
                             f"{domain} (at most {self.max_apps})")
        used = sum(p.stat().st_size for p in others)
        if used + size > self.max_domain_bytes:
            raise VaultError(f"{size} bytes would take {domain}'s vault over its "
                             f"{self.max_domain_bytes} bytes ({used} used)")

    def drop(self, domain: str, app: str) -> None:
        """Forget ``app``'s data for ``domain`` (delivered and confirmed, or discarded by
        the operator); nothing happens if there is none."""
        self._path(domain, app).unlink(missing_ok=True)

    def forget(self, domain: str) -> int:
        """Drop everything held for ``domain`` (``xenpbr unregister``); how many
        applications' data there was."""
        files = self._files(domain)
        for path in files:
            path.unlink(missing_ok=True)
        shutil.rmtree(self._domain_dir(domain), ignore_errors=True)
        return len(files)

    # -- reading ---------------------------------------------------------------------------

    def _files(self, domain: str) -> list[Path]:
        base = self._domain_dir(domain)
        return sorted(base.glob(f"*{SUFFIX}")) if base.is_dir() else []

    def contents(self, domain: str) -> VaultContents:
        """Everything the vault has for ``domain``, each file's checksum verified."""
        out = VaultContents()
        for path in self._files(domain):
            app = path.name[:-len(SUFFIX)]
            try:
                out.held.append(self._read(path, app))
            except (VaultError, OSError, ValueError, KeyError, TypeError) as exc:
                log.error("%s: vault file %s is damaged (%s); it will not be delivered",
                          domain, path, exc)
                out.damaged.append(Damaged(app, path, str(exc)))
        return out

    @staticmethod
    def _read(path: Path, app: str) -> Held:
        held = held_from_json(json.loads(unseal(path.read_bytes())))
        if held.app != app:
            raise VaultError(f"holds application {held.app!r}, not {app!r}")
        return held

    def held(self, domain: str) -> list[Held]:
        """The good entries the vault holds for ``domain`` (damaged files are logged and
        left out: see :meth:`contents`)."""
        return self.contents(domain).held

    def export(self, domain: str, dest: Path) -> list[Path]:
        """Write each good entry of ``domain`` to ``dest/<app>.json`` (keys and values in
        base64); returns the files written."""
        written = []
        for held in self.held(domain):
            path = dest / f"{held.app}.json"
            atomic_write(path, (json.dumps(held_to_json(held), indent=2, sort_keys=True)
                                + "\n").encode())
            written.append(path)
        return written


def _reasons(app: AppExtraction) -> str:
    return ", ".join(sorted({r.reason for r in app.rejections if r.slot is None}))
