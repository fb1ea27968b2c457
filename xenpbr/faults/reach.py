"""dom0's side of reach counts: ask a guest's agent how often an altered instruction runs.

``xenpbr inject DOMAIN --fault text|operand --count-runs`` asks, right after the fault
is written, for a counter on the altered instruction (format and the guest's side:
:mod:`xenpbr.guestproto.reach`, :mod:`xenpbr_agent.reach`); ``xenpbr fault-check
DOMAIN`` later reads the count. A fault that showed nothing is then explained by the
record: it never ran, or it ran N times without visible effect.

Nothing here changes the guest's kernel but through its own agent, and only where the
guest runs ``xenpbr-agent reach-counter`` (it says so in ``data/xenpbr/reach/ready``):
without one nothing is asked and the record says "not counted" with the reason; a
request the counter does not answer within *wait* seconds is withdrawn.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from xenpbr.guestproto.reach import (
    ANSWER_KEY,
    ID_LIMIT,
    READY_KEY,
    REQUEST_KEY,
    Reach,
    ReachMalformed,
    ReachRequest,
    ReachState,
    parse_answer,
)
from xenpbr.xenstore import XenstoreClient
from xenpbr.xenstore.paths import domain_home, validate_domid

#: The instruction ftrace patches at a function's entry (``call __fentry__`` made a
#: 5-byte NOP at boot): a kprobe there is placed through ftrace, which checks those
#: bytes and, finding the fault, warns and turns itself off. Never counted.
FTRACE_NOP = "0f1f440000"
DEFAULT_WAIT_S = 60.0
POLL_S = 0.2


def _path(domid: int, key: str) -> str:
    return f"{domain_home(validate_domid(domid))}/{key}"


def uncountable(change: dict[str, Any]) -> str | None:
    """Why the altered instruction of *change* (an injection record's ``change``) must
    not be counted, or None if it may."""
    if change.get("kind") not in ("text", "operand"):
        return f"a {change.get('kind')} fault alters no instruction"
    symbol = str(change.get("symbol", ""))
    if symbol.endswith("+0x0") and str(change.get("old", "")) == FTRACE_NOP:
        return "the fault is in the function's ftrace call site, which a counter would use"
    return None


def not_counted(reason: str) -> dict[str, Any]:
    """The record of a fault whose runs were not counted."""
    return {"id": None, "address": None, "state": "not-counted", "hits": None,
            "reason": reason}


def _record(reach: Reach, address: int) -> dict[str, Any]:
    """The record of the agent's answer *reach* (``hits`` or ``reason``, the other None)."""
    return {"id": reach.id, "address": f"{address:#x}", "state": reach.state.value,
            "hits": reach.hits, "reason": reach.reason}


def answer(xs: XenstoreClient, domid: int, ident: int) -> Reach | None:
    """The agent's answer to request *ident*, None if there is none (or it answers
    another request). :class:`ReachMalformed` for a guest that writes garbage."""
    raw = xs.read_or(_path(domid, ANSWER_KEY), None)
    if raw is None:
        return None
    reach = parse_answer(raw)
    return reach if reach.id == ident else None


def request(xs: XenstoreClient, domid: int, address: int, wait: float = DEFAULT_WAIT_S,
            clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Ask for a counter at *address*; the record (``counting`` with the hits so far,
    ``refused`` with the kernel's reason, or ``not-counted`` when no agent answered
    within *wait* s: the request is then withdrawn)."""
    ready = xs.read_or(_path(domid, READY_KEY), None)
    if ready is None:
        return not_counted("the guest runs no `xenpbr-agent reach-counter`")
    if ready != b"kprobes":
        return not_counted("the guest's kernel cannot count (no tracefs with kprobe_events)")
    ask = ReachRequest(random.SystemRandom().randrange(1, ID_LIMIT), address)
    xs.write(_path(domid, REQUEST_KEY), ask.encode())
    deadline = clock() + wait
    while clock() < deadline:
        try:
            got = answer(xs, domid, ask.id)
        except ReachMalformed as exc:
            return not_counted(f"the guest's answer is malformed: {exc}")
        if got is not None:
            return _record(got, address)
        sleep(POLL_S)
    xs.rm(_path(domid, REQUEST_KEY))
    return not_counted(f"the guest's reach-counter did not answer within {wait:g} s")


def current(xs: XenstoreClient, domid: int, asked: dict[str, Any]) -> dict[str, Any]:
    """The count now for the request recorded as *asked*; ``stale`` True when the agent
    no longer answers it (the count is then the one recorded)."""
    if asked.get("state") != ReachState.COUNTING.value:
        return {**asked, "stale": False}
    try:
        got = answer(xs, domid, int(asked["id"]))
    except ReachMalformed as exc:
        return {**not_counted(f"the guest's answer is malformed: {exc}"), "stale": False}
    if got is None:
        return {**asked, "stale": True}
    return {**_record(got, int(asked["address"], 16)), "stale": False}
