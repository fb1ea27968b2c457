"""A restored guest's status notes: the timeline's marks and the image's healthy clock.

Separate because it is the controller's judgement of whether a phase-based reboot
worked: the agent's ``acked``/``ready`` notes add the ``guest_ack``/``service_ready``
marks to the recovery's timeline, and ``ready`` starts the restored image's trial
(:class:`~xenpbr.phases.Trial`), which its next crash judges against
``healthy_after``. A ``ready`` or ``steps-failed`` note also says the guest has its
service back, which the recovery's aftermath waits for (:mod:`.aftermath`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from xenpbr.guestproto import control, wire
from xenpbr.state import StateDir, domain_lock
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)


class GuestHealth:
    """Reads a guest's status note and records what it says."""

    def __init__(self, state: StateDir, xs: XenstoreClient,
                 clock: Callable[[], float] = time.monotonic,
                 service_back: Callable[[str], None] = lambda name: None) -> None:
        """``service_back(name)`` is called on each ``ready``/``steps-failed`` note."""
        self.state, self.xs, self.clock, self.service_back = state, xs, clock, service_back

    def on_status(self, name: str, domid: int) -> bool:
        """Record ``domid``'s status note; True if the timeline got a new mark."""
        raw = self.xs.read_or(control.status_path(domid), None)
        status = wire.parse_guest_status(raw)
        if status is None:
            return False
        now = self.clock()
        if status.state == "ready":
            self._guest_ready(name, status.generation, now)
        if status.state != "acked":
            self.service_back(name)
        if not self.state.amend_latest_history(
                name, lambda t: t.note_guest(status.state, status.generation, now)):
            return False
        log.info("%s (domid %d): guest reports %s", name, domid, status.encode())
        return True

    def _guest_ready(self, name: str, generation: int, now: float) -> None:
        """Start the restored image's healthy clock (:class:`~xenpbr.phases.Trial`)."""
        with domain_lock(self.state, name):
            phases = self.state.phases(name)
            if phases.guest_ready(generation, now):
                self.state.save_phases(phases)
