"""The guest <-> dom0 phase protocol, dom0 side (contract: ``docs/phase-protocol.md``).

Everything a guest writes is untrusted. This module turns the bytes of a guest's
``data/xenpbr/request`` into a validated :class:`BoundaryRequest` or a typed
:class:`RequestRefused` carrying a reason token from a fixed list, tracks sequence numbers
and request rates per domain, counts refusals, and writes dom0's answers
(``control/xenpbr/ack``, ``control/xenpbr/generation``).

Rules that keep dom0 safe, whatever the guest writes:

* the parser reads at most :data:`MAX_REQUEST_BYTES`, checks nesting depth before
  ``json.loads`` runs, rejects NaN/Infinity, duplicate keys, unknown keys, floats and
  bools where integers are expected, and bounds every list and string; it raises nothing
  but :class:`RequestRefused` for bad input;
* xenstore paths are built only from an integer domid (:func:`xenpbr.xenstore.client.
  validate_domid`), never from guest text; guest text reaches logs only through
  :func:`ascii` and truncated;
* a guest can make dom0 do at most one xenstore write (its ack) per request, none for a
  request without a fresh seq, and refusal acks at most at :data:`REFUSAL_ACK_RATE`
  (the newest held one is written later, never dropped); at most ``RateLimit.requests``
  well-formed requests per ``RateLimit.per_seconds`` get past the gate to the phase
  controller (token bucket, injectable clock); parsing itself is linear in at most 1900
  bytes.

The guest agent (``guest-agent/xenpbr_agent``) imports this module too, for the key names,
:func:`encode_request` and :meth:`Ack.parse`: one implementation of the wire format.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xenpbr.errors import XenpbrError
from xenpbr.xenstore.paths import domain_home, validate_domid
from xenpbr.xenstore.permissions import Access, Perm

log = logging.getLogger(__name__)

__all__ = [
    "ACK_KEY",
    "AGENT_KEY",
    "STATUS_KEY",
    "GuestStatus",
    "parse_guest_status",
    "status_watch",
    "domid_from_status_token",
    "CONTROL_DIR",
    "GENERATION_KEY",
    "DETAIL_KEY",
    "MAX_DETAIL",
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "REFUSAL_REASONS",
    "REQUEST_KEY",
    "Ack",
    "AckMalformed",
    "Admission",
    "AgentPresence",
    "BoundaryRequest",
    "DiskState",
    "Outcome",
    "PhaseProtocol",
    "ProtocolError",
    "RateLimit",
    "REFUSAL_ACK_RATE",
    "RequestGate",
    "RequestRefused",
    "TokenBucket",
    "Verdict",
    "VerdictKind",
    "ack_path",
    "agent_path",
    "control_path",
    "domid_from_token",
    "encode_request",
    "generation_path",
    "parse_agent_presence",
    "parse_request",
    "prepare_domain",
    "read_request",
    "request_path",
    "request_watch",
    "write_ack",
    "write_generation",
]

PROTOCOL_VERSION = 1

# -- keys, relative to a domain's home /local/domain/<domid> ---------------------------------
REQUEST_KEY = "data/xenpbr/request"
AGENT_KEY = "data/xenpbr/agent"
#: ``acked <generation>`` when a restored agent has read its ack, then ``ready
#: <generation>`` (or ``steps-failed <generation>``) when its after-restore steps ran:
#: the guest_ack and service_ready marks of the recovery timeline.
STATUS_KEY = "data/xenpbr/status"
CONTROL_DIR = "control/xenpbr"
ACK_KEY = f"{CONTROL_DIR}/ack"
GENERATION_KEY = f"{CONTROL_DIR}/generation"
#: Why the newest request was refused, for people (the ack carries only a reason token).
DETAIL_KEY = f"{CONTROL_DIR}/detail"
MAX_DETAIL = 512

# -- bounds (docs/phase-protocol.md, "Request") --------------------------------------------
#: Fits xenstored's default node quota for an unprivileged domain (2048 bytes *including*
#: the node's header and permissions). Measured on the lab's 4.17 xenstored: a guest may
#: write a 1900-byte value, not a 2048-byte one (tests/lab/test_protocol_real.py).
MAX_REQUEST_BYTES = 1900
#: object -> "disks" list -> disk object: deeper input is refused before json.loads runs.
MAX_DEPTH = 3
SEQ_LIMIT = 2**31
MAX_PHASES = 8
MAX_DISKS = 16
MAX_SERVICES = 64
MAX_HAZARDS = 16
MAX_WAIT_SECONDS = 86400
#: json.loads turns longer digit strings into this marker instead of converting them
#: (int() of thousands of digits is wasted work; no field needs more than 10 digits).
_MAX_INT_DIGITS = 20

PHASE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
IDENTITY = re.compile(r"[A-Za-z0-9._:+-]{1,64}")
DEVICE = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # xvda1, dm-0, nvme0n1p1
#: Mount points as /proc/mounts prints them (space, tab, newline, backslash octal-escaped).
MOUNT = re.compile(r"/[!-~]{0,127}")
SERVICE = re.compile(r"[A-Za-z0-9@._:+-]{1,128}")
HAZARD = re.compile(r"[ -~]{1,128}")

FIELDS = ("v", "seq", "phase", "phases", "identity", "wait", "disks", "services", "hazards")
_DISK_FIELDS = frozenset({"dev", "mount", "rw"})
#: Optional disk keys: ``frozen`` (the agent froze this file system for the boundary).
_DISK_OPTIONAL = frozenset({"frozen"})

#: ``bad-request:<field>`` suffixes, in the order the parser checks them.
BAD_REQUEST_FIELDS = ("size", "encoding", "json", "not-object", "duplicate-key",
                      "unknown-key") + FIELDS
#: Reasons dom0 gives for a well-formed request.
DECISION_REASONS = ("stale-seq", "unknown-phase", "out-of-order", "rate-limited", "busy",
                    "hazard", "persistent-disk-rw", "snapshot-not-frozen", "quota",
                    "capture-failed", "snapshot-failed", "disabled")
REFUSAL_REASONS = frozenset([f"bad-request:{f}" for f in BAD_REQUEST_FIELDS]
                            + list(DECISION_REASONS))
#: What an agent accepts as a reason: a newer dom0 may add tokens.
_REASON_TOKEN = re.compile(r"[a-z0-9][a-z0-9:_-]{0,63}")


def _show(value: Any, limit: int = 60) -> str:
    """Guest text for a log line: ASCII-escaped (no control or bidi characters reach a
    terminal) and truncated."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ProtocolError(XenpbrError):
    """Something in the phase protocol went wrong."""


class RequestRefused(ProtocolError):
    """A guest's request is not acceptable.

    ``reason`` is the token dom0 puts in the ack (``refused:<reason>``), one of
    :data:`REFUSAL_REASONS`; ``detail`` is for dom0's log (guest text in it is escaped and
    truncated); ``seq`` is the request's sequence number when it could be read, so the ack
    can name it (otherwise the ack carries seq 0).
    """

    def __init__(self, reason: str, detail: str = "", seq: int | None = None) -> None:
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"{reason!r} is not a refusal reason of the phase protocol "
                             f"(docs/phase-protocol.md): one of {sorted(REFUSAL_REASONS)}")
        self.reason = reason
        self.detail = detail
        self.seq = seq
        super().__init__(f"boundary request refused: {reason}" + (f" ({detail})" if detail else ""))


class AckMalformed(ProtocolError):
    """``control/xenpbr/ack`` (or a verdict) does not follow the contract."""


class _BadInput(Exception):
    """Internal: ``json.loads`` hooks raise this; turned into :class:`RequestRefused`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskState:
    """A block device mounted in the guest: the guest's device name (``xvda1``), where it
    is mounted (as ``/proc/mounts`` shows it), whether read-write, and whether the agent
    froze it (``FIFREEZE``) for this boundary, so a disk snapshot taken now is clean."""

    dev: str
    mount: str
    rw: bool
    frozen: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"dev": self.dev, "mount": self.mount, "rw": self.rw}
        if self.frozen:
            doc["frozen"] = True
        return doc


@dataclass(frozen=True)
class BoundaryRequest:
    """One validated boundary request (``data/xenpbr/request``)."""

    seq: int
    phase: str
    phases: tuple[str, ...]
    identity: str
    wait: int
    disks: tuple[DiskState, ...] = ()
    services: tuple[str, ...] = ()
    hazards: tuple[str, ...] = ()
    v: int = PROTOCOL_VERSION

    @property
    def phase_index(self) -> int:
        """Position of :attr:`phase` in :attr:`phases` (0-based)."""
        return self.phases.index(self.phase)

    @property
    def is_last_phase(self) -> bool:
        return self.phase == self.phases[-1]

    def to_json(self) -> dict[str, Any]:
        return {"v": self.v, "seq": self.seq, "phase": self.phase, "phases": list(self.phases),
                "identity": self.identity, "wait": self.wait,
                "disks": [d.to_json() for d in self.disks], "services": list(self.services),
                "hazards": list(self.hazards)}


def encode_request(request: BoundaryRequest) -> bytes:
    """The bytes an agent writes for ``request``; checked with :func:`parse_request` so an
    agent finds its own mistakes (e.g. too many services) before dom0 refuses them."""
    raw = json.dumps(request.to_json(), separators=(",", ":"), ensure_ascii=True).encode()
    parse_request(raw)
    return raw


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _BadInput("duplicate-key", f"a JSON object repeats a key among {_show(keys)}")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise _BadInput("json", f"{name} is not JSON")


class _HugeInt:
    """Stands for an integer literal too long to be any field's value."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | _HugeInt:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        return _HugeInt(len(text))
    return int(text)


def _nesting_ok(text: str, limit: int = MAX_DEPTH) -> bool:
    """True if arrays/objects nest at most ``limit`` deep (brackets inside strings don't
    count). Runs before ``json.loads`` so a ``[[[[...`` bomb costs one linear scan."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _decode_json(raw: bytes) -> Any:
    if len(raw) > MAX_REQUEST_BYTES:
        raise _BadInput("size", f"{len(raw)} bytes, at most {MAX_REQUEST_BYTES} are read")
    try:
        text = raw.decode("utf-8")  # strict; json.loads(bytes) would also guess UTF-16/32
    except UnicodeDecodeError as exc:
        raise _BadInput("encoding", f"not UTF-8 at byte {exc.start}") from None
    if not _nesting_ok(text):
        raise _BadInput("json", f"arrays/objects nest deeper than {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_pairs_without_duplicates,
                          parse_constant=_reject_constant, parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _BadInput("json", f"not JSON: {_show(str(exc), 80)}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seq_of(doc: Any) -> int | None:
    """The request's seq if it is valid, whatever else is wrong (so the ack can name it)."""
    if isinstance(doc, dict):
        seq = doc.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq < SEQ_LIMIT:
            return seq
    return None


def _need(doc: dict[str, Any], name: str) -> Any:
    if name not in doc:
        raise _BadInput(name, f"{name!r} is missing")
    return doc[name]


def _int_field(doc: dict[str, Any], name: str, low: int, high: int) -> int:
    value = _need(doc, name)
    if not _is_int(value) or not low <= value <= high:
        raise _BadInput(name, f"{name!r} must be an integer in {low}..{high}, got {_show(value)}")
    return value


def _name(value: Any, pattern: re.Pattern[str], field_name: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _BadInput(field_name, f"{field_name!r} must match {pattern.pattern!r}, "
                                    f"got {_show(value)}")
    return value


def _list_field(doc: dict[str, Any], name: str, most: int, least: int = 0) -> list[Any]:
    value = _need(doc, name)
    if not isinstance(value, list):
        raise _BadInput(name, f"{name!r} must be a list, got {type(value).__name__}")
    if not least <= len(value) <= most:
        raise _BadInput(name, f"{name!r} must hold {least}..{most} items, got {len(value)}")
    return value


def _phases(doc: dict[str, Any]) -> tuple[str, ...]:
    names = tuple(_name(p, PHASE_NAME, "phases")
                  for p in _list_field(doc, "phases", MAX_PHASES, least=1))
    if len(set(names)) != len(names):
        raise _BadInput("phases", f"'phases' repeats a name: {_show(names)}")
    return names


def _disk(value: Any) -> DiskState:
    if not isinstance(value, dict) or not _DISK_FIELDS <= set(value) <= (
            _DISK_FIELDS | _DISK_OPTIONAL):
        raise _BadInput("disks", "each disk must be an object with 'dev', 'mount', 'rw' and "
                                 f"optionally 'frozen', got {_show(value)}")
    for flag in ("rw", "frozen"):
        if not isinstance(value.get(flag, False), bool):
            raise _BadInput("disks", f"a disk's {flag!r} must be true or false, got "
                                     f"{_show(value[flag])}")
    return DiskState(_name(value["dev"], DEVICE, "disks"), _name(value["mount"], MOUNT, "disks"),
                     value["rw"], value.get("frozen", False))


def _build(doc: Any) -> BoundaryRequest:
    if not isinstance(doc, dict):
        raise _BadInput("not-object", f"the request must be a JSON object, got "
                                      f"{type(doc).__name__}")
    unknown = set(doc) - set(FIELDS)
    if unknown:
        raise _BadInput("unknown-key", f"unknown keys {_show(sorted(unknown))}")
    v = _int_field(doc, "v", PROTOCOL_VERSION, PROTOCOL_VERSION)
    seq = _int_field(doc, "seq", 1, SEQ_LIMIT - 1)
    phase = _name(_need(doc, "phase"), PHASE_NAME, "phase")
    phases = _phases(doc)
    identity = _name(_need(doc, "identity"), IDENTITY, "identity")
    wait = _int_field(doc, "wait", 1, MAX_WAIT_SECONDS)
    disks = tuple(_disk(d) for d in _list_field(doc, "disks", MAX_DISKS))
    services = tuple(_name(s, SERVICE, "services")
                     for s in _list_field(doc, "services", MAX_SERVICES))
    hazards = tuple(_name(h, HAZARD, "hazards") for h in _list_field(doc, "hazards", MAX_HAZARDS))
    if phase not in phases:
        raise RequestRefused("unknown-phase", f"phase {phase!r} is not in {list(phases)}", seq)
    return BoundaryRequest(seq, phase, phases, identity, wait, disks, services, hazards, v)


def parse_request(raw: bytes | bytearray | memoryview) -> BoundaryRequest:
    """Validate a guest's request bytes.

    Returns a :class:`BoundaryRequest` or raises :class:`RequestRefused`; for any input
    bytes, never anything else (a bug in this parser is logged and reported as
    ``bad-request:json`` rather than taking dom0 down)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_request takes the bytes read from xenstore, got "
                        f"{type(raw).__name__}")
    data = bytes(raw)
    doc: Any = None
    try:
        doc = _decode_json(data)
        return _build(doc)
    except _BadInput as exc:
        raise RequestRefused(f"bad-request:{exc.reason}", exc.detail, _seq_of(doc)) from None
    except RequestRefused:
        raise
    except Exception:  # pragma: no cover - a parser bug must not crash dom0
        log.exception("phase-protocol parser bug on a %d-byte request; refusing it",
                      len(data))
        raise RequestRefused("bad-request:json", "internal parser error", None) from None


# --------------------------------------------------------------------------------------------
# Verdicts and acks
# --------------------------------------------------------------------------------------------


class VerdictKind(str, enum.Enum):
    CAPTURED = "captured"
    SKIPPED = "skipped"
    REFUSED = "refused"
    RESTORED = "restored"


@dataclass(frozen=True)
class Verdict:
    """Dom0's answer to one request: ``captured``, ``skipped``, ``refused:<reason>`` or
    ``restored:<generation>`` (``str()`` gives the wire form)."""

    kind: VerdictKind
    reason: str | None = None
    generation: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", VerdictKind(self.kind))
        if (self.kind is VerdictKind.REFUSED) != (self.reason is not None):
            raise ValueError("a reason goes with, and only with, a 'refused' verdict")
        if self.reason is not None and not _REASON_TOKEN.fullmatch(self.reason):
            raise ValueError(f"malformed refusal reason {self.reason!r}")
        if (self.kind is VerdictKind.RESTORED) != (self.generation is not None):
            raise ValueError("a generation goes with, and only with, a 'restored' verdict")
        gen = self.generation
        if gen is not None and not (_is_int(gen) and 0 <= gen < SEQ_LIMIT):
            raise ValueError(f"generation must be an integer in 0..{SEQ_LIMIT - 1}")

    @classmethod
    def captured(cls) -> Verdict:
        return cls(VerdictKind.CAPTURED)

    @classmethod
    def skipped(cls) -> Verdict:
        return cls(VerdictKind.SKIPPED)

    @classmethod
    def refused(cls, reason: str) -> Verdict:
        """Dom0 side: ``reason`` must be one of :data:`REFUSAL_REASONS`."""
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"{reason!r} is not one of {sorted(REFUSAL_REASONS)}")
        return cls(VerdictKind.REFUSED, reason=reason)

    @classmethod
    def restored(cls, generation: int) -> Verdict:
        return cls(VerdictKind.RESTORED, generation=generation)

    @classmethod
    def parse(cls, text: str) -> Verdict:
        """Agent side: parse a verdict; unknown refusal tokens are accepted (a newer dom0
        may add reasons), anything else raises :class:`AckMalformed`."""
        kind, sep, arg = text.partition(":")
        try:
            if kind in ("captured", "skipped") and not sep:
                return cls(VerdictKind(kind))
            if kind == "refused" and sep:
                return cls(VerdictKind.REFUSED, reason=arg)
            if kind == "restored" and sep and arg.isascii() and arg.isdigit() and len(arg) <= 10:
                return cls(VerdictKind.RESTORED, generation=int(arg))
        except ValueError:
            pass
        raise AckMalformed(f"not a phase-protocol verdict: {_show(text)}")

    @property
    def ok(self) -> bool:
        """True unless refused: the boundary is in an image (or was restored from one)."""
        return self.kind is not VerdictKind.REFUSED

    def __str__(self) -> str:
        if self.kind is VerdictKind.REFUSED:
            return f"refused:{self.reason}"
        if self.kind is VerdictKind.RESTORED:
            return f"restored:{self.generation}"
        return self.kind.value


_ACK = re.compile(r"(0|[1-9][0-9]{0,9}) (\S{1,80})")


@dataclass(frozen=True)
class Ack:
    """``control/xenpbr/ack``: ``"<seq> <verdict>"``; seq 0 answers a request whose seq
    could not be read."""

    seq: int
    verdict: Verdict

    def __post_init__(self) -> None:
        if not _is_int(self.seq) or not 0 <= self.seq < SEQ_LIMIT:
            raise ValueError(f"ack seq must be an integer in 0..{SEQ_LIMIT - 1}, got {self.seq!r}")

    def encode(self) -> str:
        return f"{self.seq} {self.verdict}"

    @classmethod
    def parse(cls, raw: bytes | str) -> Ack:
        """Parse an ack as read from xenstore; :class:`AckMalformed` if it is not one."""
        try:
            text = raw.decode("ascii") if isinstance(raw, (bytes, bytearray)) else raw
        except UnicodeDecodeError:
            raise AckMalformed(f"ack is not ASCII: {_show(raw)}") from None
        match = _ACK.fullmatch(text)
        if not match or int(match.group(1)) >= SEQ_LIMIT:
            raise AckMalformed(f"ack must be '<seq> <verdict>', got {_show(text)}")
        return cls(int(match.group(1)), Verdict.parse(match.group(2)))


@dataclass(frozen=True)
class AgentPresence:
    """``data/xenpbr/agent``: the agent's version and pid (written when it runs)."""

    version: str
    pid: int


_PRESENCE = re.compile(r"([0-9][0-9A-Za-z.+-]{0,31}) ([1-9][0-9]{0,9})")


def parse_agent_presence(raw: bytes | None) -> AgentPresence | None:
    """The agent's presence note, or None if absent or not well-formed (it is
    informational: nothing is decided on it)."""
    if raw is None or len(raw) > 64:
        return None
    match = _PRESENCE.fullmatch(raw.decode("ascii", "replace"))
    return AgentPresence(match.group(1), int(match.group(2))) if match else None


_STATUS = re.compile(r"(acked|ready|steps-failed) ([1-9][0-9]{0,8})")
GUEST_STATES = ("acked", "ready", "steps-failed")


@dataclass(frozen=True)
class GuestStatus:
    """``data/xenpbr/status``: how far a restored guest's agent got (see STATUS_KEY)."""

    state: str  # one of GUEST_STATES
    generation: int

    def encode(self) -> str:
        return f"{self.state} {self.generation}"


def parse_guest_status(raw: bytes | None) -> GuestStatus | None:
    """The guest's status note, or None if absent or not well-formed (it only adds
    marks to a timeline: a guest lying here can fool nothing but its own history)."""
    if raw is None or len(raw) > 32:
        return None
    match = _STATUS.fullmatch(raw.decode("ascii", "replace"))
    return GuestStatus(match.group(1), int(match.group(2))) if match else None


# --------------------------------------------------------------------------------------------
# Rate limiting, sequence tracking, counters (pure: no I/O)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` requests per ``per_seconds`` per domain (burst = ``requests``)."""

    requests: int = 8
    per_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.requests < 1 or not (self.per_seconds > 0 and math.isfinite(self.per_seconds)):
            raise ValueError(f"bad rate limit {self.requests}/{self.per_seconds}s")


#: Refusal acks written per domain: burst 10, then 2 a second. Past it the newest refusal
#: is held and written when a token comes (:meth:`PhaseProtocol.flush_held`), so a
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

    Pure logic: the caller reads the request and writes the ack (:class:`PhaseProtocol`
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
        if not (_is_int(last_seq) and 0 <= last_seq < SEQ_LIMIT):
            raise ValueError(f"bad last_seq {last_seq!r}")
        if pending is not None and not (_is_int(pending) and 0 < pending < SEQ_LIMIT):
            raise ValueError(f"bad pending {pending!r}")
        state = self._state(domid)
        state.last_seq, state.pending = last_seq, pending
        state.last_digest = bytes.fromhex(digest) if digest else None


# --------------------------------------------------------------------------------------------
# xenstore I/O: paths are built from an integer domid only
# --------------------------------------------------------------------------------------------


def _home(domid: int) -> str:
    return domain_home(validate_domid(domid))


def request_path(domid: int) -> str:
    return f"{_home(domid)}/{REQUEST_KEY}"


def agent_path(domid: int) -> str:
    return f"{_home(domid)}/{AGENT_KEY}"


def control_path(domid: int) -> str:
    return f"{_home(domid)}/{CONTROL_DIR}"


def ack_path(domid: int) -> str:
    return f"{_home(domid)}/{ACK_KEY}"


def generation_path(domid: int) -> str:
    return f"{_home(domid)}/{GENERATION_KEY}"


_TOKEN_PREFIX = "xenpbr-request-"


def request_watch(domid: int) -> tuple[str, str]:
    """``(path, token)`` for watching a domain's request key; the token names the domid so
    one handle can watch every domain (see :func:`domid_from_token`)."""
    return request_path(domid), f"{_TOKEN_PREFIX}{domid}"


_STATUS_TOKEN_PREFIX = "xenpbr-status-"


def status_watch(domid: int) -> tuple[str, str]:
    """``(path, token)`` for watching a domain's status key (:data:`STATUS_KEY`)."""
    return f"{_home(domid)}/{STATUS_KEY}", f"{_STATUS_TOKEN_PREFIX}{domid}"


def _domid_after(prefix: str, token: str) -> int | None:
    rest = token[len(prefix):] if token.startswith(prefix) else ""
    return int(rest) if rest.isascii() and rest.isdigit() and len(rest) <= 5 else None


def domid_from_token(token: str) -> int | None:
    """The domid of a :func:`request_watch` token, or None for other tokens."""
    return _domid_after(_TOKEN_PREFIX, token)


def domid_from_status_token(token: str) -> int | None:
    """The domid of a :func:`status_watch` token, or None for other tokens."""
    return _domid_after(_STATUS_TOKEN_PREFIX, token)


def prepare_domain(xs: Any, domid: int, generation: int | None = None) -> None:
    """Create ``control/xenpbr`` for ``domid``: owned by dom0, read-only for the guest
    (``n0 r<domid>``), so the guest can read acks but never forge one. With
    ``generation``, also (re)write ``control/xenpbr/generation``. Idempotent; run at
    registration and after every restore (a restored domain has a new home)."""
    def work(t: Any) -> None:
        _prepare(t, domid)
        if generation is not None:
            _write_dom0_key(t, domid, generation_path(domid), str(_check_gen(generation)))

    xs.run_transaction(work)
    log.info("domain %d: %s prepared (n0 r%d)", domid, control_path(domid), domid)


def _prepare(t: Any, domid: int) -> None:
    t.mkdir(control_path(domid))
    t.set_perms(control_path(domid), owner=0, others=Access.NONE,
                acl=[Perm(domid, Access.READ)])


def _check_gen(generation: int) -> int:
    if not _is_int(generation) or not 0 <= generation < SEQ_LIMIT:
        raise ValueError(f"generation must be an integer in 0..{SEQ_LIMIT - 1}")
    return generation


def _write_dom0_key(t: Any, domid: int, path: str, value: str) -> None:
    """Write a key below control/xenpbr and pin its perms (children inherit the parent's,
    but a key left over from an earlier owner must not keep other perms)."""
    t.write(path, value)
    t.set_perms(path, owner=0, others=Access.NONE, acl=[Perm(domid, Access.READ)])


def read_request(xs: Any, domid: int) -> bytes | None:
    """The guest's request bytes, or None if it has written none."""
    return xs.read_or(request_path(domid), None)


def write_ack(xs: Any, domid: int, ack: Ack) -> None:
    xs.run_transaction(lambda t: _write_dom0_key(t, domid, ack_path(domid), ack.encode()))
    log.info("domain %d: ack %s", domid, ack.encode())


def write_generation(xs: Any, domid: int, generation: int) -> None:
    xs.run_transaction(lambda t: _write_dom0_key(t, domid, generation_path(domid),
                                                 str(_check_gen(generation))))


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

    def __init__(self, xs: Any, gate: RequestGate | None = None,
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

        def work(t: Any) -> None:
            _write_dom0_key(t, domid, f"{_home(domid)}/{DETAIL_KEY}", text)
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

        def work(t: Any) -> None:
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

