"""``xenpbr-agent reach-counter``: count how often an instruction dom0 altered runs.

After ``xenpbr inject --fault text|operand`` altered one kernel instruction, dom0 asks
(``control/xenpbr/reach`` = ``<id> <address>``) for a count of its executions, to tell a
fault that never ran from one that ran without visible effect. This counter arms a
kprobe on that address through tracefs (``kprobe_events``; the kernel's own
instrumentation, CONFIG_KPROBE_EVENTS) and reports its hit count from
``kprobe_profile`` in ``data/xenpbr/reach/count`` whenever it changes. Format and why:
:mod:`xenpbr.guestproto.reach`.

Like the provoke-listener it exists only while the guest's owner runs it (after the
last phase, so no image holds one: a restored guest starts a fresh counter, and the
kprobe goes with the kernel that had it). A request that was already there when the
counter started is never armed (it belongs to a kernel before a restore). A xenstore
error is logged and the counter reconnects.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenpbr.guestproto.reach import (
    ANSWER_KEY,
    READY_KEY,
    REQUEST_KEY,
    Reach,
    ReachMalformed,
    ReachRequest,
    ReachState,
    parse_request,
)
from xenpbr_agent.reconnect import serve_until

log = logging.getLogger(__name__)

#: Where tracefs is: its own mount point, or inside debugfs (auto-mounted there).
TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
GROUP = "xenpbr_reach"
WATCH_TOKEN = "xenpbr-reach"
#: How often the count is re-read while a counter is armed (a write only on change).
POLL_S = 0.5


def find_tracefs(candidates: tuple[str, ...] = TRACEFS) -> Path | None:
    """The first tracefs directory with ``kprobe_events``, or None."""
    for candidate in candidates:
        if (Path(candidate) / "kprobe_events").exists():
            return Path(candidate)
    return None


def _reason(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


class Kprobes:
    """One counter at a time in tracefs directory *root* (``kprobe_events``,
    ``kprobe_profile``, ``events/GROUP/EVENT/enable``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.event: str | None = None

    def arm(self, request: ReachRequest) -> str | None:
        """Put a counting kprobe on the request's address, replacing the previous one;
        None when armed, else the reason (an errno name) the kernel refused it."""
        self.disarm()
        event = f"r{request.id}"
        try:
            self._append(f"p:{GROUP}/{event} {request.address:#x}\n")
        except OSError as exc:
            log.warning("the kernel refused a kprobe at %#x: %s", request.address, exc)
            return _reason(exc)
        self.event = event
        try:
            (self.root / "events" / GROUP / event / "enable").write_text("1\n")
        except OSError as exc:
            log.warning("the kernel refused to arm the kprobe at %#x: %s",
                        request.address, exc)
            self.disarm()
            return _reason(exc)
        log.info("counting executions of %#x (dom0's request %d)", request.address,
                 request.id)
        return None

    def disarm(self) -> None:
        """Remove the current counter, if any (errors logged: a new one may still arm)."""
        if self.event is None:
            return
        event, self.event = self.event, None
        try:
            (self.root / "events" / GROUP / event / "enable").write_text("0\n")
            self._append(f"-:{GROUP}/{event}\n")
        except OSError as exc:
            log.warning("could not remove kprobe %s/%s: %s", GROUP, event, exc)

    def hits(self) -> int | None:
        """The current counter's hits from ``kprobe_profile``, None without one."""
        if self.event is None:
            return None
        for line in (self.root / "kprobe_profile").read_text().splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in (self.event, f"{GROUP}/{self.event}"):
                return int(words[1])
        return None

    def _append(self, line: str) -> None:
        # O_APPEND: opening kprobe_events for writing without it clears every probe. Not
        # Python's open(..., "a"), which seeks to the end first: tracefs refuses that
        # seek with EINVAL (seen in the lab), so every probe would look refused.
        fd = os.open(self.root / "kprobe_events", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode("ascii"))
        finally:
            os.close(fd)


class Counter:
    """Serves dom0's reach requests on one connection at a time; *kprobes* None means
    no tracefs: every request is refused with ``no-tracefs``."""

    def __init__(self, kprobes: Kprobes | None) -> None:
        self.kprobes = kprobes
        self.last: bytes | None = None
        self.current: ReachRequest | None = None
        self.reported: int | None = None
        self.armed = 0

    def serve(self, xs: Any, stop: Callable[[], bool]) -> None:
        """Watch for requests and report counts until *stop* (a xenstore error ends it:
        the caller reconnects)."""
        xs.watch(REQUEST_KEY, WATCH_TOKEN)
        if self.last is None:  # never arm what was there before we listened
            self.last = xs.read_or(REQUEST_KEY, b"")
        # "ready" only once a request written after it cannot be missed
        xs.write(READY_KEY, "kprobes" if self.kprobes is not None else "no-tracefs")
        while not stop():
            xs.read_watch(timeout=POLL_S)
            raw = xs.read_or(REQUEST_KEY, b"")
            if raw and raw != self.last:
                self.last = raw
                self._handle(xs, raw)
            self._report(xs)

    def _handle(self, xs: Any, raw: bytes) -> None:
        try:
            request = parse_request(raw)
        except ReachMalformed as exc:
            log.warning("ignoring dom0's reach request: %s", exc)
            return
        why = "no-tracefs" if self.kprobes is None else self.kprobes.arm(request)
        if why is not None:
            self.current = None
            xs.write(ANSWER_KEY, Reach(request.id, ReachState.REFUSED, reason=why).encode())
            return
        self.armed += 1
        self.current, self.reported = request, None

    def _report(self, xs: Any) -> None:
        if self.current is None or self.kprobes is None:
            return
        try:
            hits = self.kprobes.hits()
        except (OSError, ValueError) as exc:
            log.warning("cannot read the kprobe's count: %s", exc)
            return
        if hits is None or hits == self.reported:
            return
        xs.write(ANSWER_KEY, Reach(self.current.id, ReachState.COUNTING, hits=hits).encode())
        self.reported = hits


def count(xs_factory: Callable[[], Any], tracefs: tuple[str, ...] = TRACEFS,
          stop: Callable[[], bool] = lambda: False,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Serve dom0's reach requests until *stop* (forever by default), reconnecting after
    a xenstore error; the number of counters armed."""
    root = find_tracefs(tracefs)
    if root is None:
        log.warning("no tracefs with kprobe_events in %s: every reach request will be "
                    "refused (mount -t tracefs tracefs /sys/kernel/tracing; the kernel "
                    "needs CONFIG_KPROBE_EVENTS)", " or ".join(tracefs))
    counter = Counter(Kprobes(root) if root is not None else None)
    serve_until(xs_factory, counter.serve, stop, sleep)
    return counter.armed
