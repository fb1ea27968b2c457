"""Reach counts: did the instruction a fault altered ever run?

A fault that alters one instruction of the kernel (``xenpbr inject --fault text`` or
``operand``) and then shows nothing within the campaign's window has two very different
explanations: the altered instruction never ran (most random kernel functions are
drivers an idle guest never calls), or it ran and its changed result did not matter.
dom0 cannot tell them apart from outside, so it asks the guest's agent, which takes part
only when the guest's owner starts ``xenpbr-agent reach-counter``:

* the agent says it listens: ``data/xenpbr/reach/ready`` = ``kprobes`` (or
  ``no-tracefs``: it runs, but its kernel cannot count), so dom0 never waits for an
  agent that is not there;
* dom0 asks for a counter on one kernel address: ``control/xenpbr/reach`` =
  ``<id> <address in hex>`` (dom0-written, read-only for the guest);
* the agent puts a kprobe there (``/sys/kernel/tracing/kprobe_events``) and says how
  often it fired, again whenever the count changes: ``data/xenpbr/reach/count`` =
  ``<id> counting <hits>``; or why it could not: ``<id> refused <reason>`` (the kernel
  refused the probe: an instruction kprobes cannot step, a function kprobes must not
  touch; or no tracefs). A new request replaces the previous counter.

The counter is armed *after* the fault is written, on the altered instruction itself:
kprobes copies the instruction it finds (the altered one) and steps it out of line, so
every execution of the fault is counted and none is prevented. A hit counted is an
execution of the altered bytes, not of the function around them.

Guest-written values are hostile input: every parser bounds its input and raises
:class:`ReachMalformed` and nothing else for bad bytes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from xenpbr.guestproto.wire import CONTROL_DIR, ProtocolError, escape_for_log

__all__ = [
    "ANSWER_KEY",
    "READY_KEY",
    "REQUEST_KEY",
    "Reach",
    "ReachMalformed",
    "ReachRequest",
    "ReachState",
    "parse_answer",
    "parse_request",
]

REQUEST_KEY = f"{CONTROL_DIR}/reach"
ANSWER_KEY = "data/xenpbr/reach/count"
READY_KEY = "data/xenpbr/reach/ready"

MAX_BYTES = 96
ID_LIMIT = 2**31
#: Hits are counted by the kernel in an unsigned long; a longer number is a lie.
MAX_HITS = 2**64 - 1
#: A refusal's reason: one word (``EILSEQ``, ``no-tracefs``...), kept short for logs.
REASON = re.compile(r"[A-Za-z0-9_.:-]{1,40}")
#: x86-64 kernel addresses: the top half of the canonical address space.
KERNEL_BASE = 0xFFFF800000000000


class ReachMalformed(ProtocolError):
    """A reach key does not follow the format (the text names what was wrong)."""


class ReachState(str, enum.Enum):
    COUNTING = "counting"  # the kprobe is armed: the third word is its hit count
    REFUSED = "refused"  # no counter: the third word says why


@dataclass(frozen=True)
class ReachRequest:
    """dom0's ``<id> <address>``: count executions of the instruction at *address*."""

    id: int
    address: int

    def encode(self) -> str:
        return f"{self.id} {self.address:#x}"


@dataclass(frozen=True)
class Reach:
    """The agent's ``<id> counting <hits>`` or ``<id> refused <reason>``."""

    id: int
    state: ReachState
    hits: int | None = None
    reason: str | None = None

    def encode(self) -> str:
        word = str(self.hits) if self.state is ReachState.COUNTING else self.reason
        return f"{self.id} {self.state.value} {word}"


def _words(raw: bytes, what: str) -> list[str]:
    if len(raw) > MAX_BYTES:
        raise ReachMalformed(f"{what}: {len(raw)} bytes, more than {MAX_BYTES}")
    try:
        return raw.decode("ascii").split()
    except UnicodeDecodeError:
        raise ReachMalformed(f"{what}: not ASCII ({escape_for_log(raw)})") from None


def _id(word: str, what: str) -> int:
    if not (word.isdigit() and len(word) <= 10 and 0 < int(word) < ID_LIMIT):
        raise ReachMalformed(f"{what}: id {escape_for_log(word)} is not 1..{ID_LIMIT - 1}")
    return int(word)


def parse_request(raw: bytes) -> ReachRequest:
    words = _words(raw, "reach request")
    if len(words) != 2 or not re.fullmatch(r"0x[0-9a-f]{1,16}", words[1]):
        raise ReachMalformed("reach request: expected '<id> 0x<kernel address>', got "
                             f"{escape_for_log(raw)}")
    address = int(words[1], 16)
    if address < KERNEL_BASE:
        raise ReachMalformed(f"reach request: {words[1]} is not a kernel address")
    return ReachRequest(_id(words[0], "reach request"), address)


def parse_answer(raw: bytes) -> Reach:
    words = _words(raw, "reach answer")
    states = {s.value: s for s in ReachState}
    if len(words) != 3 or words[1] not in states:
        raise ReachMalformed("reach answer: expected '<id> counting <hits>' or '<id> "
                             f"refused <reason>', got {escape_for_log(raw)}")
    ident, state = _id(words[0], "reach answer"), states[words[1]]
    if state is ReachState.REFUSED:
        if not REASON.fullmatch(words[2]):
            raise ReachMalformed(f"reach answer: reason {escape_for_log(words[2])} is not "
                                 "one word of at most 40 letters, digits or _.:-")
        return Reach(ident, state, reason=words[2])
    if not (words[2].isdigit() and int(words[2]) <= MAX_HITS):
        raise ReachMalformed(f"reach answer: hits {escape_for_log(words[2])} is not a count")
    return Reach(ident, state, hits=int(words[2]))
