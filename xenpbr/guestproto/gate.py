"""Admission of guest requests: rate limits, sequence tracking, refusal counting.

One concern: deciding, without any I/O, whether a look at a domain's request lets it
through to the phase controller (:class:`RequestGate`), and budgeting how often a guest
can make dom0 act (:class:`RateLimit`, :class:`TokenBucket`, :data:`REFUSAL_ACK_RATE`).
At most ``RateLimit.requests`` well-formed requests per ``RateLimit.per_seconds`` get
past the gate (token bucket, injectable clock), and a flood of refusals is logged, not
turned into one log line per write.

It is separate from the wire format (the agent never needs it) and from dom0's xenstore
I/O (:mod:`xenpbr.guestproto.control` reads the request and writes the ack), so the
same budgets serve boundary requests and invalidation alike and tests drive time by hand.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xenpbr.guestproto.request import parse_request
from xenpbr.guestproto.wire import (
    SEQ_LIMIT,
    Ack,
    BoundaryRequest,
    RequestRefused,
    Verdict,
    is_strict_int,
)

log = logging.getLogger(__name__)

__all__ = ["REFUSAL_ACK_RATE", "Admission", "Outcome", "RateLimit", "RequestGate",
           "TokenBucket"]


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` requests per ``per_seconds`` per domain (burst = ``requests``)."""

    requests: int = 8
    per_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.requests < 1 or not (self.per_seconds > 0 and math.isfinite(self.per_seconds)):
            raise ValueError(f"bad rate limit {self.requests}/{self.per_seconds}s")


#: Refusal acks written per domain: burst 10, then 2 a second. Past it the newest refusal
#: is held and written when a token comes (``control.PhaseProtocol.flush_held``), so a
#: flooding guest costs dom0 at most two ack transactions a second.
REFUSAL_ACK_RATE = RateLimit(10, 5.0)


class TokenBucket:
    """A token bucket on an injectable monotonic clock (tests drive time by hand)."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._tokens = float(limit.requests)
        self._last = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self._clock()
        elapsed = max(0.0, now - self._last)  # a clock that steps back refills nothing
        self._last = now
        rate = self._limit.requests / self._limit.per_seconds
        self._tokens = min(float(self._limit.requests), self._tokens + elapsed * rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Outcome(enum.Enum):
    ACCEPTED = "accepted"    #: valid, fresh: the phase controller decides and answers
    REFUSED = "refused"      #: refused and counted (acked by poll() if ``Admission.ack``)
    DUPLICATE = "duplicate"  #: the same bytes as the request just handled: nothing to do
    ABSENT = "absent"        #: no request key (yet)


@dataclass(frozen=True)
class Admission:
    """What :meth:`RequestGate.admit` made of one look at a domain's request."""

    outcome: Outcome
    request: BoundaryRequest | None = None
    refusal: RequestRefused | None = None
    #: The ack to write for a refusal: only when the request carries a fresh seq.
    ack: Ack | None = None


@dataclass
class _DomainState:
    bucket: TokenBucket
    last_seq: int = 0
    last_digest: bytes | None = None
    pending: int | None = None
    accepted: int = 0
    duplicates: int = 0
    refusals: collections.Counter = field(default_factory=collections.Counter)


def _log_refusal(domid: int, refusal: RequestRefused, fresh: bool, count: int) -> None:
    """Log a refusal: the first ten of a reason per domain, then every hundredth (a flood
    must not turn each of its writes into a log line of dom0's)."""
    if count > 10 and count % 100:
        return
    log.warning("domain %d: boundary request refused: %s (%s)%s%s", domid, refusal.reason,
                refusal.detail, "" if fresh else ", not acked",
                f" [{count} so far; logged every 100th]" if count > 10 else "")


class RequestGate:
    """Per-domain admission of requests: duplicates, rate, validation, seq, one at a time.

    Pure logic: the caller reads the request and writes the ack (``control.PhaseProtocol``
    does both). For each look at a domain's request bytes, the first that applies:

    1. the same bytes as the last request handled for this domain -> ``DUPLICATE`` (a
       watch fires more than once per write: on registration, after a daemon restart);
    2. :func:`parse_request` -> ``refused:bad-request:<field>`` / ``unknown-phase`` (the
       guest learns what was wrong, even right after a flood: no token is spent);
    3. ``seq`` not above every seq seen before -> ``refused:stale-seq``;
    4. no token left in the domain's bucket -> ``refused:rate-limited`` (the bucket
       bounds what reaches the phase controller, whose work is the expensive part);
    5. an accepted request not yet answered -> ``refused:busy``;
    6. otherwise ``ACCEPTED``: the caller must answer it (:meth:`answered`).

    Every request whose seq can be read advances the domain's last seq, whatever its
    verdict, so seqs are never reused within a boot. A refusal is acked only if the
    request carries a *fresh* seq (readable and above every seq seen before): a request
    whose seq cannot be read, or is stale, has no answer of its own, and acking it would
    overwrite the answer to the newest real request. Those are refused, counted and
    logged only.
    """

    def __init__(self, rate: RateLimit | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate or RateLimit()
        self._clock = clock
        self.clock = clock  # shared with PhaseProtocol's ack budget (tests drive both)
        self._domains: dict[int, _DomainState] = {}

    def _state(self, domid: int) -> _DomainState:
        if domid not in self._domains:
            self._domains[domid] = _DomainState(TokenBucket(self._rate, self._clock))
        return self._domains[domid]

    def admit(self, domid: int, raw: bytes | None) -> Admission:
        state = self._state(domid)
        if raw is None:
            return Admission(Outcome.ABSENT)
        data = bytes(raw)  # xenstore values are at most 4 KiB
        digest = hashlib.sha256(data).digest()
        if digest == state.last_digest:
            state.duplicates += 1
            log.debug("domain %d: request unchanged since last look, ignored", domid)
            return Admission(Outcome.DUPLICATE)
        state.last_digest = digest
        refusal: RequestRefused | None = None
        request: BoundaryRequest | None = None
        try:
            request = parse_request(data)
        except RequestRefused as exc:
            refusal = exc
        seq = request.seq if request is not None else refusal.seq  # type: ignore[union-attr]
        if refusal is not None:
            pass  # its own reason: a bad request never reaches the controller, so it
            # spends no token (its cost is bounded by the daemon's read and ack budgets)
        elif seq is not None and seq <= state.last_seq:
            refusal = RequestRefused("stale-seq", f"seq {seq} is not above {state.last_seq}",
                                     seq)
        elif not state.bucket.take():
            refusal = RequestRefused("rate-limited", f"more than {self._rate.requests} "
                                     f"requests in {self._rate.per_seconds:g} s", seq)
        elif state.pending is not None:
            refusal = RequestRefused("busy", f"request {state.pending} is still being "
                                     "answered", seq)
        fresh = seq is not None and seq > state.last_seq
        if fresh:
            state.last_seq = seq  # type: ignore[assignment]
        if refusal is not None:
            state.refusals[refusal.reason] += 1
            _log_refusal(domid, refusal, fresh, state.refusals[refusal.reason])
            ack = Ack(seq, Verdict.refused(refusal.reason)) if fresh else None  # type: ignore
            return Admission(Outcome.REFUSED, refusal=refusal, ack=ack)
        assert request is not None
        state.pending = request.seq
        state.accepted += 1
        log.info("domain %d: boundary request %d accepted: phase %s of %s", domid, request.seq,
                 request.phase, ",".join(request.phases))
        return Admission(Outcome.ACCEPTED, request=request)

    def answered(self, domid: int, seq: int) -> None:
        """The accepted request ``seq`` has been answered: the next one may come."""
        state = self._state(domid)
        if state.pending == seq:
            state.pending = None
        state.last_seq = max(state.last_seq, seq)

    def restored(self, domid: int, seq: int) -> None:
        """``domid`` was restored from an image whose agent waits for ``seq`` (answered
        ``restored:<g>``): start its bookkeeping there, with a full bucket."""
        self._domains.pop(domid, None)
        self._state(domid).last_seq = seq

    def forget(self, domid: int) -> None:
        """Drop a domain's state (it was destroyed, or rebooted normally: a new boot
        starts its seqs again at 1)."""
        self._domains.pop(domid, None)

    def refusal_counts(self, domid: int | None = None) -> dict[str, int]:
        """Refusals per reason, for one domain or (``None``) summed over all."""
        states = [self._domains[domid]] if domid in self._domains else (
            [] if domid is not None else list(self._domains.values()))
        total: collections.Counter = collections.Counter()
        for state in states:
            total.update(state.refusals)
        return dict(total)

    def stats(self, domid: int) -> dict[str, Any]:
        """One domain's counters and seq state (for ``xenpbr status --json``)."""
        state = self._state(domid)
        return {"last_seq": state.last_seq, "pending": state.pending,
                "accepted": state.accepted, "duplicates": state.duplicates,
                "refused": sum(state.refusals.values()), "refusals": dict(state.refusals)}

    def export_state(self, domid: int) -> dict[str, Any]:
        """What the daemon persists across its own restart (seq memory; the bucket and
        counters start afresh)."""
        state = self._state(domid)
        return {"last_seq": state.last_seq, "pending": state.pending,
                "last_digest": state.last_digest.hex() if state.last_digest else None}

    def import_state(self, domid: int, saved: Mapping[str, Any]) -> None:
        """Load what :meth:`export_state` gave; a malformed record raises ValueError."""
        last_seq, pending, digest = saved["last_seq"], saved["pending"], saved["last_digest"]
        if not (is_strict_int(last_seq) and 0 <= last_seq < SEQ_LIMIT):
            raise ValueError(f"bad last_seq {last_seq!r}")
        if pending is not None and not (is_strict_int(pending) and 0 < pending < SEQ_LIMIT):
            raise ValueError(f"bad pending {pending!r}")
        state = self._state(domid)
        state.last_seq, state.pending = last_seq, pending
        state.last_digest = bytes.fromhex(digest) if digest else None
