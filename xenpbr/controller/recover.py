"""Recover a crashed domain and take over what the recovery brought back.

Separate because a crash is the controller's most consequential event: it checks the
operator asked for a phase-based reboot on this trigger, runs
:class:`~xenpbr.recovery.Recovery` under the domain's lock (with the crashed domid, whose
memory the resurrection step reads before the destroy), and from its
:class:`~xenpbr.recovery.RecoveryResult` adopts the new domid (known by name, its run's
passed phases set) and publishes it. The ack itself is written during the recovery,
before the unpause, by :class:`WatchingAcknowledger`, after it delivered the domain's
resurrected data (:mod:`.delivery`), so the agent finds it when it reads the ack.
What follows a phase-based reboot (the crashed domain's destroy, the warm-up) waits
for the guest's ``ready`` (:mod:`.aftermath`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from xenpbr.controller.adoption import DomainNames
from xenpbr.controller.aftermath import Aftermath
from xenpbr.controller.boundary import Boundaries
from xenpbr.controller.context import DomainContext
from xenpbr.controller.delivery import Deliveries
from xenpbr.controller.guard import guard
from xenpbr.controller.publishing import Publisher
from xenpbr.controller.warmup import WarmUps
from xenpbr.controller.watches import GuestWatches
from xenpbr.guestproto.control import PhaseProtocol
from xenpbr.recovery import (
    Extractor,
    Recovery,
    RecoveryFailed,
    RecoveryResult,
    Restorer,
    Toolstack,
)
from xenpbr.state import StateDir, domain_lock
from xenpbr.watcher import DomainEvent, DomainWatchdogFired

log = logging.getLogger(__name__)


class WatchingAcknowledger:
    """Recovery's :class:`~xenpbr.recovery.Acknowledger` in the daemon: deliver the
    domain's resurrected data, ack ``restored:<g>`` and watch the guest's keys at once,
    all before the unpause, so the agent finds its data and its first status note is
    seen. A delivery that fails is logged by :class:`~.delivery.Deliveries` and never
    fails the candidate (the data stays in the vault)."""

    def __init__(self, proto: PhaseProtocol, watches: GuestWatches,
                 deliveries: Deliveries | None = None) -> None:
        self.protocol, self.watches, self.deliveries = proto, watches, deliveries
        self.domain: str | None = None  # the domain being recovered (set by recovering())

    @contextmanager
    def recovering(self, name: str) -> Iterator[None]:
        """Acks written meanwhile are for ``name`` (the recovery names only the domid)."""
        self.domain = name
        try:
            yield
        finally:
            self.domain = None

    def restored(self, domid: int, seq: int, generation: int) -> None:
        if self.deliveries is not None and self.domain is not None:
            self.deliveries.before_ack(self.domain, domid)
        self.protocol.restored(domid, seq, generation)
        self.watches.watch(domid)


class Recoveries:
    """Runs recoveries for the daemon and takes over their results."""

    def __init__(self, state: StateDir, toolstack: Toolstack, restorer: Restorer,
                 proto: PhaseProtocol, watches: GuestWatches, names: DomainNames,
                 boundaries: Boundaries, publisher: Publisher, warm_ups: WarmUps,
                 extractor: Extractor | None = None,
                 deliveries: Deliveries | None = None) -> None:
        self.state, self.names, self.boundaries = state, names, boundaries
        self.publisher, self.warm_ups = publisher, warm_ups
        self.acknowledger = WatchingAcknowledger(proto, watches, deliveries)
        self.recovery = Recovery(state, toolstack, restorer, self.acknowledger,
                                 extractor=extractor, keep_aside=True)
        self.aftermath = Aftermath(self.recovery.destroy_set_aside, self._warm_newest)

    def on_crash(self, event: DomainEvent, name: str) -> bool:
        """Recover ``name`` if its config asks for it; True if it is back up (then its
        newest image is warmed up again: the crash cancelled that)."""
        trigger = "watchdog" if isinstance(event, DomainWatchdogFired) else "crash"
        if not DomainContext.load(self.state, name, event.domid).recovers_on(trigger):
            return False
        self.warm_ups.cancel(name)  # the recovery needs dom0's CPU now
        self.aftermath.free_memory()
        with domain_lock(self.state, name), self.acknowledger.recovering(name):
            self.names.forget(event.domid)
            self.publisher.publish(name, "recovering", event.domid)  # still there, crashed
            try:
                result = self.recovery.recover(name, trigger, crash_seen=event.seen_at,
                                               domid=event.domid)
            except RecoveryFailed as exc:
                log.critical("%s is DOWN: %s", name, exc)
                self.publisher.publish(name, "down")
                return False
        self._take_over(name, result)
        log.info("%s recovered via %s, downtime %.2f s", name, result.path,
                 result.timeline.downtime() or -1)
        # a warm-up the crash cancelled is done, and a standby used is replaced, once
        # the restored guest has its service back (a normal boot's agent reports none)
        if result.generation is not None or result.set_aside is not None:
            self.aftermath.hold(name, result.set_aside)
        else:
            self._warm_newest(name)
        return True

    def _warm_newest(self, name: str) -> None:
        guard(lambda n: self.warm_ups.warm_newest(n, with_standby=True), name)

    def destroy_leftovers(self, name: str) -> None:
        """A crashed domain of ``name`` still set aside when xenpbrd starts (the
        previous one was killed or stopped before its guest's ``ready``) is destroyed."""
        self.recovery.destroy_leftover_aside(name)

    def resume_interrupted(self, name: str) -> None:
        """Finish the recovery of ``name`` a killed xenpbrd left half-done."""
        with domain_lock(self.state, name), self.acknowledger.recovering(name):
            result = self.recovery.resume_interrupted(name)
        if result is not None and result.generation is not None:
            self._restored(result)

    def _restored(self, result: RecoveryResult) -> None:
        """The acked domid's control dir is prepared: its appearance is no fresh boot."""
        assert result.domid is not None
        self.names.restored_domids.add(result.domid)

    def _take_over(self, name: str, result: RecoveryResult) -> None:
        """Publish the domid the recovery brought back (publishing none here once left
        ``domid`` empty under a running guest) and know it as ``name`` at once, so the
        old domid's destruction does not publish the domain as stopped. A run restored
        from a phase has passed that phase and the earlier ones."""
        domid, phases = result.domid, self.state.phases(name)
        if domid is not None:
            if result.generation is not None:
                self._restored(result)
            self.names.known_as(domid, name)
            phase = result.restored_phase
            if phase is not None:
                self.boundaries.restored_from(domid, phases, phase)
        self.publisher.publish(name, "watching", domid, phases)
