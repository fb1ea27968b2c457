"""The phase controller the daemon calls once per event.

Separate from the event loop (:mod:`xenpbr.daemon`) so the loop only decides *when* a
domain is served (watches, budgets, fairness) and this class decides *what* happens to
it: each ``on_*`` method finds the registered domain the domid runs as
(:mod:`.adoption`), hands the event to its step and publishes the outcome. Steps never
call back into the daemon.
"""

from __future__ import annotations

import logging
from xenpbr.controller.adoption import DomainNames
from xenpbr.controller.boundary import Boundaries, Capture
from xenpbr.controller.delivery import Deliveries
from xenpbr.controller.guard import guard
from xenpbr.controller.health import GuestHealth
from xenpbr.controller.invalidation import Invalidations
from xenpbr.controller.liveness import Liveness
from xenpbr.controller.publishing import Publisher
from xenpbr.controller.recover import Recoveries
from xenpbr.controller.resurrect import ResurrectionExtractor, frames_opener
from xenpbr.controller.warmup import WarmUps
from xenpbr.controller.watches import GuestWatches
from xenpbr.hypervisor.base import Hypervisor
from xenpbr.images.capture import capture
from xenpbr.images.store import ImageStore
from xenpbr.guestproto import control
from xenpbr.guestproto.control import PhaseProtocol
from xenpbr.guestproto.gate import Outcome
from xenpbr.guestproto.wire import Verdict
from xenpbr.recovery import Restorer, Toolstack
from xenpbr.state import StateDir
from xenpbr.watcher import (
    DomainAppeared,
    DomainCrashed,
    DomainDestroyed,
    DomainEvent,
    DomainWatchdogFired,
)
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)


class PhaseController:
    """Per-domain decisions at a boundary, an invalidation, a status note, a delivery
    confirmation and a crash."""

    def __init__(self, state: StateDir, store: ImageStore, hypervisor: Hypervisor,
                 xs: XenstoreClient, toolstack: Toolstack, restorer: Restorer,
                 capture_fn: Capture = capture) -> None:
        self.state = state
        self.protocol = PhaseProtocol(xs)
        self.watches = GuestWatches(xs)
        self.liveness = Liveness(hypervisor, lambda domid: control.read_heartbeat(xs, domid))
        self.names = DomainNames(state, hypervisor, xs)
        self.deliveries = Deliveries(state, xs)
        self.publisher = Publisher(xs, state, self.protocol,
                                   delivery=self.deliveries.published)
        self.boundaries = Boundaries(state, store, hypervisor, capture_fn)
        self.warm_ups = WarmUps(state, store)
        self.invalidations = Invalidations(state, xs, self.boundaries, self.warm_ups)
        self.health = GuestHealth(state, xs, service_back=self._service_back)
        self.extractor = ResurrectionExtractor(state, xs, frames_opener(hypervisor))
        self.recoveries = Recoveries(state, toolstack, restorer, self.protocol, self.watches,
                                     self.names, self.boundaries, self.publisher,
                                     self.warm_ups, self.extractor, self.deliveries)

    # -- start ---------------------------------------------------------------------------

    def resume_interrupted(self) -> None:
        """Finish the recoveries a killed xenpbrd left half-done, and unpause the guests
        its captures held paused (before serving)."""
        for held in self.state.held_pauses():
            guard(self.boundaries.release_held_pause, held)
        interrupted = self.state.interrupted_recoveries()
        for name in interrupted:
            guard(self.recoveries.resume_interrupted, name)
        for name in set(self.state.domains()) - set(interrupted):
            guard(self.recoveries.destroy_leftovers, name)

    def start_serving(self) -> None:
        """Publish every registered domain as stopped until the watcher reports it, and
        warm its newest image up if its stream is not ready."""
        for name in self.state.domains():
            self.publisher.publish(name, "stopped")
            guard(self.warm_ups.warm_newest, name)

    # -- guest keys ----------------------------------------------------------------------

    def on_request(self, domid: int) -> bool:
        """Serve ``domid``'s boundary request; True if one was answered (the guest was
        suspended by ``xl save -c`` meanwhile, or could have been)."""
        name = self.names.name_of(domid)
        if name is None:
            return False
        admission = self.protocol.poll(domid)
        if admission.outcome is Outcome.REFUSED:
            # refusal counters are published by flush(), at most once a second: a
            # flooding guest must not turn each of its writes into a dom0 transaction
            self.publisher.refusals_changed(name, domid)
        if admission.outcome is not Outcome.ACCEPTED or admission.request is None:
            return False
        request = admission.request
        self.publisher.publish(name, "capturing", domid)
        self.warm_ups.cancel(name)  # the store is about to change
        judged = self.boundaries.judged(name, request, domid)
        ctx = judged.context
        try:
            self.protocol.answer(domid, request.seq, judged.verdict, judged.detail)
        finally:  # never left published as capturing
            self.publisher.publish(name, "watching", domid, ctx.phases if ctx else None)
        if ctx is not None and judged.verdict == Verdict.captured():
            self.warm_ups.warm_up(ctx, ctx.phases.images[request.phase].image_id)
        return True

    def on_invalidate(self, domid: int) -> None:
        """The guest asks to drop its images from a phase on (:mod:`.invalidation`)."""
        name = self.names.name_of(domid)
        if name is not None and self.invalidations.on_request(name, domid):
            self.publisher.publish(name, "watching", domid)

    def on_status(self, domid: int) -> None:
        """A restored guest's agent reported ``acked``/``ready`` (:mod:`.health`)."""
        name = self.names.name_of(domid)
        if name is not None and self.health.on_status(name, domid):
            self.publisher.publish(name, "watching", domid)

    def _service_back(self, name: str) -> None:
        """The restored guest ran its after-restore steps: its recovery's aftermath
        may run (:mod:`.aftermath`)."""
        self.recoveries.aftermath.guest_ready(name)

    def on_resurrected(self, domid: int) -> None:
        """The guest answered a delivery of resurrected data (:mod:`.delivery`): ``ok``
        empties the vault (published at once), a new ``bad`` is published within a
        second (a guest alternating answers cannot make dom0 publish on each)."""
        name = self.names.name_of(domid)
        if name is None or not self.deliveries.on_confirmation(name, domid):
            return
        if self.deliveries.published(name) and self.deliveries.waiting(domid):
            self.publisher.refusals_changed(name, domid)
        else:
            self.publisher.publish(name, "watching", domid)

    # -- domain events -------------------------------------------------------------------

    def on_domain_event(self, event: DomainEvent) -> None:
        name = self.names.name_of(event.domid)
        if name is None:
            if isinstance(event, DomainDestroyed):
                self.names.forget_stranger(event.domid)
            return
        if isinstance(event, DomainAppeared):
            self._adopt(event.domid, name)
        elif isinstance(event, (DomainCrashed, DomainWatchdogFired)):
            self.recoveries.on_crash(event, name)
        elif isinstance(event, DomainDestroyed):
            self._destroyed(event.domid, name)

    def _adopt(self, domid: int, name: str) -> None:
        """A registered domain exists: prepare its control dir and watch its requests.

        A domain whose control dir already holds an ack was prepared by whoever restored
        it (this daemon, the CLI's ``xenpbr reboot``) or served by a previous xenpbrd:
        it is adopted as it is (rewriting its generation could contradict the ack its
        agent is reading, and requests up to the acked seq are replays). Resurrected data
        the vault holds for it is delivered (a delivery already there is kept).
        """
        if not self.names.take_restored(domid) and not self.protocol.adopt(domid):
            self.protocol.register(domid, self.state.phases(name).generation)
        self.watches.watch(domid)
        self.deliveries.at_adoption(name, domid)  # before a normal reboot's agent waits
        self.publisher.publish(name, "watching", domid)
        log.info("%s (domid %d): watching its phase boundaries", name, domid)
        timeout = self._liveness_timeout(name)
        if timeout is not None:
            self.liveness.watch(domid, name, timeout)
        if not self.recoveries.aftermath.holding(name):  # else once the guest is ready
            guard(lambda n: self.warm_ups.warm_newest(n, with_standby=True), name)

    def _liveness_timeout(self, name: str) -> float | None:
        """The domain's ``xenpbr_liveness_timeout``; None (off) if unset or unusable."""
        from xenpbr import domconfig
        return self.state.domain_setting(name, domconfig.liveness_timeout, "no liveness check")

    def _destroyed(self, domid: int, name: str) -> None:
        self.names.forget(domid)
        self.boundaries.forget(domid)
        self.protocol.forget(domid)
        self.watches.unwatch(domid)
        self.liveness.forget(domid)
        self.deliveries.forget(domid)
        if not self.names.running(name):  # not replaced by a recovery
            self.publisher.publish(name, "stopped")
            guard(self.warm_ups.discard_standby, name)

    def settle_aftermaths(self) -> None:
        """Recovered domains whose guest did not report ready in time get their
        crashed domain destroyed and their warm-up anyway (:mod:`.aftermath`)."""
        guard(lambda _: self.recoveries.aftermath.settle_due(), None)

    def stop(self) -> None:
        """xenpbrd stops: no crashed domain is left set aside."""
        guard(lambda _: self.recoveries.aftermath.stop(), None)

    def check_liveness(self) -> None:
        """Heartbeats of the domains with a liveness check (a hung one is shut down with
        reason watchdog; the watcher's event then recovers it)."""
        guard(lambda _: self.liveness.check(), None)

    # -- pacing --------------------------------------------------------------------------

    def flush(self) -> None:
        """Held refusal acks whose budget refilled, and refusal counters not yet
        published (at most once a second per domain: coalesced, never dropped)."""
        guard(lambda _: self.protocol.flush_held(), None)
        for name, domid in self.publisher.due():
            guard(lambda n: self.publisher.publish(n, "watching", domid), name)

    def has_held_work(self) -> bool:
        """True while refusal acks or counters wait for their budget to refill."""
        return self.publisher.pending() or self.protocol.has_held()
