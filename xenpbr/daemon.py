"""xenpbrd: one event loop that captures images at phase boundaries and recovers crashes.

Two xenstore connections feed one ``selectors`` loop, no polling where a watch exists:

* the domain watcher's (``@introduceDomain`` / ``@releaseDomain``): a registered domain
  appearing gets its control dir and a watch on its request key; a registered domain
  that crashes (or whose watchdog fires) and asked for ``phasereboot`` is recovered;
* the protocol's: a guest's boundary request is validated, judged (capture or skip) and
  answered; a capture runs ``xl save -c`` into the image store. A restored guest's
  status note (``acked``/``ready``) adds the guest_ack and service_ready marks to the
  recovery's timeline.

All state lives in :class:`~xenpbr.state.StateDir`, so the daemon can be killed at any
point and started again: on start it finishes recoveries a previous instance left
half-done (:meth:`~xenpbr.recovery.Recovery.resume_interrupted`), then the watcher
reports every existing domain, including one that crashed while the daemon was down,
and a guest still waiting for an ack is answered (a new watch fires at once). Work for
one domain is serialised by a per-domain lock shared with the CLI (``xenpbr reboot``).
Each domain's state is published in xenstore (:mod:`xenpbr.publish`).
"""

from __future__ import annotations

import logging
import selectors
import signal
import threading
import time
from pathlib import Path
from typing import Any

from xenpbr import consistency, domconfig, invalidation, protocol, publish, sdnotify
from xenpbr import phases as phases_mod
from xenpbr.errors import XenpbrError
from xenpbr.hypervisor.base import ShutdownReason
from xenpbr.images import disks, hotcache
from xenpbr.images.capture import capture
from xenpbr.images.store import ImageStore
from xenpbr.phases import ImageInfo
from xenpbr.protocol import Outcome, PhaseProtocol, Verdict
from xenpbr.recovery import Recovery, RecoveryFailed, XlToolstack
from xenpbr.state import StateDir, domain_lock
from xenpbr.store_restorer import StoreRestorer
from xenpbr.watcher import (
    DomainAppeared,
    DomainCrashed,
    DomainDestroyed,
    DomainEvent,
    DomainWatchdogFired,
    DomainWatcher,
)

log = logging.getLogger(__name__)


#: Per-domain budgets of the loop (docs/phase-protocol.md, "Budgets and guarantees").
READ_BUDGET = protocol.RateLimit(20, 1.0)  # request reads per domain: burst 20, 20/s
PUBLISH_EVERY_S = 1.0  # refusal counters published at most this often per domain
SWEEP_S = 10.0  # every watched domain's request is looked at again this often
MAX_EVENTS_PER_TURN = 1000  # watch events drained per turn before serving domains
POLL_S = 0.05  # the loop's timeout while a budget holds some work back

#: Watch token -> (kind of work, domid): a guest's keys dom0 watches.
_WATCH_KINDS = (("request", protocol.domid_from_token),
                ("status", protocol.domid_from_status_token),
                ("invalidate", invalidation.domid_from_token))


class Daemon:
    """The xenpbrd event loop and its handlers."""

    def __init__(self, state: StateDir, store: ImageStore, hypervisor: Any,
                 xs_domains: Any, xs_requests: Any, toolstack: Any | None = None,
                 restorer: Any | None = None, capture_fn: Any = capture) -> None:
        self.state, self.store, self.hv = state, store, hypervisor
        self.xs = xs_requests
        self.protocol = PhaseProtocol(xs_requests)
        self.watcher = DomainWatcher(hypervisor, xs_domains)
        self.capture = capture_fn
        self.recovery = Recovery(state, toolstack or XlToolstack(),
                                 restorer or StoreRestorer(store), self)
        self.names: dict[int, str] = {}  # domid -> registered name
        self.restored_domids: set[int] = set()  # prepared by recovery, not a fresh boot
        self.watching: dict[int, list[tuple[str, str]]] = {}  # domid -> its watches
        self._published_at: dict[str, float] = {}  # name -> monotonic time
        self._warming: dict[str, threading.Event] = {}  # name -> cancel its warm-up
        self._invalidated_at: dict[int, float] = {}  # domid -> monotonic time
        self._strangers: set[int] = set()  # domids reusing a registered name, UUID differs
        self._passed: dict[int, set[str]] = {}  # domid -> phases its run went through
        self._restored_runs: set[int] = set()  # domids a recovery restored from an image
        self._dirty: dict[int, set[str]] = {}  # domid -> watch kinds to serve, oldest first
        self._read_budget: dict[int, protocol.TokenBucket] = {}  # domid -> request reads
        self._unpublished: dict[str, int] = {}  # name -> domid with refusals to publish
        self._swept_at = time.monotonic()
        self.hot_cache = hotcache.enabled()
        self._running = True

    def restored(self, domid: int, seq: int, generation: int) -> None:
        """Recovery's acknowledger: ack ``restored:<g>`` and remember that this domid's
        control dir is already prepared (its appearance is not a fresh boot). The guest's
        keys are watched now, before the unpause, so its first status note is seen."""
        self.restored_domids.add(domid)
        self.protocol.restored(domid, seq, generation)
        self._watch_guest(domid)

    def _watch_guest(self, domid: int) -> None:
        if domid in self.watching:
            return
        watches = [protocol.request_watch(domid), protocol.status_watch(domid),
                   invalidation.watch(domid)]
        for path, token in watches:
            self.xs.watch(path, token)
        self.watching[domid] = watches

    def _unwatch_guest(self, domid: int) -> None:
        for path, token in self.watching.pop(domid, []):
            try:
                self.xs.unwatch(path, token)
            except XenpbrError as exc:
                log.debug("unwatch %s: %s", path, exc)

    def _publish(self, name: str, status: str, domid: int | None = None) -> None:
        refusals = self.protocol.gate.refusal_counts(domid) if domid is not None else None
        publish.publish(self.xs, self.state, name, status, domid, refusals)
        self._published_at[name] = time.monotonic()
        # its counters are out now (or, without a domid, the domain is down or stopped:
        # a later flush must not publish it as watching again)
        self._unpublished.pop(name, None)

    # -- loop ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        self.watcher.start()
        self.resume_interrupted()
        for name in self.state.domains():
            self._publish(name, "stopped")  # until the watcher reports the domain
            self._guard(self._warm_newest, name)
        sel = selectors.DefaultSelector()
        sel.register(self.watcher.fileno(), selectors.EVENT_READ, "domains")
        sel.register(self.xs.fileno(), selectors.EVENT_READ, "requests")
        log.info("xenpbrd serving %d registered domain(s) from %s",
                 len(self.state.domains()), self.state.root)
        sdnotify.ready(f"serving {len(self.state.domains())} registered domain(s)")
        while self._running:
            self.turn(sel.select(timeout=POLL_S if self._work_left() else 1.0))
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
            for event in self.watcher.poll_once(0):
                self._guard(self.on_domain_event, event)
        if "requests" in sources:
            self._collect_watches()
        if time.monotonic() - self._swept_at >= SWEEP_S:
            self._sweep()
        self._serve_dirty()
        self._flush()

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
        """Look at every watched domain's request again: a request whose watch event was
        lost (or that came while its domain was out of budget) is answered anyway."""
        self._swept_at = time.monotonic()
        for domid in self.watching:
            self._dirty.setdefault(domid, set()).add("request")

    def _serve_dirty(self) -> None:
        """One turn of round-robin service: each dirty domain once, oldest first."""
        handlers = {"request": self.on_request, "status": self.on_status,
                    "invalidate": self.on_invalidate}
        for domid in list(self._dirty):
            kinds = self._dirty.pop(domid, set())
            if "request" in kinds and not self._read_allowed(domid):
                self._dirty[domid] = {"request"}  # keeps its mark; served when it refills
                kinds.discard("request")
            for kind in sorted(kinds):
                self._guard(handlers[kind], domid)

    def _read_allowed(self, domid: int) -> bool:
        bucket = self._read_budget.get(domid)
        if bucket is None:
            bucket = self._read_budget[domid] = protocol.TokenBucket(
                READ_BUDGET, self.protocol.gate.clock)
        return bucket.take()

    def _flush(self) -> None:
        """Held refusal acks whose budget refilled, and refusal counters not yet
        published (at most once a second per domain: coalesced, never dropped)."""
        self._guard(lambda _: self.protocol.flush_held(), None)
        now = time.monotonic()
        for name, domid in list(self._unpublished.items()):
            if now - self._published_at.get(name, 0.0) >= PUBLISH_EVERY_S:
                self._guard(lambda n: self._publish(n, "watching", domid), name)
                self._unpublished.pop(name, None)

    def _work_left(self) -> bool:
        """True while something waits for a budget to refill (poll soon, not in 1 s)."""
        return bool(self._dirty or self._unpublished or self.protocol.has_held())

    def resume_interrupted(self) -> None:
        """Finish the recoveries a killed xenpbrd left half-done (before serving)."""
        for name in self.state.interrupted_recoveries():
            with domain_lock(self.state, name):
                self._guard(self.recovery.resume_interrupted, name)

    def _guard(self, handler: Any, arg: Any) -> None:
        """One domain's failure must never stop the daemon serving the others."""
        try:
            handler(arg)
        except XenpbrError as exc:
            log.error("%s(%s) failed: %s", handler.__name__, arg, exc)
        except Exception:  # a bug: log it with its traceback and keep serving
            log.exception("%s(%s) crashed", handler.__name__, arg)

    # -- domain events -------------------------------------------------------------------

    def _name_of(self, domid: int) -> str | None:
        """The registered name ``domid`` runs as, None for a domain xenpbr does not
        manage: unregistered, or registered under another UUID (a domain that merely
        reuses the name, e.g. a plain ``xl create``, is never adopted or recovered)."""
        name = self.names.get(domid)
        if name is not None:
            if self.state.is_registered(name):
                return name
            self.names.pop(domid)  # unregistered meanwhile (xenpbr unregister)
            return None
        raw = self.xs.read_or(f"/local/domain/{int(domid)}/name", None)
        name = raw.decode(errors="replace") if raw else None
        if name is None or name not in self.state.domains() or not self._uuid_matches(domid, name):
            return None
        self.names[domid] = name
        return name

    def _uuid_matches(self, domid: int, name: str) -> bool:
        """True if ``domid`` has the UUID ``xenpbr create`` gave ``name`` (or the
        registration predates recorded UUIDs). A mismatch is logged once per domid."""
        wanted = self.state.registered_uuid(name)
        if wanted is None or domid in self.restored_domids:
            return True  # legacy registration, or the domain our own recovery restored
        try:
            actual = str(self.hv.domain_state(domid).uuid)
        except XenpbrError as exc:  # gone already: nothing to adopt
            log.debug("%s (domid %d): no domain state: %s", name, domid, exc)
            return False
        if actual == wanted:
            return True
        if domid not in self._strangers:
            self._strangers.add(domid)
            log.warning("%s (domid %d): not adopted: its UUID %s is not the registered %s "
                        "(another domain reusing the name; it is left alone)", name, domid,
                        actual, wanted)
        return False

    def on_domain_event(self, event: DomainEvent) -> None:
        name = self._name_of(event.domid)
        if name is None:
            if isinstance(event, DomainDestroyed):
                self._strangers.discard(event.domid)
            return
        if isinstance(event, DomainAppeared):
            self._adopt(event.domid, name)
        elif isinstance(event, (DomainCrashed, DomainWatchdogFired)):
            self._recover(event, name)
        elif isinstance(event, DomainDestroyed):
            self.names.pop(event.domid, None)
            self._passed.pop(event.domid, None)
            self._restored_runs.discard(event.domid)
            self.protocol.forget(event.domid)
            self._dirty.pop(event.domid, None)
            self._read_budget.pop(event.domid, None)
            self._unwatch_guest(event.domid)
            if name not in self.names.values():  # not replaced by a recovery
                self._publish(name, "stopped")

    def _adopt(self, domid: int, name: str) -> None:
        """A registered domain exists: prepare its control dir and watch its requests.

        A domain whose control dir already holds an ack was prepared by whoever restored
        it (this daemon, the CLI's ``xenpbr reboot``) or served by a previous xenpbrd:
        it is adopted as it is (rewriting its generation could contradict the ack its
        agent is reading, and requests up to the acked seq are replays).
        """
        if domid in self.restored_domids:
            self.restored_domids.discard(domid)
        elif not self.protocol.adopt(domid):
            self.protocol.register(domid, self.state.phases(name).generation)
        self._watch_guest(domid)
        self._publish(name, "watching", domid)
        log.info("%s (domid %d): watching its phase boundaries", name, domid)

    def _recover(self, event: DomainEvent, name: str) -> None:
        settings = self.state.load_record(name).get("settings", {})
        key = "on_watchdog" if isinstance(event, DomainWatchdogFired) else "on_crash"
        if settings.get(key) != domconfig.XENPBR_ACTION:
            return
        trigger = "watchdog" if key == "on_watchdog" else "crash"
        self._cancel_warm_up(name)  # the recovery needs dom0's CPU now
        with domain_lock(self.state, name):
            self.names.pop(event.domid, None)
            self._publish(name, "recovering", event.domid)  # still there, crashed
            try:
                timeline = self.recovery.recover(name, trigger, crash_seen=event.seen_at)
            except RecoveryFailed as exc:
                log.critical("%s is DOWN: %s", name, exc)
                self._publish(name, "down")
                return
        self._recovered_as(name, timeline)
        log.info("%s recovered via %s, downtime %.2f s", name, timeline.method,
                 timeline.downtime() or -1)
        self._guard(self._warm_newest, name)  # a warm-up the crash cancelled is done now

    def _recovered_as(self, name: str, timeline: Any) -> None:
        """Publish the domid the recovery brought back (publishing none here once left
        ``domid`` empty under a running guest) and know it as ``name`` at once, so the
        old domid's destruction does not publish the domain as stopped. A run restored
        from a phase has passed that phase and the earlier ones."""
        domid = timeline.domid
        if domid is not None:
            self.names[domid] = name
            if timeline.method.startswith("phase:"):
                self._restored_runs.add(domid)
                order = list(self.state.phases(name).phases)
                phase = timeline.method[len("phase:"):]
                self._passed[domid] = set(order[:order.index(phase) + 1]) if phase in order \
                    else {phase}
        self._publish(name, "watching", domid)

    # -- phase boundaries ----------------------------------------------------------------

    def on_request(self, domid: int) -> None:
        name = self._name_of(domid)
        if name is None:
            return
        admission = self.protocol.poll(domid)
        if admission.outcome is Outcome.REFUSED:
            # refusal counters are published by _flush, at most once a second: a
            # flooding guest must not turn each of its writes into a dom0 transaction
            self._unpublished[name] = domid
        if admission.outcome is not Outcome.ACCEPTED or admission.request is None:
            return
        request = admission.request
        self._publish(name, "capturing", domid)
        self._cancel_warm_up(name)  # the store is about to change
        verdict, detail = self._judged(name, request, domid)
        try:
            self.protocol.answer(domid, request.seq, verdict, detail)
        finally:  # never left published as capturing
            self._publish(name, "watching", domid)
        if verdict == Verdict.captured():
            self._warm_up(name, self.state.phases(name).images[request.phase].image_id)
        # xl save -c suspends and resumes the guest: resync the domain snapshot, and act on
        # what changed meanwhile (a guest that crashed during the capture must be
        # recovered: dropping these events once left it crashed for good, in the bench)
        for event in self.watcher.rescan():
            self._guard(self.on_domain_event, event)

    def _judged(self, name: str, request: protocol.BoundaryRequest,
                domid: int) -> tuple[Verdict, str]:
        """:meth:`_judge_and_capture`, but a failure (a bug, an unusable config, a store
        error) is a ``capture-failed`` answer: an accepted request is always answered
        (it once stayed unanswered, published as ``capturing``)."""
        try:
            with domain_lock(self.state, name):
                return self._judge_and_capture(name, request, domid)
        except Exception as exc:  # noqa: BLE001 - the guest waits for an answer
            log.exception("%s (domid %d): boundary %s (seq %d) failed in dom0", name, domid,
                          request.phase, request.seq)
            return (Verdict.refused("capture-failed"),
                    f"dom0 failed on this boundary: {type(exc).__name__}: {exc}")

    def _warm_up(self, name: str, image_id: str) -> None:
        """Regenerate the new image's stream in the background (:mod:`hotcache`), so a
        crash restores from a plain file; the guest got its ack already."""
        if not self.hot_cache or not self._hot_stream_wanted(name):
            return
        cancel = self._warming[name] = threading.Event()

        def work() -> None:
            try:
                hotcache.warm(self.store, name, image_id, cancel)
            except hotcache.Cancelled:
                log.info("%s: warm-up of image %s cancelled", name, image_id)
            except hotcache.NoRoom as exc:
                log.warning("%s: no hot stream for image %s: %s", name, image_id, exc)
            except Exception as exc:  # a cache: the restore falls back to the FIFO
                log.warning("%s: hot stream of image %s not built: %s", name, image_id, exc)

        threading.Thread(target=work, name=f"warm-{name}", daemon=True).start()

    def _warm_newest(self, name: str) -> None:
        """Warm the domain's newest image up if its stream is not ready (after a restart
        of xenpbrd, or a recovery that cancelled the warm-up). The ids come from the
        phase state, not a scan of the store: this runs on the daemon's loop."""
        ids = [img.image_id for img in self.state.phases(name).images.values()]
        newest = max(ids, default=None)  # ids start with their UTC creation time
        if newest and not hotcache.path_of(self.store, name, newest).exists():
            self._warm_up(name, newest)

    def _hot_stream_wanted(self, name: str) -> bool:
        config = domconfig.DomainConfig(self.state.xl_config_path(name),
                                        self.state.load_record(name)["settings"])
        try:
            return domconfig.hot_stream(config)
        except domconfig.ConfigError as exc:
            log.error("%s: %s; no hot stream", name, exc)
            return False

    def _cancel_warm_up(self, name: str) -> None:
        cancel = self._warming.pop(name, None)
        if cancel is not None:
            cancel.set()

    def on_invalidate(self, domid: int) -> None:
        """The guest asks to drop its images from a phase on (:mod:`invalidation`)."""
        name = self._name_of(domid)
        if name is None:
            return
        raw = self.xs.read_or(invalidation.request_path(domid), None)
        request = invalidation.parse_request(raw)
        if request is None:
            if raw is not None:
                log.warning("%s (domid %d): malformed invalidation request %s ignored", name,
                            domid, ascii(bytes(raw[:64])))
            return
        if request.seq <= invalidation.last_answered(self.xs, domid):
            return  # a replay, or the watch firing for the key's creation
        now = time.monotonic()
        if now - self._invalidated_at.get(domid, -1e9) < 1.0:
            answer = invalidation.Answer(request.seq, refused="rate-limited")
        else:
            self._invalidated_at[domid] = now
            answer = self._invalidate(name, request)
        invalidation.write_answer(self.xs, domid, answer)
        log.info("%s (domid %d): invalidation from phase %s: %s", name, domid, request.phase,
                 answer.encode())
        self._publish(name, "watching", domid)

    def _invalidate(self, name: str, request: invalidation.Invalidation) -> invalidation.Answer:
        self._cancel_warm_up(name)
        with domain_lock(self.state, name):
            phases = self.state.phases(name)
            if request.phase not in phases.phases:
                return invalidation.Answer(request.seq, refused="unknown-phase")
            dropped = phases.forget(request.phase)
            for img in dropped:
                self._drop_image(name, img.image_id)
            self.state.save_phases(phases)
        return invalidation.Answer(request.seq, dropped=len(dropped))

    def on_status(self, domid: int) -> None:
        """A restored guest's agent reported ``acked``/``ready``: mark the timeline."""
        name = self._name_of(domid)
        if name is None:
            return
        raw = self.xs.read_or(protocol.status_watch(domid)[0], None)
        status = protocol.parse_guest_status(raw)
        if status is None:
            return
        now = time.monotonic()
        if status.state == "ready":
            self._guest_ready(name, status.generation, now)
        if self.state.amend_latest_history(
                name, lambda t: t.note_guest(status.state, status.generation, now)):
            log.info("%s (domid %d): guest reports %s", name, domid, status.encode())
            self._publish(name, "watching", domid)

    def _guest_ready(self, name: str, generation: int, now: float) -> None:
        """Start the restored image's healthy clock (:class:`~xenpbr.phases.Trial`)."""
        with domain_lock(self.state, name):
            phases = self.state.phases(name)
            if phases.guest_ready(generation, now):
                self.state.save_phases(phases)

    @staticmethod
    def _health_policy(name: str, config: domconfig.DomainConfig) -> tuple[float, int]:
        """The domain's health policy; the defaults if its config is unusable (a boundary
        must still be answered)."""
        try:
            return domconfig.health_policy(config)
        except domconfig.ConfigError as exc:
            log.error("%s: %s; using the default image health policy", name, exc)
            return phases_mod.HEALTH_DEFAULTS

    def _replacement_refused(self, name: str, phases: Any, request: protocol.BoundaryRequest,
                             domid: int) -> tuple[Verdict, str] | None:
        """The refusal of a capture that would replace a usable image against the rules
        of :meth:`~xenpbr.phases.DomainPhases.replacement`, or None."""
        passed = self._passed.setdefault(domid, set())
        reason = phases.replacement(request.phase, request.phase in passed, time.time())
        passed.add(request.phase)
        if reason is None:
            return None
        existing = phases.images[request.phase]
        detail = (f"phase {request.phase} already has image {existing.image_id}; "
                  + ("this run passed that phase already: an image is replaced only by "
                     "a later run" if reason == "out-of-order" else
                     f"it is replaced at most once per {phases_mod.REPLACE_MIN_AGE_S:.0f} s"))
        log.warning("%s (domid %d): boundary %s (seq %d) refused (%s): %s", name, domid,
                    request.phase, request.seq, reason, detail)
        return Verdict.refused(reason), detail

    @staticmethod
    def _replacing(phases: Any, phase: str, fingerprint: str) -> str:
        """Why a capture of ``phase`` replaces its image, for the log."""
        old = phases.images.get(phase)
        if old is None:
            return "none"
        if old.abandoned(phases.health[1]):
            return f"abandoned after {old.failures} restores crashed before healthy"
        if not old.verified:
            return "it failed verification"
        return "another fingerprint" if old.fingerprint != fingerprint else "recaptured"

    @staticmethod
    def _log_kept_abandoned(name: str, phases: Any, phase: str) -> None:
        image = phases.images.get(phase)
        if image is not None and image.abandoned(phases.health[1]):
            log.warning("%s: phase %s skipped: its image %s is abandoned and this run was "
                        "restored from an earlier one; the next fresh boot re-images it",
                        name, phase, image.image_id)

    def _judge_and_capture(self, name: str, request: protocol.BoundaryRequest,
                           domid: int) -> tuple[Verdict, str]:
        """The verdict for an admitted boundary, and why if it is a refusal."""
        phases = self.state.phases(name)
        config = domconfig.DomainConfig(self.state.xl_config_path(name),
                                        self.state.load_record(name)["settings"])
        fingerprint = domconfig.fingerprint(config, request.phases, request.identity).digest()
        phases.health = self._health_policy(name, config)
        restored_run = domid in self._restored_runs
        if phases.boundary_decision(request.phase, fingerprint, restored_run) == "capture":
            refusal = self._replacement_refused(name, phases, request, domid)
            if refusal is not None:
                if refusal[0].reason != "out-of-order":  # a later run: its claim stands,
                    phases.phases, phases.fingerprint = request.phases, fingerprint
                    self.state.save_phases(phases)  # so its older images are stale now
                return refusal
        self._passed.setdefault(domid, set()).add(request.phase)
        phases.phases, phases.fingerprint = request.phases, fingerprint
        unsafe = consistency.judge(config, request)
        if unsafe is not None:
            self.state.save_phases(phases)
            log.warning("%s: boundary %s refused (%s): %s", name, request.phase,
                        unsafe.reason, unsafe.detail)
            return Verdict.refused(unsafe.reason), unsafe.detail
        if phases.boundary_decision(request.phase, fingerprint, restored_run) == "skip":
            self.state.save_phases(phases)
            self._log_kept_abandoned(name, phases, request.phase)
            return Verdict.skipped(), ""
        log.info("%s: capturing phase %s (seq %d)", name, request.phase, request.seq)
        snap_disks = domconfig.snapshot_disks(config)
        extra = {"extra": {disks.EXTRA_KEY: sorted(snap_disks)}} if snap_disks else {}
        try:
            result = self.capture(name, self.store, request.phase, seq=request.seq,
                                  fingerprint=fingerprint, crashed=self._crash_check(domid),
                                  **extra)
        except XenpbrError as exc:
            log.error("%s: capture of phase %s failed: %s", name, request.phase, exc)
            return Verdict.refused("capture-failed"), f"capture failed in dom0: {exc}"
        meta = result.meta
        taken, refusal = self._snapshot_disks(name, meta.image_id, snap_disks)
        if refusal is not None:
            return refusal
        paused = getattr(result, "paused_s", None)
        why = self._replacing(phases, request.phase, fingerprint)
        phases.record_image(ImageInfo(
            meta.image_id, request.phase, fingerprint, time.time(), seq=request.seq,
            capture_s=round(result.total_s, 3),
            paused_s=None if paused is None else round(paused, 3),
            disks_s=round(sum(t.seconds for t in taken), 3) if taken else None,
            disk_mechanisms=",".join(f"{t.vdev}={t.mechanism}" for t in taken)))
        self.state.save_phases(phases)
        replaced = phases.images[request.phase].replaced
        if replaced:
            log.warning("%s: image %s replaces %s as phase %s's image (%s); the old one "
                        "is deleted", name, meta.image_id, replaced, request.phase, why)
            self._drop_image(name, replaced)  # never planned again: only its bytes remain
        log.info("%s: captured phase %s (%s) in %.2f s, guest paused ~%s s%s", name,
                 request.phase, meta.image_id, result.total_s,
                 "?" if paused is None else f"{paused:.2f}",
                 "".join(f", disk {t.vdev} by {t.mechanism} in {t.seconds:.2f} s"
                         for t in taken))
        return Verdict.captured(), ""

    def _crash_check(self, domid: int) -> Any:
        """For the capture's guard: has ``domid`` crashed (or its watchdog fired)?"""
        def crashed() -> bool:
            state = self.hv.domain_state(domid)
            return state.crashed or state.shutdown_reason == ShutdownReason.WATCHDOG
        return crashed

    def _snapshot_disks(self, name: str, image_id: str, snap_disks: dict[str, str]
                        ) -> tuple[list[disks.DiskSnapshot], tuple[Verdict, str] | None]:
        """Snapshot the ``snapshot`` disks for the image just captured (the agent keeps
        their file systems frozen until our ack). On failure, or past the quota, the image
        is dropped: a memory image without its disks must never be restored."""
        if not snap_disks:
            return [], None
        try:
            taken = disks.take(self.store, name, image_id, snap_disks)
        except (XenpbrError, OSError) as exc:
            log.error("%s: disk snapshot for image %s failed: %s", name, image_id, exc)
            self._drop_image(name, image_id)
            return [], (Verdict.refused("snapshot-failed"),
                        f"disk snapshot failed in dom0: {exc}")
        usage = self.store.usage(name)
        if usage.over_quota:
            self._drop_image(name, image_id)
            return [], (Verdict.refused("quota"),
                        f"image with disk snapshots takes {name} to {usage.total} bytes, "
                        f"over its quota of {usage.quota}: raise [images] default_quota "
                        "in /etc/xenpbr/xenpbr.conf (or $XENPBR_IMAGE_QUOTA) or use a "
                        "reflink/thin-capable disk store")
        return taken, None

    def _drop_image(self, name: str, image_id: str) -> None:
        """Delete an image with its disk snapshots; failures are logged (GC finishes)."""
        for step in (self.store.delete, lambda n, i: disks.remove(self.store, n, i)):
            try:
                step(name, image_id)
            except XenpbrError as exc:
                log.error("%s: could not delete image %s: %s", name, image_id, exc)


class DaemonStartError(XenpbrError):
    """xenpbrd cannot start: its state directory or Xen is not usable."""


def build_parser() -> "argparse.ArgumentParser":
    """xenpbrd's command line (``--help`` must print help, never start the daemon)."""
    import argparse
    from xenpbr import __version__, settings
    parser = argparse.ArgumentParser(
        prog="xenpbrd", description="xenpbr's daemon: captures images at phase boundaries "
        "of registered Xen PV domains and recovers them when they crash.",
        epilog="Exit status: 0 stopped by SIGTERM/SIGINT, 1 runtime failure (Xen, "
        "xenstored, state directory or config file unusable), 2 usage error. "
        "Settings: docs/settings.md.")
    parser.add_argument("--version", action="version", version=f"xenpbrd {__version__}")
    parser.add_argument("--config", type=Path, metavar="PATH",
                        help=f"config file (default: ${settings.CONFIG_ENV}, else "
                        f"{settings.DEFAULT_PATH} if it exists)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="state directory, overriding [state] dir and "
                        "$XENPBR_STATE_DIR (default /var/lib/xenpbr)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at debug level (overrides [log] level)")
    return parser


def main(argv: "list[str] | os.PathLike[str] | None" = None) -> int:
    """Entry point of ``xenpbrd`` (``argv``: its arguments, default sys.argv[1:]).

    Usage errors exit 2 (argparse), runtime failures 1 with one line on stderr: an
    operator (or systemd's journal) needs the cause, not a traceback. A path instead of
    a list is the state root (``xenpbr daemon``'s older call)."""
    import os
    from xenpbr import logsetup, settings
    if isinstance(argv, (str, os.PathLike)):
        argv = ["--state-dir", os.fspath(argv)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version: 0; a usage error: 2
        return exc.code if isinstance(exc.code, int) else 0
    try:
        conf = settings.with_overrides(settings.load(args.config), state_dir=args.state_dir,
                                       log_level="debug" if args.verbose else None)
        settings.use(conf)
        logsetup.setup(conf.log_level)
        return _serve(conf)
    except XenpbrError as exc:
        _fail(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        settings.use(None)


def _fail(message: str) -> None:
    """One line on stderr; under systemd at priority err (``<3>``), not info."""
    import sys
    from xenpbr import logsetup
    prefix = "<3>" if logsetup.stderr_is_journal() else ""
    print(f"{prefix}xenpbrd: error: {message}", file=sys.stderr)


def _usable_state_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, before serving:
    a recovery that cannot write its intent record would fail outright later."""
    import tempfile
    from xenpbr import settings
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DaemonStartError(f"state directory {path} is not usable: "
                               f"{exc.strerror or exc}; fix its permissions or set "
                               f"{settings.hint('state_dir')}") from exc
    return path


def _serve(conf: Any) -> int:
    """Open Xen and xenstore with ``conf`` (:class:`~xenpbr.settings.Settings`) and
    serve until SIGTERM/SIGINT."""
    from contextlib import ExitStack
    from xenpbr.hypervisor.libxc import LibxcHypervisor
    from xenpbr.xenstore import XenstoreClient

    state = StateDir(_usable_state_dir(conf.state_dir))
    store = ImageStore(state.images_root, default_quota=conf.image_quota)
    libdir = str(conf.xen_libdir) if conf.xen_libdir else None
    with ExitStack() as stack:
        try:
            hv = stack.enter_context(LibxcHypervisor(libdir=libdir))
            xs_dom = stack.enter_context(XenstoreClient(libdir))
            xs_req = stack.enter_context(XenstoreClient(libdir))
        except OSError as exc:  # /dev/xen/privcmd, xenstored's socket ...
            raise DaemonStartError(f"cannot open Xen (run xenpbrd in dom0, as root, with "
                                   f"xenstored running): {exc}") from exc
        Daemon(state, store, hv, xs_dom, xs_req).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
