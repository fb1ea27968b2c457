"""Provoked faults: dom0 asks a guest's agent to run one LKDTM crash type in its kernel.

Some faults cannot be made from outside: a ``BUG()``, a stack-protector panic, a
soft lockup or a use-after-free happen *inside* the kernel, on the path of a running
thread. Linux ships them as LKDTM (``drivers/misc/lkdtm``): writing a type's name to
``/sys/kernel/debug/provoke-crash/DIRECT`` runs it in the writer's context. ``xenpbr
inject DOMAIN --fault lkdtm:TYPE`` reaches it through the guest's agent, which takes
part only when the guest's owner starts ``xenpbr-agent provoke-listener``:

* the agent offers the types its kernel has: ``data/xenpbr/provoke/offer`` =
  ``BUG EXCEPTION ...`` (guest-written: dom0 parses it as hostile input);
* dom0 asks for one: ``control/xenpbr/provoke`` = ``<id> <TYPE>`` (dom0-written, read-only
  for the guest: no process in the guest can forge a request);
* the agent says it took it just before the write that provokes it:
  ``data/xenpbr/provoke/taken`` = ``<id> <TYPE> started``, and ``<id> <TYPE> returned``
  when the kernel came back from the write (a type that only warns, or a fault the
  kernel survived), or ``<id> <TYPE> failed`` when the write was refused.

This module is the format both sides share (it imports nothing that touches xenstore,
like :mod:`xenpbr.guestproto.wire`): every parser bounds its input and raises
:class:`ProvokeMalformed` and nothing else for bad bytes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from xenpbr.guestproto.wire import CONTROL_DIR, ProtocolError, escape_for_log

__all__ = [
    "MAX_OFFER_BYTES",
    "OFFER_KEY",
    "REQUEST_KEY",
    "TAKEN_KEY",
    "ProvokeMalformed",
    "ProvokeRequest",
    "Taken",
    "TakenState",
    "encode_offer",
    "parse_offer",
    "parse_request",
    "parse_taken",
]

OFFER_KEY = "data/xenpbr/provoke/offer"
TAKEN_KEY = "data/xenpbr/provoke/taken"
REQUEST_KEY = f"{CONTROL_DIR}/provoke"

#: LKDTM's type names (``BUG``, ``CORRUPT_STACK``, ``SLAB_FREE_DOUBLE``...): upper case.
TYPE_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,39}")
#: Linux 6.1's LKDTM has 85 types; the bound leaves room for newer kernels.
MAX_TYPES = 160
#: Fits xenstored's node quota for a guest (see wire.MAX_REQUEST_BYTES).
MAX_OFFER_BYTES = 1900
MAX_SHORT_BYTES = 64
ID_LIMIT = 2**31


class ProvokeMalformed(ProtocolError):
    """A provoke key does not follow the format (the text names what was wrong)."""


class TakenState(str, enum.Enum):
    STARTED = "started"  # written just before the agent writes the type to DIRECT
    RETURNED = "returned"  # the write came back: the kernel lived through it
    FAILED = "failed"  # the kernel refused the write (no such type, or debugfs error)


@dataclass(frozen=True)
class ProvokeRequest:
    """dom0's ``<id> <TYPE>``: *id* tells one request from the next."""

    id: int
    type: str

    def encode(self) -> str:
        return f"{self.id} {self.type}"


@dataclass(frozen=True)
class Taken:
    """The agent's ``<id> <TYPE> <state>``."""

    id: int
    type: str
    state: TakenState

    def encode(self) -> str:
        return f"{self.id} {self.type} {self.state.value}"


def _text(raw: bytes, limit: int, what: str) -> str:
    if len(raw) > limit:
        raise ProvokeMalformed(f"{what}: {len(raw)} bytes, more than {limit}")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProvokeMalformed(f"{what}: not ASCII ({escape_for_log(raw)})") from None


def _type_name(word: str, what: str) -> str:
    if not TYPE_NAME.fullmatch(word):
        raise ProvokeMalformed(f"{what}: {escape_for_log(word)} is no LKDTM type name "
                               "(A-Z, 0-9 and _, at most 40)")
    return word


def _id(word: str, what: str) -> int:
    if not (word.isdigit() and len(word) <= 10 and 0 < int(word) < ID_LIMIT):
        raise ProvokeMalformed(f"{what}: id {escape_for_log(word)} is not 1..{ID_LIMIT - 1}")
    return int(word)


def encode_offer(types: list[str]) -> str:
    """The agent's offer; raises :class:`ProvokeMalformed` if it would not parse."""
    text = " ".join(types)
    parse_offer(text.encode("ascii"))
    return text


def parse_offer(raw: bytes) -> tuple[str, ...]:
    """The types a guest offers, in its order, without repeats."""
    words = _text(raw, MAX_OFFER_BYTES, "provoke offer").split()
    if len(words) > MAX_TYPES:
        raise ProvokeMalformed(f"provoke offer: {len(words)} types, more than {MAX_TYPES}")
    return tuple(dict.fromkeys(_type_name(w, "provoke offer") for w in words))


def parse_request(raw: bytes) -> ProvokeRequest:
    words = _text(raw, MAX_SHORT_BYTES, "provoke request").split()
    if len(words) != 2:
        raise ProvokeMalformed("provoke request: expected '<id> <TYPE>', got "
                               f"{escape_for_log(raw)}")
    return ProvokeRequest(_id(words[0], "provoke request"),
                          _type_name(words[1], "provoke request"))


def parse_taken(raw: bytes) -> Taken:
    words = _text(raw, MAX_SHORT_BYTES, "provoke taken").split()
    states = {s.value: s for s in TakenState}
    if len(words) != 3 or words[2] not in states:
        raise ProvokeMalformed("provoke taken: expected '<id> <TYPE> "
                               f"{'|'.join(states)}', got {escape_for_log(raw)}")
    return Taken(_id(words[0], "provoke taken"), _type_name(words[1], "provoke taken"),
                 states[words[2]])
