"""Domain events from xenstore's ``@introduceDomain`` / ``@releaseDomain`` watches.

Why this shape: Xen tells dom0 about domains only through ``VIRQ_DOM_EXC``, which
xenstored turns into ``@releaseDomain`` (a domain finished shutting down, for any reason,
or became dead) and the toolstack's introduce into ``@introduceDomain``. Neither event
says *which* domain changed, so on each firing :class:`DomainWatcher` takes a
``list_domains()`` snapshot and diffs it with the previous one. It never polls: it blocks
on the xenstore connection's file descriptor, with a timeout only so it can be stopped.

Each transition is reported once: a crashed domain that stays crashed is not reported
again; a domain that resumes (suspend cancelled, checkpoint taken) and shuts down again
is. Limits of a snapshot diff (see ``docs/hypervisor.md``): a state that comes and goes
between two snapshots is not seen, so a domain destroyed right after crashing (``xl``'s
``on_crash="destroy"``) yields only :class:`DomainDestroyed`, carrying the shutdown code
the dying domain still showed, if any.

``python -m xenpbr.watcher --json`` prints one JSON line per event, for timing on real
Xen.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import sys
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO

from xenpbr.errors import XenpbrError
from xenpbr.hypervisor.base import CONTROL_DOMID, DomainState, Hypervisor, ShutdownReason
from xenpbr.xenstore.client import WatchEvent, XenstoreClient
from xenpbr.xenstore.paths import INTRODUCE_DOMAIN, RELEASE_DOMAIN

log = logging.getLogger(__name__)

__all__ = [
    "DomainAppeared",
    "DomainCrashed",
    "DomainDestroyed",
    "DomainEvent",
    "DomainShutDown",
    "DomainWatchdogFired",
    "DomainWatcher",
    "main",
]

WATCH_PATHS = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)
INITIAL = "initial"  # trigger of the events from the first snapshot
RESCAN = "rescan"  # trigger of an explicit rescan()


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class DomainEvent:
    """Something happened to a domain. ``seen_at`` is ``time.monotonic()`` right after
    the snapshot that showed it, ``wall_time`` is ``time.time()`` at the same instant,
    ``trigger`` the watch path that caused the snapshot (or ``initial``/``rescan``)."""

    domid: int
    uuid: uuid_mod.UUID
    seen_at: float
    wall_time: float
    trigger: str

    kind: ClassVar[str] = "event"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``event`` (the kind), ids, both clocks, extra fields."""
        out: dict[str, Any] = {"event": self.kind, "domid": self.domid,
                               "uuid": str(self.uuid), "monotonic": self.seen_at,
                               "time": self.wall_time, "trigger": self.trigger}
        out.update(self._extra())
        return out

    def _extra(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class DomainAppeared(DomainEvent):
    """A domain we had not seen exists (created, restored, or found at start)."""

    kind: ClassVar[str] = "appeared"


@dataclass(frozen=True)
class DomainCrashed(DomainEvent):
    """The domain is shut down with reason ``crash`` (kernel panic, or Xen killed it)."""

    kind: ClassVar[str] = "crashed"


@dataclass(frozen=True)
class DomainWatchdogFired(DomainEvent):
    """The domain is shut down with reason ``watchdog`` (its Xen watchdog expired)."""

    kind: ClassVar[str] = "watchdog"


@dataclass(frozen=True)
class DomainShutDown(DomainEvent):
    """The domain shut down for another reason. ``reason`` is ``None`` for a code Xen
    does not define (the guest chose it); ``code`` is always the raw value."""

    reason: ShutdownReason | None
    code: int

    kind: ClassVar[str] = "shutdown"

    def _extra(self) -> dict[str, Any]:
        name = self.reason.name.lower() if self.reason is not None else None
        return {"reason": name, "code": self.code}


@dataclass(frozen=True)
class DomainDestroyed(DomainEvent):
    """The domain is dying or gone. ``shutdown_code`` is the last shutdown code seen
    (from earlier snapshots or from the dying domain itself), ``None`` if none."""

    shutdown_code: int | None

    kind: ClassVar[str] = "destroyed"

    @property
    def shutdown_reason(self) -> ShutdownReason | None:
        return _reason(self.shutdown_code)

    def _extra(self) -> dict[str, Any]:
        reason = self.shutdown_reason
        return {"shutdown_code": self.shutdown_code,
                "shutdown_reason": reason.name.lower() if reason is not None else None}


def _reason(code: int | None) -> ShutdownReason | None:
    try:
        return None if code is None else ShutdownReason(code)
    except ValueError:
        return None


# --------------------------------------------------------------------------- diffing


@dataclass
class _Tracked:
    """What we last reported for one domid."""

    uuid: uuid_mod.UUID
    shutdown_code: int | None = None  # code of the shutdown reported, None if running
    destroyed: bool = False


@dataclass(frozen=True)
class _Stamp:
    seen_at: float
    wall_time: float
    trigger: str


@dataclass
class _Differ:
    """Snapshot-to-events state machine; pure (no I/O), so it is easy to test."""

    ignore: frozenset[int]
    tracked: dict[int, _Tracked] = field(default_factory=dict)

    def diff(self, states: Iterable[DomainState], stamp: _Stamp) -> list[DomainEvent]:
        current = {s.domid: s for s in states if s.domid not in self.ignore}
        events: list[DomainEvent] = []
        for domid in sorted(set(self.tracked) | set(current)):
            events.extend(self._one(domid, current.get(domid), stamp))
        return events

    def _one(self, domid: int, state: DomainState | None, stamp: _Stamp) -> list[DomainEvent]:
        out: list[DomainEvent] = []
        tracked = self.tracked.get(domid)
        if tracked is not None and (state is None or state.uuid != tracked.uuid):
            if not tracked.destroyed:
                code = tracked.shutdown_code
                out.append(DomainDestroyed(domid, tracked.uuid, *_args(stamp), code))
            del self.tracked[domid]
            tracked = None
        if state is None:
            return out
        if tracked is None:
            tracked = self.tracked[domid] = _Tracked(state.uuid)
            if state.dying:  # came and went between two snapshots: nothing to report
                tracked.destroyed = True
                log.info("domain %d (%s) first seen already dying; not reported",
                         domid, state.uuid)
                return out
            out.append(DomainAppeared(domid, state.uuid, *_args(stamp)))
        out.extend(self._transition(tracked, state, stamp))
        return out

    def _transition(self, tracked: _Tracked, state: DomainState,
                    stamp: _Stamp) -> list[DomainEvent]:
        if tracked.destroyed:
            return []
        if state.dying:
            tracked.destroyed = True
            code = state.shutdown_code if state.shutdown else tracked.shutdown_code
            return [DomainDestroyed(state.domid, state.uuid, *_args(stamp), code)]
        if state.shutdown and state.shutdown_code != tracked.shutdown_code:
            tracked.shutdown_code = state.shutdown_code
            return [_shutdown_event(state, stamp)]
        if not state.shutdown and tracked.shutdown_code is not None:
            log.info("domain %d runs again after shutdown code %d (resumed)",
                     state.domid, tracked.shutdown_code)
            tracked.shutdown_code = None
        return []


def _args(stamp: _Stamp) -> tuple[float, float, str]:
    return stamp.seen_at, stamp.wall_time, stamp.trigger


def _shutdown_event(state: DomainState, stamp: _Stamp) -> DomainEvent:
    ids = (state.domid, state.uuid, *_args(stamp))
    if state.shutdown_reason == ShutdownReason.CRASH:
        return DomainCrashed(*ids)
    if state.shutdown_reason == ShutdownReason.WATCHDOG:
        return DomainWatchdogFired(*ids)
    code = state.shutdown_code if state.shutdown_code is not None else -1
    if state.shutdown_reason is None:
        log.warning("domain %d shut down with code %d, which Xen does not define "
                    "(chosen by the guest)", state.domid, code)
    return DomainShutDown(*ids, state.shutdown_reason, code)


# --------------------------------------------------------------------------- watcher


class DomainWatcher:
    """Domain events from an open xenstore client and a :class:`Hypervisor`.

    Give it its own xenstore connection and use :meth:`poll_once` / :meth:`events`, or
    share one: read watch events yourself and pass the ones :meth:`owns` claims to
    :meth:`process`. :meth:`fileno` is for ``selectors``: when it is readable, call
    ``poll_once(0)``.

    The first snapshot (taken by :meth:`start`, after the watches are registered so
    nothing falls between) reports every existing domain as :class:`DomainAppeared`,
    followed by its shutdown or destroyed event if it is in such a state, with trigger
    ``initial``; so a domain that crashed while the daemon was down is reported.
    ``report_existing=False`` records them silently instead. dom0 is ignored by default.
    """

    tick = 1.0  # seconds between stop-flag checks inside events()

    def __init__(self, hypervisor: Hypervisor, xenstore: XenstoreClient, *,
                 ignore_domids: Iterable[int] = (CONTROL_DOMID,),
                 report_existing: bool = True, token: str | None = None,
                 on_other_watch: Callable[[WatchEvent], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._hv = hypervisor
        self._xs = xenstore
        self._differ = _Differ(frozenset(ignore_domids))
        self._report_existing = report_existing
        self.token = token or f"xenpbr-domains-{os.getpid()}-{id(self):x}"
        self._on_other = on_other_watch
        self._clock = clock
        self._wall_clock = wall_clock
        self._pending: list[DomainEvent] = []
        self._dirty: str | None = None  # trigger of a snapshot still owed
        self._started = False
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> DomainWatcher:
        """Register the watches, then take the first snapshot. Idempotent."""
        if self._started:
            return self
        for path in WATCH_PATHS:
            self._xs.watch(path, self.token)
        self._started = True
        log.info("watching %s (token %s)", " and ".join(WATCH_PATHS), self.token)
        events = self._snapshot(INITIAL)
        if self._report_existing:
            self._pending.extend(events)
        return self

    def stop(self) -> None:
        """Make :meth:`events` return and :meth:`poll_once` wake up; from any thread
        (or a signal handler)."""
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Unregister the watches (the xenstore client stays open: it is the caller's)."""
        if self._started:
            self._started = False
            for path in WATCH_PATHS:
                try:
                    self._xs.unwatch(path, self.token)
                except XenpbrError as exc:
                    log.warning("unwatching %s failed: %s", path, exc)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> DomainWatcher:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- event loop integration -----------------------------------------------------------

    def fileno(self) -> int:
        """The xenstore connection's fd: readable while watch events are queued."""
        return self._xs.fileno()

    def owns(self, event: WatchEvent) -> bool:
        return event.token == self.token

    def process(self, watch_events: Iterable[WatchEvent]) -> list[DomainEvent]:
        """Handle watch events read by someone else; ours trigger one snapshot."""
        mine = [ev for ev in watch_events if self.owns(ev)]
        if mine:
            log.debug("domain watch fired: %s", ", ".join(ev.path for ev in mine))
            self._dirty = self._dirty or mine[0].path
        if self._dirty is None:
            return []
        return self._snapshot(self._dirty)

    def rescan(self) -> list[DomainEvent]:
        """Snapshot and diff now, without a watch (e.g. after the daemon's own action)."""
        return self._snapshot(RESCAN)

    def poll_once(self, timeout: float | None = 0.0) -> list[DomainEvent]:
        """Events available now, waiting up to *timeout* s (``None``: until some arrive
        or :meth:`stop`). May return ``[]`` (a watch fired but nothing changed)."""
        self._require_started()
        if self._pending:
            events, self._pending = self._pending, []
            return events
        watch_events = self._drain()
        if not watch_events and self._dirty is None and not self.stopped:
            if self._wait(timeout):
                watch_events = self._drain()
        return self.process(watch_events)

    def events(self, timeout: float | None = None) -> Iterator[DomainEvent]:
        """Yield events until :meth:`stop` or *timeout* seconds (``None``: no limit)."""
        deadline = None if timeout is None else self._clock() + timeout
        while not self.stopped:
            wait = self.tick
            if deadline is not None:
                wait = min(wait, deadline - self._clock())
                if wait <= 0:
                    return
            yield from self.poll_once(wait)

    # -- internals ------------------------------------------------------------------------

    def _require_started(self) -> None:
        if not self._started:
            raise XenpbrError("DomainWatcher is not started: call start() or use 'with'")

    def _drain(self) -> list[WatchEvent]:
        """Read every queued watch event; hand foreign ones to ``on_other_watch``."""
        out: list[WatchEvent] = []
        while (ev := self._xs.read_watch(timeout=0)) is not None:
            if self.owns(ev):
                out.append(ev)
            elif self._on_other is not None:
                self._on_other(ev)
            else:
                log.warning("dropping watch event %s (token %r) not meant for the domain "
                            "watcher: give it its own xenstore connection", ev.path, ev.token)
        return out

    def _wait(self, timeout: float | None) -> bool:
        """Block until xenstore has events (True), or timeout/stop (False)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._xs.fileno(), selectors.EVENT_READ, "xs")
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            ready = {key.data for key, _ in sel.select(timeout)}
        if "wake" in ready:
            self._clear_wake()
        return "xs" in ready

    def _clear_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except BlockingIOError:
            pass

    def _snapshot(self, trigger: str) -> list[DomainEvent]:
        """list_domains() and diff. If it raises, the snapshot stays owed and the next
        poll retries it even without a new watch event."""
        self._dirty = trigger
        states = self._hv.list_domains()
        stamp = _Stamp(self._clock(), self._wall_clock(), trigger)
        self._dirty = None
        events = self._differ.diff(states, stamp)
        for event in events:
            log.info("domain %d (%s): %s [%s]", event.domid, event.uuid, event.kind, trigger)
        return events


# --------------------------------------------------------------------------- CLI


def format_event(event: DomainEvent, as_json: bool) -> str:
    data = event.to_json()
    if as_json:
        return json.dumps(data, sort_keys=True)
    extra = " ".join(f"{k}={v}" for k, v in data.items()
                     if k not in ("event", "domid", "uuid", "monotonic", "time"))
    return (f"{event.seen_at:.6f} {event.kind:<9} domid={event.domid} uuid={event.uuid} "
            f"{extra}").rstrip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xenpbr.watcher",
        description="Print Xen domain events (appeared, crashed, watchdog, shutdown, "
                    "destroyed) as they happen. Run as root in dom0.")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line (monotonic and wall-clock times)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="exit after N events (exit status 2 if --timeout comes first)")
    parser.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds")
    parser.add_argument("--existing", action="store_true",
                        help="also report domains that exist at start (trigger 'initial')")
    parser.add_argument("--libdir", help="directory holding the Xen 4.17 libraries "
                                         "(default: $XENPBR_LIBDIR, else the linker path)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    return parser


def _default_hypervisor(libdir: str | None) -> Hypervisor:
    from xenpbr.hypervisor.libxc import LibxcHypervisor
    return LibxcHypervisor(libdir=libdir)


def _default_xenstore(libdir: str | None) -> XenstoreClient:
    return XenstoreClient(libdir)


def main(argv: list[str] | None = None, *, out: TextIO | None = None,
         make_hypervisor: Callable[[str | None], Hypervisor] = _default_hypervisor,
         make_xenstore: Callable[[str | None], XenstoreClient] = _default_xenstore) -> int:
    """Exit status: 0 done, 1 error (message on stderr), 2 timeout before --count."""
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.count is not None and args.count < 1:
        print("xenpbr.watcher: --count must be at least 1", file=sys.stderr)
        return 1
    try:
        with make_hypervisor(args.libdir) as hv, make_xenstore(args.libdir) as xs, \
                DomainWatcher(hv, xs, report_existing=args.existing) as watcher:
            return _run(watcher, args, out)
    except XenpbrError as exc:
        print(f"xenpbr.watcher: {exc}", file=sys.stderr)
        return 1


def _run(watcher: DomainWatcher, args: argparse.Namespace, out: TextIO) -> int:
    restore = _stop_on_signals(watcher)
    try:
        print("xenpbr.watcher: ready", file=sys.stderr, flush=True)
        printed = 0
        for event in watcher.events(timeout=args.timeout):
            print(format_event(event, args.json), file=out, flush=True)
            printed += 1
            if args.count is not None and printed >= args.count:
                return 0
        return 2 if args.count is not None and not watcher.stopped else 0
    finally:
        restore()


def _stop_on_signals(watcher: DomainWatcher) -> Callable[[], None]:
    """SIGINT/SIGTERM stop the watcher cleanly (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.signal(sig, lambda *_: watcher.stop())
           for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return restore


if __name__ == "__main__":
    sys.exit(main())
