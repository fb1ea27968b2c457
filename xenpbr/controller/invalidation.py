"""A guest's request to drop its images from a phase on (:mod:`xenpbr.guestproto.invalidation`).

Separate because it is the one guest-initiated path that deletes images: it is read,
checked against replays, rate limited per domid (one answered request a second) and
carried out under the domain's lock, with the warm-up of a stream it may delete
cancelled first.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from xenpbr.guestproto import control, invalidation
from xenpbr.controller.boundary import Boundaries
from xenpbr.controller.warmup import WarmUps
from xenpbr.state import StateDir, domain_lock
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)

INVALIDATE_EVERY_S = 1.0  # one invalidation carried out per domid this often


class Invalidations:
    """Answers invalidation requests, at most one carried out a second per domid."""

    def __init__(self, state: StateDir, xs: XenstoreClient, boundaries: Boundaries,
                 warm_ups: WarmUps, clock: Callable[[], float] = time.monotonic) -> None:
        self.state, self.xs, self.boundaries, self.warm_ups = state, xs, boundaries, warm_ups
        self.clock = clock
        self.invalidated_at: dict[int, float] = {}  # domid -> monotonic time

    def on_request(self, name: str, domid: int) -> bool:
        """Answer ``domid``'s pending request; True if one was answered."""
        raw = self.xs.read_or(control.invalidation_path(domid), None)
        request = invalidation.parse_request(raw)
        if request is None:
            if raw is not None:
                log.warning("%s (domid %d): malformed invalidation request %s ignored", name,
                            domid, ascii(bytes(raw[:64])))
            return False
        if request.seq <= control.last_invalidation_answered(self.xs, domid):
            return False  # a replay, or the watch firing for the key's creation
        now = self.clock()
        if now - self.invalidated_at.get(domid, -1e9) < INVALIDATE_EVERY_S:
            answer = invalidation.Answer(request.seq, refused="rate-limited")
        else:
            self.invalidated_at[domid] = now
            answer = self._invalidate(name, request)
        control.write_invalidation_answer(self.xs, domid, answer)
        log.info("%s (domid %d): invalidation from phase %s: %s", name, domid, request.phase,
                 answer.encode())
        return True

    def _invalidate(self, name: str, request: invalidation.Invalidation) -> invalidation.Answer:
        self.warm_ups.cancel(name)
        with domain_lock(self.state, name):
            phases = self.state.phases(name)
            if request.phase not in phases.phases:
                return invalidation.Answer(request.seq, refused="unknown-phase")
            dropped = phases.forget(request.phase)
            for img in dropped:
                self.boundaries.drop_image(name, img.image_id)
            self.state.save_phases(phases)
        return invalidation.Answer(request.seq, dropped=len(dropped))
