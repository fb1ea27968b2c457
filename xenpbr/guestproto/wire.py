"""The phase protocol's wire format, shared by dom0 and the guest agent.

One concern: what the bytes in a guest's ``data/xenpbr/*`` and dom0's
``control/xenpbr/*`` keys mean (contract: ``docs/phase-protocol.md``): the protocol
version, the key names (relative to a domain's home), the bounds and name patterns,
the request types, verdicts, acks, the agent's presence and status notes, the refusal
reasons and the errors for malformed input. The request parser lives beside it in
:mod:`xenpbr.guestproto.request`.

It is separate so the guest agent can import the very code dom0 validates with without
loading anything of dom0's: this module touches no xenstore and no Xen library
(``tests/unit/test_guestproto_layering.py`` checks it). Dom0's xenstore I/O is
:mod:`xenpbr.guestproto.control`, its rate limiting :mod:`xenpbr.guestproto.gate`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from xenpbr.errors import XenpbrError

__all__ = [
    "ACK_KEY",
    "AGENT_KEY",
    "BAD_REQUEST_FIELDS",
    "CONTROL_DIR",
    "DECISION_REASONS",
    "DETAIL_KEY",
    "DEVICE",
    "FIELDS",
    "GENERATION_KEY",
    "HEARTBEAT_KEY",
    "GUEST_STATES",
    "HAZARD",
    "IDENTITY",
    "MAX_DEPTH",
    "MAX_DETAIL",
    "MAX_DISKS",
    "MAX_HAZARDS",
    "MAX_PHASES",
    "MAX_REQUEST_BYTES",
    "MAX_SERVICES",
    "MAX_WAIT_SECONDS",
    "MOUNT",
    "PHASE_NAME",
    "PROBLEM_KEY",
    "PROBLEM_KINDS",
    "PROTOCOL_VERSION",
    "REFUSAL_REASONS",
    "REQUEST_KEY",
    "SEQ_LIMIT",
    "SERVICE",
    "STATUS_KEY",
    "Ack",
    "AckMalformed",
    "AgentPresence",
    "AgentProblem",
    "BoundaryRequest",
    "DiskState",
    "GuestStatus",
    "ProtocolError",
    "RequestRefused",
    "Verdict",
    "VerdictKind",
    "escape_for_log",
    "is_strict_int",
    "parse_agent_presence",
    "parse_agent_problem",
    "parse_guest_status",
]

PROTOCOL_VERSION = 1

# -- keys, relative to a domain's home /local/domain/<domid> ---------------------------------
REQUEST_KEY = "data/xenpbr/request"
AGENT_KEY = "data/xenpbr/agent"
#: ``acked <generation>`` when a restored agent has read its ack, then ``ready
#: <generation>`` (or ``steps-failed <generation>``) when its after-restore steps ran:
#: the guest_ack and service_ready marks of the recovery timeline.
STATUS_KEY = "data/xenpbr/status"
#: A counter the guest's ``xenpbr-agent heartbeat`` rewrites every few seconds; dom0 only
#: looks at whether it changes (docs/faults.md, "Hangs").
HEARTBEAT_KEY = "data/xenpbr/heartbeat"
#: ``<kind> <phase> <detail>``: why this boot's agent marks no boundary (its config does
#: not validate, or Python cannot run it), so that dom0 can say why a guest has no image.
PROBLEM_KEY = "data/xenpbr/problem"
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

PHASE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
IDENTITY = re.compile(r"[A-Za-z0-9._:+-]{1,64}")
DEVICE = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # xvda1, dm-0, nvme0n1p1
#: Mount points as /proc/mounts prints them (space, tab, newline, backslash octal-escaped).
MOUNT = re.compile(r"/[!-~]{0,127}")
SERVICE = re.compile(r"[A-Za-z0-9@._:+-]{1,128}")
HAZARD = re.compile(r"[ -~]{1,128}")

FIELDS = ("v", "seq", "phase", "phases", "identity", "wait", "disks", "services", "hazards")

#: ``bad-request:<field>`` suffixes, in the order the parser checks them.
BAD_REQUEST_FIELDS = ("size", "encoding", "json", "not-object", "duplicate-key",
                      "unknown-key") + FIELDS
#: Reasons dom0 gives for a well-formed request.
DECISION_REASONS = ("stale-seq", "unknown-phase", "out-of-order", "rate-limited", "busy",
                    "hazard", "persistent-disk-rw", "quota",
                    "capture-failed", "snapshot-failed", "disabled")
REFUSAL_REASONS = frozenset([f"bad-request:{f}" for f in BAD_REQUEST_FIELDS]
                            + list(DECISION_REASONS))
#: What an agent accepts as a reason: a newer dom0 may add tokens.
_REASON_TOKEN = re.compile(r"[a-z0-9][a-z0-9:_-]{0,63}")


def escape_for_log(value: Any, limit: int = 60) -> str:
    """Guest text for a log line: ASCII-escaped (no control or bidi characters reach a
    terminal) and truncated."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_strict_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool`` (JSON's ``true`` is no number)."""
    return isinstance(value, int) and not isinstance(value, bool)


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


# --------------------------------------------------------------------------------------------
# Boundary requests (parsed and encoded by xenpbr.guestproto.request)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskState:
    """A block device mounted in the guest: the guest's device name (``xvda1``), where it
    is mounted (as ``/proc/mounts`` shows it) and whether read-write. ``frozen`` is what
    agents before 0.3 sent (they froze the file system for the boundary): still parsed,
    ignored by dom0, which snapshots disks while the guest is paused."""

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
        if gen is not None and not (is_strict_int(gen) and 0 <= gen < SEQ_LIMIT):
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
        raise AckMalformed(f"not a phase-protocol verdict: {escape_for_log(text)}")

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
        if not is_strict_int(self.seq) or not 0 <= self.seq < SEQ_LIMIT:
            raise ValueError(f"ack seq must be an integer in 0..{SEQ_LIMIT - 1}, got {self.seq!r}")

    def encode(self) -> str:
        return f"{self.seq} {self.verdict}"

    @classmethod
    def parse(cls, raw: bytes | str) -> Ack:
        """Parse an ack as read from xenstore; :class:`AckMalformed` if it is not one."""
        try:
            text = raw.decode("ascii") if isinstance(raw, (bytes, bytearray)) else raw
        except UnicodeDecodeError:
            raise AckMalformed(f"ack is not ASCII: {escape_for_log(raw)}") from None
        match = _ACK.fullmatch(text)
        if not match or int(match.group(1)) >= SEQ_LIMIT:
            raise AckMalformed(f"ack must be '<seq> <verdict>', got {escape_for_log(text)}")
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


#: ``config``: the agent config does not validate (the agent salvaged the boot);
#: ``no-python``: the packaged unit found no Python that can run the agent (its shell
#: fallback salvaged the boot).
PROBLEM_KINDS = ("config", "no-python")
_PROBLEM = re.compile(r"(%s) (%s) ([ -~]{1,200})" % ("|".join(PROBLEM_KINDS),
                                                     PHASE_NAME.pattern))


@dataclass(frozen=True)
class AgentProblem:
    """``data/xenpbr/problem``: why the agent marks no boundary in this boot."""

    kind: str  # one of PROBLEM_KINDS
    phase: str
    detail: str

    def encode(self) -> str:
        """The key's value; the detail is cut and made printable ASCII to fit."""
        detail = "".join(c if " " <= c <= "~" else "?" for c in self.detail)[:200] or "?"
        return f"{self.kind} {self.phase} {detail}"


def parse_agent_problem(raw: bytes | None) -> AgentProblem | None:
    """The agent's problem note, or None if absent or not well-formed (informational: it
    only explains, to the operator, why no image exists)."""
    if raw is None or len(raw) > 256:
        return None
    match = _PROBLEM.fullmatch(raw.decode("ascii", "replace"))
    return AgentProblem(*match.groups()) if match else None


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
