"""dom0's side of provoked faults: ask a guest's agent for one LKDTM crash type.

``xenpbr inject DOMAIN --fault lkdtm:TYPE`` (format and the guest's side:
:mod:`xenpbr.guestproto.provoke`, :mod:`xenpbr_agent.provoke`). Unlike the kinds that
alter memory from outside, this one needs the guest's consent: the guest's agent must
offer the type. So the command refuses, changing nothing, when the agent offers
nothing (no listener, or a kernel without LKDTM) or not that type, and says which
types are offered. Otherwise it writes the request and waits until the agent says it
took it (the moment of injection, for detection times) or the domain goes away;
a request not taken within *wait* seconds is withdrawn, so it cannot fire later.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from xenpbr.errors import XenpbrError
from xenpbr.guestproto.provoke import (
    ID_LIMIT,
    OFFER_KEY,
    REQUEST_KEY,
    TAKEN_KEY,
    ProvokeMalformed,
    ProvokeRequest,
    Taken,
    parse_offer,
    parse_taken,
)
from xenpbr.xenstore import XenstoreClient, XenstoreError
from xenpbr.xenstore.paths import domain_home, validate_domid

log = logging.getLogger(__name__)

#: ``xenpbr inject --fault lkdtm:TYPE``
FAULT_PREFIX = "lkdtm:"
#: Seconds the agent has to take a request by default: a watch event and one write in
#: the guest, given five times what the slowest lab machine needed.
DEFAULT_WAIT_S = 120.0
POLL_S = 1.0
WATCH_TOKEN = "xenpbr-provoke-taken"


class ProvokeRefused(XenpbrError):
    """The guest's agent does not offer the fault asked for: nothing was requested."""


class ProvokeNotTaken(XenpbrError):
    """The request was written but the agent did not take it in time (withdrawn)."""


@dataclass(frozen=True)
class Provoked:
    """A request the agent took: *taken_at* is when dom0 saw it say so (or, if the
    domain went away first, when it did), *taken* None in that case."""

    request: ProvokeRequest
    requested_at: float
    taken_at: float
    taken: Taken | None


def _path(domid: int, key: str) -> str:
    return f"{domain_home(validate_domid(domid))}/{key}"


def offered(xs: XenstoreClient, domid: int, name: str) -> tuple[str, ...]:
    """The LKDTM types *name*'s agent offers; ProvokeRefused if none or unreadable."""
    raw = xs.read_or(_path(domid, OFFER_KEY), None)
    if raw is None:
        raise ProvokeRefused(
            f"{name}'s agent offers no provoked faults: start `xenpbr-agent provoke-listener` "
            "in the guest (it needs LKDTM: CONFIG_LKDTM or the lkdtm module, and debugfs)")
    try:
        types = parse_offer(raw)
    except ProvokeMalformed as exc:
        raise ProvokeRefused(f"{name}'s agent offer is not usable: {exc}") from None
    if not types:
        raise ProvokeRefused(f"{name}'s agent offers an empty list of LKDTM types")
    return types


def provoke(xs: XenstoreClient, domid: int, name: str, lkdtm_type: str,
            wait: float = DEFAULT_WAIT_S, *, alive: Callable[[], bool],
            clock: Callable[[], float] = time.time,
            rng: random.Random | None = None) -> Provoked:
    """Request *lkdtm_type* of *name* (domain *domid*) and wait until its agent takes it,
    the domain goes away (*alive* turns False), or *wait* seconds pass (withdrawn)."""
    types = offered(xs, domid, name)
    if lkdtm_type not in types:
        raise ProvokeRefused(f"{name}'s LKDTM has no {lkdtm_type}: it offers "
                             f"{', '.join(types)}")
    request = ProvokeRequest((rng or random.SystemRandom()).randrange(1, ID_LIMIT), lkdtm_type)
    taken_path = _path(domid, TAKEN_KEY)
    xs.watch(taken_path, WATCH_TOKEN)
    try:
        requested_at = clock()
        xs.write(_path(domid, REQUEST_KEY), request.encode())
        log.warning("%s: asked its agent for LKDTM %s (request %d)", name, lkdtm_type,
                    request.id)
        while True:
            taken = _read_taken(xs, taken_path)
            if taken is not None and taken.id == request.id:
                return Provoked(request, requested_at, clock(), taken)
            if not alive():
                return Provoked(request, requested_at, clock(), None)
            if clock() - requested_at > wait:
                _withdraw(xs, domid, name, request, wait)
            xs.read_watch(timeout=POLL_S)
    finally:
        _unwatch(xs, taken_path)


def _withdraw(xs: XenstoreClient, domid: int, name: str, request: ProvokeRequest,
              wait: float) -> NoReturn:
    xs.rm(_path(domid, REQUEST_KEY))
    raise ProvokeNotTaken(f"{name}'s agent did not take LKDTM {request.type} within "
                          f"{wait:.0f} s; the request is withdrawn (is `xenpbr-agent "
                          "provoke-listener` running? --wait S gives it longer)")


def _unwatch(xs: XenstoreClient, path: str) -> None:
    try:
        xs.unwatch(path, WATCH_TOKEN)
    except XenstoreError as exc:  # the domain went away with its path: nothing to undo
        log.debug("unwatch %s: %s", path, exc)


def _read_taken(xs: XenstoreClient, path: str) -> Taken | None:
    raw = xs.read_or(path, None)
    if raw is None:
        return None
    try:
        return parse_taken(raw)
    except ProvokeMalformed as exc:
        log.warning("ignoring the guest's provoke answer: %s", exc)
        return None
