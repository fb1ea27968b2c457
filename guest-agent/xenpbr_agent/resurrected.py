"""Receiving resurrected data: dom0's deliveries into files, the application's procedure, the
confirmation.

One concern: the guest's end of delivery (docs/resurrection.md, "Delivery"). For each
application dom0 delivered to (``control/xenpbr/resurrected/<app>``), the agent reads the
manifest and chunks, checks sizes and CRC (:mod:`xenpbr.guestproto.resurrection_delivery`),
writes ``records.json`` and ``lost.json`` under ``/run/xenpbr/resurrected/<app>/``, runs the
application's ``[resurrect]`` command with ``XENPBR_RESURRECTED_DIR`` set to that folder,
and confirms ``ok <generation>`` (or ``bad <generation> <reason>``) in
``data/xenpbr/resurrected/<app>``, once per generation: a delivery already confirmed is not
handed over again. Applications read their data back with :func:`load_resurrected`.

Separate from :mod:`xenpbr_agent.poststeps` (it reuses its command runner) because it reads
a payload dom0 wrote and must verify before anything is trusted.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenpbr.guestproto.resurrection_delivery import (
    CONFIRM_DIR,
    DELIVERY_DIR,
    Confirmation,
    ConfirmationMalformed,
    DeliveryMalformed,
    Manifest,
    Payload,
    app_from_key,
    app_key,
    decode_chunk,
    decode_payload,
    join_chunks,
    parse_confirmation,
    parse_manifest,
)
from xenpbr.xenstore import XenstoreClient, XenstoreError
from xenpbr.xenstore.errors import NoSuchKey
from xenpbr_agent.config import AgentConfig
from xenpbr_agent.poststeps import Runner, StepLimit, run_command, run_steps

log = logging.getLogger(__name__)

ROOT = "/run/xenpbr/resurrected"
ENV_DIR = "XENPBR_RESURRECTED_DIR"
_WATCH_TOKEN = "xenpbr-resurrected"


@dataclass(frozen=True)
class Outcome:
    """What happened to one application's delivery."""

    app: str
    confirmation: Confirmation | None  # None: nothing new to confirm (not ready, or done)
    records: int = 0
    lost: int = 0
    note: str = ""

    def text(self) -> str:
        if self.confirmation is None:
            return f"{self.app} {self.note}"
        return f"{self.app} {self.confirmation.encode()} records={self.records} lost={self.lost}"


# -- reading a delivery ------------------------------------------------------------------------


def delivered_apps(xs: XenstoreClient) -> list[str]:
    """The applications dom0 has delivered to (or is delivering to)."""
    try:
        keys = xs.ls(DELIVERY_DIR)
    except NoSuchKey:
        return []
    apps = [app_from_key(key) for key in keys]
    return sorted(app for app in apps if app is not None)


def _manifest_raw(xs: XenstoreClient, app: str) -> bytes | None:
    return xs.read_or(f"{DELIVERY_DIR}/{app_key(app)}", None)


def receive(xs: XenstoreClient, app: str, manifest: Manifest) -> Payload:
    """The verified payload of ``app``'s delivery; :class:`DeliveryMalformed` otherwise."""
    base = f"{DELIVERY_DIR}/{app_key(app)}"
    chunks = [decode_chunk(i, xs.read_or(f"{base}/{i}", None)) for i in range(manifest.chunks)]
    return decode_payload(join_chunks(manifest, chunks))


def _confirmed(xs: XenstoreClient, app: str) -> Confirmation | None:
    raw = xs.read_or(f"{CONFIRM_DIR}/{app_key(app)}", None)
    try:
        return parse_confirmation(raw) if raw is not None else None
    except ConfirmationMalformed:
        return None


def confirm(xs: XenstoreClient, app: str, confirmation: Confirmation) -> None:
    xs.write(f"{CONFIRM_DIR}/{app_key(app)}", confirmation.encode())
    log.info("resurrected %s: confirmed %s", app, confirmation.encode())


# -- files -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _write_json(path: Path, content: Any) -> None:
    """Write atomically (temp file, fsync, rename): an application never reads half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False,
                                     prefix=f".{path.name}.") as tmp:
        json.dump(content, tmp, sort_keys=True)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def write_files(root: str, app: str, generation: int, payload: Payload) -> Path:
    """``records.json`` and ``lost.json`` of ``app`` under ``root/<app>/``; the folder."""
    folder = Path(root) / app
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    records = [{"key": _b64(r.key), "value": _b64(r.value), "seq": r.seq,
                "tombstone": r.tombstone} for r in payload.records]
    lost = [{"reason": x.reason, "detail": x.detail, "seq": x.seq,
             "key": _b64(x.key) if x.key is not None else None} for x in payload.lost]
    _write_json(folder / "lost.json", {"app": app, "generation": generation, "lost": lost,
                                       "omitted": payload.lost_omitted})
    _write_json(folder / "records.json", {"app": app, "generation": generation,
                                          "records": records})
    return folder


def load_resurrected(app: str, root: str | None = None) -> dict[bytes, bytes]:
    """The latest value of each key resurrected for ``app`` (deleted keys left out); empty if
    nothing was delivered. For ``xenpbr_agent.resurrect.Region`` users at start-up."""
    try:
        content = json.loads((Path(root or ROOT) / app / "records.json").read_text())
    except FileNotFoundError:
        return {}
    return {base64.b64decode(r["key"]): base64.b64decode(r["value"])
            for r in content["records"] if not r["tombstone"]}


# -- one application ---------------------------------------------------------------------------


def _procedure_runner(folder: Path) -> Runner:
    env = {**os.environ, ENV_DIR: str(folder)}
    return functools.partial(run_command, env=env)


def hand_over(xs: XenstoreClient, config: AgentConfig, app: str, root: str | None = None,
              runner: Runner | None = None) -> Outcome:
    """Receive, verify, write, run the procedure and confirm ``app``'s delivery, unless it
    is not complete yet or was already confirmed for its generation."""
    raw = _manifest_raw(xs, app)
    if not raw:
        return Outcome(app, None, note="pending")
    try:
        manifest = parse_manifest(raw)
    except DeliveryMalformed as exc:
        log.error("resurrected %s: %s", app, exc)
        return _confirm(xs, Outcome(app, Confirmation(False, 0, exc.reason)))
    done = _confirmed(xs, app)
    if done is not None and done.generation == manifest.generation:
        return Outcome(app, None, note=f"already-confirmed {done.encode()}")
    try:
        payload = receive(xs, app, manifest)
    except DeliveryMalformed as exc:
        log.error("resurrected %s generation %d: %s", app, manifest.generation, exc)
        return _confirm(xs, Outcome(app, Confirmation(False, manifest.generation, exc.reason)))
    folder = write_files(root or ROOT, app, manifest.generation, payload)
    lost = len(payload.lost) + payload.lost_omitted
    if lost:
        log.warning("resurrected %s: %d records lost (see %s/lost.json)", app, lost, folder)
    ok = _run_procedure(config, app, folder, runner)
    verdict = Confirmation(True, manifest.generation) if ok else \
        Confirmation(False, manifest.generation, "procedure-failed")
    return _confirm(xs, Outcome(app, verdict, len(payload.records), lost))


def _run_procedure(config: AgentConfig, app: str, folder: Path, runner: Runner | None) -> bool:
    command = config.resurrect.get(app)
    if command is None:
        log.info("resurrected %s: no [resurrect] procedure; the data waits in %s", app, folder)
        return True
    return run_steps((command,), StepLimit.of(config), f"resurrect {app}",
                     runner=runner or _procedure_runner(folder))


def _confirm(xs: XenstoreClient, outcome: Outcome) -> Outcome:
    if outcome.confirmation is not None:
        confirm(xs, outcome.app, outcome.confirmation)
    return outcome


# -- every application -------------------------------------------------------------------------


def _waiting_for(xs: XenstoreClient, config: AgentConfig) -> list[str]:
    """Configured applications whose delivery has no manifest value yet."""
    return [app for app in config.resurrect if not _manifest_raw(xs, app)]


def wait_for_deliveries(xs: XenstoreClient, config: AgentConfig, seconds: float,
                        clock: Any = time.monotonic) -> None:
    """Wait up to ``seconds`` until every ``[resurrect]`` application has a complete
    delivery (dom0 may have nothing for some: then the wait runs out, which is logged)."""
    if seconds <= 0 or not config.resurrect:
        return
    deadline = clock() + seconds
    xs.watch(DELIVERY_DIR, _WATCH_TOKEN)
    try:
        while _waiting_for(xs, config) and clock() < deadline:
            xs.read_watch(timeout=max(0.0, deadline - clock()))
    finally:
        xs.unwatch(DELIVERY_DIR, _WATCH_TOKEN)
    missing = _waiting_for(xs, config)
    if missing:
        log.info("resurrected: no delivery within %g s for %s", seconds, ", ".join(missing))


def hand_over_all(xs: XenstoreClient, config: AgentConfig, wait: float = 0.0,
                  root: str | None = None, runner: Runner | None = None) -> list[Outcome]:
    """Every delivered application's :func:`hand_over` (after waiting up to ``wait`` s)."""
    wait_for_deliveries(xs, config, wait)
    outcomes = []
    for app in delivered_apps(xs):
        try:
            outcomes.append(hand_over(xs, config, app, root, runner))
        except (OSError, XenstoreError) as exc:
            log.error("resurrected %s: cannot hand over: %s", app, exc)
            outcomes.append(Outcome(app, None, note=f"error {exc}"))
    return outcomes
