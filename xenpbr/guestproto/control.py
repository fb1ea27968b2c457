"""Dom0's side of the phase protocol over xenstore: paths, watches, acks, PhaseProtocol.

One concern: the xenstore I/O dom0 does for the protocol. It builds every absolute path
from an integer domid only (:func:`xenpbr.xenstore.client.validate_domid`), never from
guest text; creates ``control/xenpbr`` read-only for the guest (so it can read acks but
never forge one); writes acks, generations and invalidation answers; and names the
watch tokens that route events back to a domain. :class:`PhaseProtocol` ties this to the
admission rules of :mod:`xenpbr.guestproto.gate`: a guest can make dom0 do at most one
xenstore write (its ack) per request, none for a request without a fresh seq, and
refusal acks at most at ``REFUSAL_ACK_RATE`` (the newest held one is written later,
never dropped).

It is separate from the wire format (:mod:`xenpbr.guestproto.wire`, shared with the
guest agent) because it needs dom0's xenstore client and permissions, which the agent
must not load.
"""

from __future__ import annotations

import logging

from xenpbr.errors import XenpbrError
from xenpbr.guestproto import invalidation
from xenpbr.guestproto.resurrection_delivery import CONFIRM_DIR
from xenpbr.guestproto.gate import (
    REFUSAL_ACK_RATE,
    Admission,
    RateLimit,
    RequestGate,
    TokenBucket,
)
from xenpbr.guestproto.wire import (
    ACK_KEY,
    AGENT_KEY,
    CONTROL_DIR,
    DETAIL_KEY,
    GENERATION_KEY,
    HEARTBEAT_KEY,
    MAX_DETAIL,
    PROBLEM_KEY,
    REQUEST_KEY,
    SEQ_LIMIT,
    STATUS_KEY,
    Ack,
    AckMalformed,
    AgentPresence,
    AgentProblem,
    Verdict,
    is_strict_int,
    parse_agent_presence,
    parse_agent_problem,
)
from xenpbr.xenstore.client import Transaction, XenstoreClient
from xenpbr.xenstore.paths import domain_home, validate_domid
from xenpbr.xenstore.permissions import Access, Perm

log = logging.getLogger(__name__)

__all__ = [
    "PhaseProtocol",
    "ack_path",
    "agent_path",
    "control_path",
    "detail_path",
    "domid_from_invalidation_token",
    "domid_from_resurrected_token",
    "domid_from_status_token",
    "domid_from_token",
    "generation_path",
    "heartbeat_path",
    "invalidation_answer_path",
    "invalidation_path",
    "invalidation_watch",
    "last_invalidation_answered",
    "prepare_domain",
    "read_heartbeat",
    "read_request",
    "request_path",
    "request_watch",
    "resurrected_path",
    "resurrected_watch",
    "status_path",
    "status_watch",
    "write_ack",
    "write_generation",
    "write_invalidation_answer",
]


# --------------------------------------------------------------------------------------------
# Paths: built from an integer domid only
# --------------------------------------------------------------------------------------------


def _home(domid: int) -> str:
    return domain_home(validate_domid(domid))


def request_path(domid: int) -> str:
    return f"{_home(domid)}/{REQUEST_KEY}"


def agent_path(domid: int) -> str:
    return f"{_home(domid)}/{AGENT_KEY}"


def problem_path(domid: int) -> str:
    return f"{_home(domid)}/{PROBLEM_KEY}"


def status_path(domid: int) -> str:
    return f"{_home(domid)}/{STATUS_KEY}"


def heartbeat_path(domid: int) -> str:
    return f"{_home(domid)}/{HEARTBEAT_KEY}"


def read_heartbeat(xs: XenstoreClient, domid: int) -> bytes | None:
    """The guest's heartbeat as it wrote it (compared, never parsed), or None."""
    return xs.read_or(heartbeat_path(domid), None)


def control_path(domid: int) -> str:
    return f"{_home(domid)}/{CONTROL_DIR}"


def ack_path(domid: int) -> str:
    return f"{_home(domid)}/{ACK_KEY}"


def detail_path(domid: int) -> str:
    return f"{_home(domid)}/{DETAIL_KEY}"


def generation_path(domid: int) -> str:
    return f"{_home(domid)}/{GENERATION_KEY}"


def invalidation_path(domid: int) -> str:
    """Where the guest writes its invalidation request (:mod:`.invalidation`)."""
    return f"{_home(domid)}/{invalidation.REQUEST_KEY}"


def invalidation_answer_path(domid: int) -> str:
    """Where dom0 answers an invalidation request."""
    return f"{_home(domid)}/{invalidation.ANSWER_KEY}"


def resurrected_path(domid: int) -> str:
    """The guest's directory of resurrection delivery confirmations (one key per app)."""
    return f"{_home(domid)}/{CONFIRM_DIR}"


# --------------------------------------------------------------------------------------------
# Watch tokens: each names its domid, so one handle can watch every domain
# --------------------------------------------------------------------------------------------

_TOKEN_PREFIX = "xenpbr-request-"
_STATUS_TOKEN_PREFIX = "xenpbr-status-"
_INVALIDATION_TOKEN_PREFIX = "xenpbr-invalidate-"
_RESURRECTED_TOKEN_PREFIX = "xenpbr-resurrected-"


def request_watch(domid: int) -> tuple[str, str]:
    """``(path, token)`` for watching a domain's request key; the token names the domid so
    one handle can watch every domain (see :func:`domid_from_token`)."""
    return request_path(domid), f"{_TOKEN_PREFIX}{domid}"


def status_watch(domid: int) -> tuple[str, str]:
    """``(path, token)`` for watching a domain's status key (:data:`STATUS_KEY`)."""
    return status_path(domid), f"{_STATUS_TOKEN_PREFIX}{domid}"


def invalidation_watch(domid: int) -> tuple[str, str]:
    """``(path, token)`` for watching a domain's invalidation key."""
    return invalidation_path(domid), f"{_INVALIDATION_TOKEN_PREFIX}{domid}"


def resurrected_watch(domid: int) -> tuple[str, str]:
    """``(path, token)`` for watching a domain's delivery confirmations (the watch fires
    for every key below the directory)."""
    return resurrected_path(domid), f"{_RESURRECTED_TOKEN_PREFIX}{domid}"


def _domid_after(prefix: str, token: str) -> int | None:
    rest = token[len(prefix):] if token.startswith(prefix) else ""
    return int(rest) if rest.isascii() and rest.isdigit() and len(rest) <= 5 else None


def domid_from_token(token: str) -> int | None:
    """The domid of a :func:`request_watch` token, or None for other tokens."""
    return _domid_after(_TOKEN_PREFIX, token)


def domid_from_status_token(token: str) -> int | None:
    """The domid of a :func:`status_watch` token, or None for other tokens."""
    return _domid_after(_STATUS_TOKEN_PREFIX, token)


def domid_from_invalidation_token(token: str) -> int | None:
    """The domid of an :func:`invalidation_watch` token, or None for other tokens."""
    return _domid_after(_INVALIDATION_TOKEN_PREFIX, token)


def domid_from_resurrected_token(token: str) -> int | None:
    """The domid of a :func:`resurrected_watch` token, or None for other tokens."""
    return _domid_after(_RESURRECTED_TOKEN_PREFIX, token)


# --------------------------------------------------------------------------------------------
# Reads and writes
# --------------------------------------------------------------------------------------------


def prepare_domain(xs: XenstoreClient, domid: int, generation: int | None = None) -> None:
    """Create ``control/xenpbr`` for ``domid``: owned by dom0, read-only for the guest
    (``n0 r<domid>``), so the guest can read acks but never forge one. With
    ``generation``, also (re)write ``control/xenpbr/generation``. Idempotent; run at
    registration and after every restore (a restored domain has a new home)."""
    def work(t: Transaction) -> None:
        _prepare(t, domid)
        if generation is not None:
            _write_dom0_key(t, domid, generation_path(domid), str(_check_gen(generation)))

    xs.run_transaction(work)
    log.info("domain %d: %s prepared (n0 r%d)", domid, control_path(domid), domid)


def _prepare(t: Transaction, domid: int) -> None:
    t.mkdir(control_path(domid))
    t.set_perms(control_path(domid), owner=0, others=Access.NONE,
                acl=[Perm(domid, Access.READ)])


def _check_gen(generation: int) -> int:
    if not is_strict_int(generation) or not 0 <= generation < SEQ_LIMIT:
        raise ValueError(f"generation must be an integer in 0..{SEQ_LIMIT - 1}")
    return generation


def _write_dom0_key(t: Transaction, domid: int, path: str, value: str | bytes) -> None:
    """Write a key below control/xenpbr and pin its perms (children inherit the parent's,
    but a key left over from an earlier owner must not keep other perms)."""
    t.write(path, value)
    t.set_perms(path, owner=0, others=Access.NONE, acl=[Perm(domid, Access.READ)])


def read_request(xs: XenstoreClient, domid: int) -> bytes | None:
    """The guest's request bytes, or None if it has written none."""
    return xs.read_or(request_path(domid), None)


def read_agent_notes(xs: XenstoreClient, domid: int
                     ) -> tuple[AgentPresence | None, AgentProblem | None]:
    """What this boot's agent said about itself: its presence (it ran and spoke) and its
    problem (why it marks no boundary); each None if absent or malformed (guest text,
    informational only)."""
    return (parse_agent_presence(xs.read_or(agent_path(domid), None)),
            parse_agent_problem(xs.read_or(problem_path(domid), None)))


def write_ack(xs: XenstoreClient, domid: int, ack: Ack) -> None:
    xs.run_transaction(lambda t: _write_dom0_key(t, domid, ack_path(domid), ack.encode()))
    log.info("domain %d: ack %s", domid, ack.encode())


def write_generation(xs: XenstoreClient, domid: int, generation: int) -> None:
    xs.run_transaction(lambda t: _write_dom0_key(t, domid, generation_path(domid),
                                                 str(_check_gen(generation))))


def last_invalidation_answered(xs: XenstoreClient, domid: int) -> int:
    """The seq dom0 answered last for ``domid``'s invalidation requests (0 if none):
    requests up to it are replays. Kept in xenstore, which only dom0 can write, so it
    survives a restart."""
    answer = invalidation.parse_answer(xs.read_or(invalidation_answer_path(domid), None))
    return answer.seq if answer is not None else 0


def write_invalidation_answer(xs: XenstoreClient, domid: int, answer: invalidation.Answer) -> None:
    xs.run_transaction(lambda t: _write_dom0_key(t, domid, invalidation_answer_path(domid),
                                                 answer.encode()))


# --------------------------------------------------------------------------------------------
# Dom0's end of the protocol
# --------------------------------------------------------------------------------------------


class PhaseProtocol:
    """Dom0's end of the protocol over a xenstore client: look at a domain's request
    (refusals are acked here), answer accepted ones, announce restores.

    The phase controller owns the decisions (capture, skip, out-of-order, hazards...);
    this class owns the wire format, the bounds and the bookkeeping. Typical loop::

        proto = PhaseProtocol(xs)
        proto.register(domid)
        path, token = request_watch(domid); xs.watch(path, token)
        ...on an event for token: adm = proto.poll(domid_from_token(ev.token))
        if adm.outcome is Outcome.ACCEPTED:
            proto.answer(domid, adm.request.seq, controller.decide(adm.request))
    """

    def __init__(self, xs: XenstoreClient, gate: RequestGate | None = None,
                 ack_rate: RateLimit | None = None) -> None:
        self.xs = xs
        self.gate = gate or RequestGate()
        self._ack_rate = ack_rate or REFUSAL_ACK_RATE
        self._ack_buckets: dict[int, TokenBucket] = {}
        self._held: dict[int, Ack] = {}  # domid -> newest refusal ack over its budget

    def register(self, domid: int, generation: int = 0) -> None:
        """A domain starts a fresh boot under xenpbr: prepare its control dir and forget any
        state a previous domain with this id left."""
        self._drop(domid)
        prepare_domain(self.xs, domid, generation)

    def poll(self, domid: int) -> Admission:
        """Read and judge ``domid``'s request; a refusal with a fresh seq is acked before
        returning, or, past the domain's refusal-ack budget, held and written by
        :meth:`flush_held` (a newer refusal replaces a held one: the ack holds one
        answer, the newest; the seqs it skips were superseded by their own guest)."""
        admission = self.gate.admit(domid, read_request(self.xs, domid))
        if admission.ack is not None:
            self._held[domid] = admission.ack
            self._write_held(domid)
        return admission

    def _write_held(self, domid: int) -> bool:
        """Write ``domid``'s held refusal ack if its budget allows; True if none is left."""
        bucket = self._ack_buckets.get(domid)
        if bucket is None:
            bucket = self._ack_buckets[domid] = TokenBucket(self._ack_rate, self.gate.clock)
        if not bucket.take():
            return False
        write_ack(self.xs, domid, self._held.pop(domid))
        return True

    def flush_held(self) -> bool:
        """Write the held refusal acks whose budget refilled; True if some are still held
        (the caller comes back soon: a fresh seq is always answered eventually)."""
        for domid in list(self._held):
            try:
                self._write_held(domid)
            except XenpbrError as exc:  # the domain went away meanwhile
                log.debug("domain %d: held ack not written: %s", domid, exc)
                self._held.pop(domid, None)
        return bool(self._held)

    def has_held(self) -> bool:
        """True while some refusal ack waits for its domain's budget."""
        return bool(self._held)

    def _drop(self, domid: int) -> None:
        self.gate.forget(domid)
        self._held.pop(domid, None)
        self._ack_buckets.pop(domid, None)

    def answer(self, domid: int, seq: int, verdict: Verdict, detail: str = "") -> None:
        """Ack an accepted request with the controller's verdict; ``detail`` (why it was
        refused, ASCII, cut to MAX_DETAIL) goes to ``control/xenpbr/detail`` in the same
        transaction, so the guest never reads one ack with another's explanation."""
        ack = Ack(seq, verdict)
        text = detail.encode("ascii", "replace")[:MAX_DETAIL]

        def work(t: Transaction) -> None:
            _write_dom0_key(t, domid, detail_path(domid), text)
            _write_dom0_key(t, domid, ack_path(domid), ack.encode())

        held = self._held.get(domid)
        if held is not None and held.seq < seq:
            self._held.pop(domid)  # superseded by this answer
        try:
            self.xs.run_transaction(work)
        finally:  # answered or not, the domain's next request must not be refused as busy
            self.gate.answered(domid, seq)
        log.info("domain %d: ack %s%s", domid, ack.encode(), f" ({detail})" if detail else "")

    def restored(self, domid: int, seq: int, generation: int) -> None:
        """``domid`` was restored from an image whose agent waits for ``seq``: prepare the
        new home, write the generation and ``<seq> restored:<generation>`` atomically."""
        ack = Ack(seq, Verdict.restored(generation))

        def work(t: Transaction) -> None:
            _prepare(t, domid)
            _write_dom0_key(t, domid, generation_path(domid), str(_check_gen(generation)))
            _write_dom0_key(t, domid, ack_path(domid), ack.encode())

        self.xs.run_transaction(work)
        self._drop(domid)
        self.gate.restored(domid, seq)
        log.info("domain %d: ack %s (restored)", domid, ack.encode())

    def adopt(self, domid: int) -> bool:
        """Take over a domain whose control dir already holds an ack (xenpbrd restarted,
        or another process restored it): the ack is the durable record of the last answer
        (only dom0 can write it), so requests up to its seq are replays. False if there
        is no readable ack (then :meth:`register` the domain as a fresh boot)."""
        raw = self.xs.read_or(ack_path(domid), None)
        try:
            ack = Ack.parse(raw) if raw is not None else None
        except AckMalformed:
            ack = None
        if ack is None:
            return False
        self._drop(domid)
        self.gate.restored(domid, ack.seq)
        return True

    def forget(self, domid: int) -> None:
        self._drop(domid)
