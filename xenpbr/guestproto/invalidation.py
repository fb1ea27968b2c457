"""The invalidation wire format: a guest asks dom0 to drop its images from phase N on.

Bumping the agent's ``identity`` invalidates every image of the guest. Often less is
stale: an upgrade of the application leaves the kernel and services images good. So the
guest can name the first phase whose result changed, and dom0 forgets that phase's image
and every later one (they were taken on top of it); the next boot captures them again.

Wire (docs/phase-protocol.md, "Invalidation")::

    guest: data/xenpbr/invalidate       = "<seq> <phase>"              (<= 48 bytes)
    dom0:  control/xenpbr/invalidated   = "<seq> dropped:<n>"  or  "<seq> refused:<why>"

``seq`` only grows (the agent picks one above dom0's last answer), so a replayed or
stale request is ignored; ``why`` is ``unknown-phase`` (not one of the phases the guest
declared at its boundaries) or ``rate-limited`` (more than one a second). A malformed
request is logged and not answered: it has no seq to answer. Guest input is parsed by
a full-match regex on bounded ASCII before anything looks at it.

This module is only the format, shared by dom0 and the guest agent, so it imports
nothing that touches xenstore or Xen; dom0's xenstore I/O for it (paths, watch,
``last_invalidation_answered``, ``write_invalidation_answer``) is in
:mod:`xenpbr.guestproto.control`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xenpbr.guestproto.wire import CONTROL_DIR, PHASE_NAME, SEQ_LIMIT

__all__ = ["ANSWER_KEY", "MAX_BYTES", "REASONS", "REQUEST_KEY", "Answer", "Invalidation",
           "parse_answer", "parse_request"]

REQUEST_KEY = "data/xenpbr/invalidate"
ANSWER_KEY = f"{CONTROL_DIR}/invalidated"
MAX_BYTES = 48
REASONS = ("unknown-phase", "rate-limited")
_SEQ = r"[1-9][0-9]{0,9}"
_REQUEST = re.compile(rf"({_SEQ}) ({PHASE_NAME.pattern})")
_ANSWER = re.compile(rf"({_SEQ}) (?:dropped:([0-9]{{1,2}})|refused:([a-z-]{{1,32}}))")


@dataclass(frozen=True)
class Invalidation:
    """A guest's request: drop the images of ``phase`` and the phases after it."""

    seq: int
    phase: str

    def encode(self) -> str:
        return f"{self.seq} {self.phase}"


@dataclass(frozen=True)
class Answer:
    """Dom0's answer: how many images were dropped, or why nothing was."""

    seq: int
    dropped: int | None = None
    refused: str | None = None

    def encode(self) -> str:
        verdict = f"dropped:{self.dropped}" if self.refused is None else f"refused:{self.refused}"
        return f"{self.seq} {verdict}"


def parse_request(raw: bytes | None) -> Invalidation | None:
    """The guest's request, or None if absent or malformed."""
    if raw is None or len(raw) > MAX_BYTES:
        return None
    match = _REQUEST.fullmatch(raw.decode("ascii", "replace"))
    if match is None or int(match.group(1)) >= SEQ_LIMIT:
        return None
    return Invalidation(int(match.group(1)), match.group(2))


def parse_answer(raw: bytes | None) -> Answer | None:
    """Dom0's answer, or None if there is none (or it is malformed)."""
    if raw is None or len(raw) > MAX_BYTES:
        return None
    match = _ANSWER.fullmatch(raw.decode("ascii", "replace"))
    if match is None:
        return None
    dropped = int(match.group(2)) if match.group(2) is not None else None
    return Answer(int(match.group(1)), dropped, match.group(3))
