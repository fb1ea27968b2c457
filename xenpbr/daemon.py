"""xenpbrd's event loop: when each domain is served, never what happens to it.

Two xenstore connections feed one ``selectors`` loop, no polling where a watch exists:

* the domain watcher's (``@introduceDomain`` / ``@releaseDomain``): domains appearing,
  crashing (or whose watchdog fires) and being destroyed;
* the guests' keys (request, status, invalidate, resurrected: the confirmations of
  resurrection deliveries), watched per managed guest.

Each event goes to the :class:`~xenpbr.controller.PhaseController`, which decides
(capture or skip, recover, adopt) and publishes. This module only schedules: guest
watch events mark their domain dirty, each dirty domain is served once per turn within
its read budget, a sweep looks at every request again, and held refusals are flushed
(docs/phase-protocol.md, "Budgets and guarantees"). It is separate so that fairness
between guests is decided in one place, apart from the per-domain rules.

All state lives in :class:`~xenpbr.state.StateDir`, so the daemon can be killed at any
point and started again: on start the controller finishes recoveries a previous
instance left half-done, then the watcher reports every existing domain, including one
that crashed while the daemon was down, and a guest still waiting for an ack is answered
(a new watch fires at once). Its command line is :mod:`xenpbr.xenpbrd`.
"""

from __future__ import annotations

import logging
import selectors
import signal
import time
from typing import Any

from xenpbr import sdnotify
from xenpbr.guestproto import control
from xenpbr.guestproto.gate import RateLimit, TokenBucket
from xenpbr.controller import PhaseController
from xenpbr.controller.boundary import Capture
from xenpbr.controller.guard import guard
from xenpbr.hypervisor.base import Hypervisor
from xenpbr.images.capture import capture
from xenpbr.images.store import ImageStore
from xenpbr.recovery import Restorer, Toolstack
from xenpbr.xl.toolstack import XlToolstack
from xenpbr.state import StateDir
from xenpbr.store_restorer import StoreRestorer
from xenpbr.watcher import DomainDestroyed, DomainEvent, DomainWatcher
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)

#: Per-domain budgets of the loop (docs/phase-protocol.md, "Budgets and guarantees").
READ_BUDGET = RateLimit(20, 1.0)  # reads per domain and budgeted kind: burst 20, 20/s
#: The watch kinds whose service reads guest keys that a guest can rewrite at will: each
#: has its own READ_BUDGET per domain (the others are coalesced to one read a turn).
BUDGETED_KINDS = ("request", "resurrected")
SWEEP_S = 10.0  # every watched domain's request is looked at again this often
LIVENESS_S = 1.0  # heartbeats of domains with a liveness check are judged this often
MAX_EVENTS_PER_TURN = 1000  # watch events drained per turn before serving domains
POLL_S = 0.05  # the loop's timeout while a budget holds some work back

#: Watch token -> (kind of work, domid): a guest's keys dom0 watches.
_WATCH_KINDS = (("request", control.domid_from_token),
                ("status", control.domid_from_status_token),
                ("invalidate", control.domid_from_invalidation_token),
                ("resurrected", control.domid_from_resurrected_token))


class Daemon:
    """The xenpbrd event loop."""

    def __init__(self, state: StateDir, store: ImageStore, hypervisor: Hypervisor,
                 xs_domains: XenstoreClient, xs_requests: XenstoreClient,
                 toolstack: Toolstack | None = None, restorer: Restorer | None = None,
                 capture_fn: Capture = capture) -> None:
        self.state, self.xs = state, xs_requests
        self.watcher = DomainWatcher(hypervisor, xs_domains)
        self.controller = PhaseController(state, store, hypervisor, xs_requests,
                                          toolstack or XlToolstack(hypervisor=hypervisor),
                                          restorer or StoreRestorer(store), capture_fn)
        self._dirty: dict[int, set[str]] = {}  # domid -> watch kinds to serve, oldest first
        # (domid, kind) -> reads of a BUDGETED_KINDS kind
        self._read_budget: dict[tuple[int, str], TokenBucket] = {}
        self._swept_at = self._liveness_at = time.monotonic()
        self._running = True

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.watcher.start()
        self.controller.resume_interrupted()
        self.controller.start_serving()
        sel = selectors.DefaultSelector()
        sel.register(self.watcher.fileno(), selectors.EVENT_READ, "domains")
        sel.register(self.xs.fileno(), selectors.EVENT_READ, "requests")
        log.info("xenpbrd serving %d registered domain(s) from %s",
                 len(self.state.domains()), self.state.root)
        sdnotify.ready(f"serving {len(self.state.domains())} registered domain(s)")
        while self._running:
            self.turn(sel.select(timeout=POLL_S if self._work_left() else 1.0))
        self.controller.stop()
        self.watcher.close()

    def stop(self) -> None:
        """SIGTERM/SIGINT: finish the work under way, then leave the loop."""
        sdnotify.stopping("finishing the capture or recovery under way")
        self._running = False
        self.watcher.stop()

    def turn(self, ready: list[tuple[Any, int]] | None = None) -> None:
        """Handle whatever is pending (``ready`` from a selector, or everything).

        Fairness (docs/phase-protocol.md, "Budgets"): guest watch events only mark their
        domain dirty (a flood of writes coalesces into one mark); then each dirty domain
        is served once per turn, oldest mark first, a request read only within the
        domain's read budget. Domain events (crashes) are served every turn, so no
        guest's writes can keep dom0 from recovering another."""
        sources = {key.data for key, _ in ready} if ready is not None else {"domains",
                                                                             "requests"}
        if "domains" in sources:
            self._serve_domain_events(self.watcher.poll_once(0))
        if "requests" in sources:
            self._collect_watches()
        if time.monotonic() - self._swept_at >= SWEEP_S:
            self._sweep()
        if time.monotonic() - self._liveness_at >= LIVENESS_S:
            self._liveness_at = time.monotonic()
            self.controller.check_liveness()
        self._serve_dirty()
        self.controller.settle_aftermaths()
        self.controller.flush()

    def _serve_domain_events(self, events: list[DomainEvent]) -> None:
        for event in events:
            guard(self._on_domain_event, event)

    def _on_domain_event(self, event: DomainEvent) -> None:
        if isinstance(event, DomainDestroyed):  # its pending work goes with it
            self._dirty.pop(event.domid, None)
            for kind in BUDGETED_KINDS:
                self._read_budget.pop((event.domid, kind), None)
        self.controller.on_domain_event(event)

    def _collect_watches(self) -> None:
        """Drain at most MAX_EVENTS_PER_TURN watch events into the dirty set."""
        for _ in range(MAX_EVENTS_PER_TURN):
            watch = self.xs.read_watch(timeout=0)
            if watch is None:
                return
            for kind, of_token in _WATCH_KINDS:
                if (domid := of_token(watch.token)) is not None:
                    self._dirty.setdefault(domid, set()).add(kind)
                    break

    def _sweep(self) -> None:
        """Look at every watched domain's request again (and the confirmations of a
        domain given resurrected data): one whose watch event was lost (or that came
        while its domain was out of budget) is answered anyway."""
        self._swept_at = time.monotonic()
        for domid in self.controller.watches.watching:
            self._dirty.setdefault(domid, set()).add("request")
            if self.controller.deliveries.waiting(domid):
                self._dirty[domid].add("resurrected")

    def _serve_dirty(self) -> None:
        """One turn of round-robin service: each dirty domain once, oldest first."""
        handlers = {"request": self._on_request, "status": self.controller.on_status,
                    "invalidate": self.controller.on_invalidate,
                    "resurrected": self.controller.on_resurrected}
        for domid in list(self._dirty):
            kinds = self._dirty.pop(domid, set())
            for kind in BUDGETED_KINDS:
                if kind in kinds and not self._read_allowed(domid, kind):
                    # keeps its mark; served when its budget refills
                    self._dirty.setdefault(domid, set()).add(kind)
                    kinds.discard(kind)
            for kind in sorted(kinds):
                guard(handlers[kind], domid)

    def _on_request(self, domid: int) -> None:
        """A boundary request; after an answered one, resync the domain snapshot: ``xl
        save -c`` suspends and resumes the guest, and a guest that crashed during the
        capture must be recovered (dropping these events once left it crashed for good,
        in the bench)."""
        if self.controller.on_request(domid):
            self._serve_domain_events(self.watcher.rescan())

    def _read_allowed(self, domid: int, kind: str) -> bool:
        bucket = self._read_budget.get((domid, kind))
        if bucket is None:
            bucket = self._read_budget[(domid, kind)] = TokenBucket(
                READ_BUDGET, self.controller.protocol.gate.clock)
        return bucket.take()

    def _work_left(self) -> bool:
        """True while something waits for a budget to refill (poll soon, not in 1 s)."""
        return bool(self._dirty) or self.controller.has_held_work()
