"""When the controller publishes a domain's state in xenstore (:mod:`xenpbr.publish`).

Separate from :mod:`xenpbr.publish` (what is published, and how) because this is the
daemon's pacing: a status change is published at once, while a flooding guest's
refusal counters are coalesced to at most one publication a second per domain, so its
writes never turn into one dom0 transaction each.
"""

from __future__ import annotations

import time
from typing import Callable

from xenpbr import publish
from xenpbr.phases import DomainPhases
from xenpbr.guestproto.control import PhaseProtocol
from xenpbr.state import StateDir
from xenpbr.xenstore import XenstoreClient

PUBLISH_EVERY_S = 1.0  # refusal counters published at most this often per domain


class Publisher:
    """Publishes statuses now and refusal counters at most once a second."""

    def __init__(self, xs: XenstoreClient, state: StateDir, proto: PhaseProtocol,
                 clock: Callable[[], float] = time.monotonic,
                 delivery: Callable[[str], dict[str, str]] | None = None) -> None:
        self.xs, self.state, self.protocol, self.clock = xs, state, proto, clock
        self.delivery = delivery  # name -> resurrected data waiting for confirmation
        self._published_at: dict[str, float] = {}  # name -> monotonic time
        self._unpublished: dict[str, int] = {}  # name -> domid with refusals to publish

    def publish(self, name: str, status: str, domid: int | None = None,
                phases: DomainPhases | None = None) -> None:
        """Publish ``name`` now; ``phases``: its phase state, if the event loaded it."""
        refusals = self.protocol.gate.refusal_counts(domid) if domid is not None else None
        delivery = self.delivery(name) if self.delivery is not None else None
        publish.publish(self.xs, self.state, name, status, domid, refusals, phases, delivery)
        self._published_at[name] = self.clock()
        # its counters are out now (or, without a domid, the domain is down or stopped:
        # a later flush must not publish it as watching again)
        self._unpublished.pop(name, None)

    def refusals_changed(self, name: str, domid: int) -> None:
        """A request was refused (or a delivery confirmed bad): publish ``name`` at the
        next due :meth:`due`."""
        self._unpublished[name] = domid

    def due(self) -> list[tuple[str, int]]:
        """The (name, domid) whose refusal counters may be published now; taken off."""
        now = self.clock()
        ready = [(name, domid) for name, domid in self._unpublished.items()
                 if now - self._published_at.get(name, 0.0) >= PUBLISH_EVERY_S]
        for name, _ in ready:
            self._unpublished.pop(name, None)
        return ready

    def pending(self) -> bool:
        return bool(self._unpublished)
