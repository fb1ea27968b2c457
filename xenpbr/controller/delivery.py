"""Hand the vault's resurrected data to a recovered guest, and act on its confirmation.

Separate from :mod:`xenpbr.resurrection.deliver` (the xenstore I/O of one delivery) and
from the recovery (:mod:`.recover`): this is the daemon's bookkeeping of *which* domid was
given *which* generation of each application's data, and what the guest answered. Dom0
delivers at two moments (docs/resurrection.md, "In xenpbrd"):

* before the ``restored`` ack of a phase-based reboot, while the restored domain is still
  paused (:meth:`Deliveries.before_ack`), so the agent finds the data when it resumes;
* when it adopts a new domid of a registered domain whose vault holds data (the fallback
  normal reboot, a fresh boot, a restarted xenpbrd): :meth:`Deliveries.at_adoption`, which
  keeps a complete delivery already there (rewriting it would void the guest's answer).

The guest's confirmation (``data/xenpbr/resurrected/<app>``) is hostile input: only the
applications this daemon delivered to that domid are read, within the caller's read
budget; ``ok <generation>`` of the delivered generation drops the data from the vault,
clears the keys and marks the recovery's timeline ``delivered``; ``bad`` keeps the data
(logged once, published); anything else changes nothing. A delivery that fails is logged
and never fails the recovery: the data stays in the vault for the next try.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from xenpbr.errors import XenpbrError
from xenpbr.guestproto.resurrection_delivery import (
    ConfirmationMalformed,
    DeliveryMalformed,
    parse_confirmation,
    parse_manifest,
)
from xenpbr.resurrection.deliver import (
    DEFAULT_DOMAIN_CAP,
    clear_delivery,
    manifest_path,
    confirmation_path,
    write_delivery,
)
from xenpbr.resurrection.vault import Held, Vault
from xenpbr.state import StateDir
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)


@dataclass
class DomainDeliveries:
    """What one registered domain's vault holds, as the daemon last saw it: per application
    the generation held, and the guest's ``bad`` reason for it if it refused it."""

    held: dict[str, int] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)

    def published(self) -> dict[str, str]:
        """``{app: "waiting generation=G" | "bad generation=G reason=R"}``."""
        return {app: (f"bad generation={gen} reason={self.bad[app]}" if app in self.bad
                      else f"waiting generation={gen}") for app, gen in self.held.items()}


class Deliveries:
    """The daemon's deliveries: write them, read the guest's answers, keep the books."""

    def __init__(self, state: StateDir, xs: XenstoreClient, *,
                 cap: int = DEFAULT_DOMAIN_CAP,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state, self.xs, self.cap, self.clock = state, xs, cap, clock
        self.vault = Vault.in_state(state.root)
        self.sent: dict[int, dict[str, int]] = {}  # domid -> app -> generation delivered
        self.names: dict[int, str] = {}  # domid -> the registered domain it runs as
        self._domains: dict[str, DomainDeliveries] = {}  # name -> as last seen
        self._last_raw: dict[tuple[int, str], bytes] = {}  # (domid, app) -> answer judged

    # -- delivering ----------------------------------------------------------------------

    def before_ack(self, name: str, domid: int) -> int:
        """Deliver everything the vault holds for ``name`` into the restored, still paused
        ``domid`` (its control dir is fresh: nothing there to keep). How many were sent."""
        return self._deliver(name, domid, keep_complete=False)

    def at_adoption(self, name: str, domid: int) -> int:
        """Deliver what the vault holds for ``name`` into the adopted ``domid``, keeping a
        complete delivery of the same generation already there (delivered before the ack,
        or by a previous xenpbrd). How many were written now."""
        return self._deliver(name, domid, keep_complete=True)

    def _deliver(self, name: str, domid: int, keep_complete: bool) -> int:
        held = self._load(name)
        if self.names.get(domid) != name:  # books of an earlier domain with this domid
            self.forget(domid)
        self.names[domid] = name
        sent = self.sent.setdefault(domid, {})
        written = 0
        for entry in held:
            if keep_complete and self._complete(domid, entry):
                sent[entry.app] = entry.generation
                continue
            if self._write(name, domid, entry):
                sent[entry.app] = entry.generation
                self._last_raw.pop((domid, entry.app), None)  # write_delivery removed it
                written += 1
        return written

    def _load(self, name: str) -> list[Held]:
        """The vault's good entries for ``name`` (a broken vault: logged, nothing)."""
        try:
            held = self.vault.held(name)
        except (XenpbrError, OSError) as exc:
            log.error("%s: resurrected data not readable from the vault: %s", name, exc)
            return []
        books = self._domains.setdefault(name, DomainDeliveries())
        books.held = {h.app: h.generation for h in held}
        books.bad = {app: why for app, why in books.bad.items() if app in books.held}
        return held

    def _complete(self, domid: int, entry: Held) -> bool:
        """True if ``domid`` already has a complete delivery of ``entry``'s generation
        (the manifest is written last, so a parsable one means the chunks are there)."""
        try:
            raw = self.xs.read_or(manifest_path(domid, entry.app), None)
            return raw is not None and parse_manifest(raw).generation == entry.generation
        except (XenpbrError, OSError, DeliveryMalformed):
            return False

    def _write(self, name: str, domid: int, entry: Held) -> bool:
        try:
            write_delivery(self.xs, domid, entry.app, entry.generation, entry.records,
                           entry.lost, cap=self.cap)
        except (XenpbrError, OSError) as exc:  # DeliveryError, a bad app name, ...
            log.error("%s (domid %d): %s not delivered, it stays in the vault: %s", name,
                      domid, entry.app, exc)
            return False
        self._domains.setdefault(name, DomainDeliveries()).bad.pop(entry.app, None)
        return True

    # -- the guest's answer --------------------------------------------------------------

    def on_confirmation(self, name: str, domid: int) -> bool:
        """Read the confirmations of what was delivered to ``domid``, running as ``name``
        (nothing else: a guest writing keys it was not asked for costs dom0 no read). True
        if something changed (data dropped, or a new ``bad`` to publish)."""
        sent = self.sent.get(domid)
        if self.names.get(domid) != name or not sent:
            return False
        changed = False
        for app, generation in sorted(sent.items()):
            changed |= self._answer(name, domid, app, generation)
        return changed

    def _answer(self, name: str, domid: int, app: str, generation: int) -> bool:
        raw = self.xs.read_or(confirmation_path(domid, app), None)
        if raw is None or self._last_raw.get((domid, app)) == raw:
            return False  # none yet, or what was judged already (a flood of one value)
        self._last_raw[(domid, app)] = raw
        try:
            confirmation = parse_confirmation(raw)
        except ConfirmationMalformed as exc:
            log.warning("%s (domid %d): %s: ignoring the guest's confirmation: %s", name,
                        domid, app, exc)
            return False
        if confirmation.generation != generation:
            log.debug("%s (domid %d): %s: ignoring a confirmation of generation %d (delivered "
                      "%d)", name, domid, app, confirmation.generation, generation)
            return False
        if confirmation.ok:
            return self._confirmed(name, domid, app, generation)
        return self._refused(name, domid, app, generation, confirmation.reason or "-")

    def _confirmed(self, name: str, domid: int, app: str, generation: int) -> bool:
        self.vault.drop(name, app)
        self.sent.get(domid, {}).pop(app, None)
        self._last_raw.pop((domid, app), None)
        books = self._domains.setdefault(name, DomainDeliveries())
        books.held.pop(app, None)
        books.bad.pop(app, None)
        try:
            clear_delivery(self.xs, domid, app)
        except (XenpbrError, OSError) as exc:
            log.warning("%s (domid %d): %s: delivery keys not cleared: %s", name, domid, app,
                        exc)
        log.info("%s (domid %d): %s confirmed its resurrected data (generation %d); dropped "
                 "from the vault", name, domid, app, generation)
        self._mark_delivered(name, app, generation)
        return True

    def _mark_delivered(self, name: str, app: str, generation: int) -> None:
        now = self.clock()
        try:
            self.state.amend_latest_history(
                name, lambda t: t.note_delivered(app, generation, now))
        except (XenpbrError, OSError) as exc:
            log.warning("%s: delivered mark of %s not recorded: %s", name, app, exc)

    def _refused(self, name: str, domid: int, app: str, generation: int, reason: str) -> bool:
        books = self._domains.setdefault(name, DomainDeliveries())
        if books.bad.get(app) == reason:
            return False  # said already: a guest repeating it is not logged again
        books.bad[app] = reason
        log.warning("%s (domid %d): %s refused its resurrected data (generation %d): %s; "
                    "the data stays in the vault ('xenpbr resurrected %s')", name, domid, app,
                    generation, reason, name)
        return True

    # -- books ---------------------------------------------------------------------------

    def waiting(self, domid: int) -> bool:
        """True if ``domid`` was given data it has not confirmed yet."""
        return bool(self.sent.get(domid))

    def published(self, name: str) -> dict[str, str]:
        """``name``'s deliveries waiting for confirmation, for the published state (what
        the vault held when last looked at; read once if never)."""
        if name not in self._domains:
            self._load(name)
        return self._domains[name].published()

    def forget(self, domid: int) -> None:
        """``domid`` was destroyed: what it was sent stays in the vault for the next one."""
        self.sent.pop(domid, None)
        self.names.pop(domid, None)
        for key in [k for k in self._last_raw if k[0] == domid]:
            del self._last_raw[key]
