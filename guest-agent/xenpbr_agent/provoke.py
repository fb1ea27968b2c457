"""``xenpbr-agent provoke-listener``: run the LKDTM crash type dom0 asks for.

A fault inside the kernel (``BUG()``, a smashed stack canary, a soft lockup, a write to
freed memory) can only be provoked from inside it, by LKDTM (CONFIG_LKDTM, or the
``lkdtm`` module) through ``/sys/kernel/debug/provoke-crash/DIRECT``. This listener is
how ``xenpbr inject DOMAIN --fault lkdtm:TYPE`` reaches it; it exists only while the
guest's owner runs it, so no guest is crashable on request unless it opted in. It offers
the types its kernel lists, watches dom0's ``control/xenpbr/provoke`` (which no process
in the guest can write) and, for each new request naming an offered type, says it took
it and writes the type to ``DIRECT`` from this process: the fault runs in this thread's
context, as LKDTM's own selftests do. Format: :mod:`xenpbr.guestproto.provoke`.

Start it after the last phase (``[after-last-phase] start``, like the heartbeat), so no
image holds a listener: a restored guest starts a fresh one. A request that was already
there when the listener started is never run (it may be an old one, from before a
restore of this domain). A xenstore error is logged and the listener reconnects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenpbr.guestproto.provoke import (
    OFFER_KEY,
    REQUEST_KEY,
    TAKEN_KEY,
    ProvokeMalformed,
    ProvokeRequest,
    Taken,
    TakenState,
    encode_offer,
    parse_request,
)
from xenpbr_agent import AgentError
from xenpbr_agent.reconnect import RECONNECT_S, serve_until

log = logging.getLogger(__name__)

DIRECT = "/sys/kernel/debug/provoke-crash/DIRECT"
#: What LKDTM prints before its list when one of its debugfs files is read.
LIST_HEADER = "Available crash types:"
WATCH_TOKEN = "xenpbr-provoke"


def offered_types(direct: str | Path = DIRECT) -> list[str]:
    """The crash types the kernel's LKDTM lists (reading DIRECT lists them all)."""
    path = Path(direct)
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise AgentError(f"{path} does not exist: this kernel has no LKDTM (load the lkdtm "
                         "module, or build with CONFIG_LKDTM) or debugfs is not mounted "
                         "(mount -t debugfs none /sys/kernel/debug)") from None
    except OSError as exc:
        raise AgentError(f"cannot read LKDTM's crash types from {path}: {exc}") from None
    lines = text.splitlines()
    if not lines or lines[0].strip() != LIST_HEADER:
        raise AgentError(f"{path} does not list LKDTM's crash types "
                         f"(first line {lines[0][:60] if lines else ''!r})")
    types = [line.strip() for line in lines[1:] if line.strip()]
    try:
        encode_offer(types)
    except ProvokeMalformed as exc:
        raise AgentError(f"LKDTM's crash types in {path} cannot be offered: {exc}") from None
    return types


def provoke(request: ProvokeRequest, direct: str | Path,
            say: Callable[[Taken], None]) -> TakenState:
    """Say the request is taken, then write its type to DIRECT (a fatal type never
    returns from the write); say how the write ended."""
    say(Taken(request.id, request.type, TakenState.STARTED))
    log.warning("provoking LKDTM %s for dom0's request %d", request.type, request.id)
    try:
        with open(direct, "w", encoding="ascii") as handle:
            handle.write(request.type)
    except OSError as exc:
        log.error("LKDTM refused %s: %s", request.type, exc)
        state = TakenState.FAILED
    else:
        log.warning("LKDTM %s returned: the kernel lived through it", request.type)
        state = TakenState.RETURNED
    say(Taken(request.id, request.type, state))
    return state


class Listener:
    """One listener: *types* offered, requests already seen never run twice."""

    def __init__(self, types: list[str], direct: str | Path = DIRECT) -> None:
        self.types = types
        self.direct = direct
        self.last: bytes | None = None
        self.provoked = 0

    def serve(self, xs: Any, stop: Callable[[], bool]) -> None:
        """Offer, watch and provoke on one connection until *stop* (a xenstore error
        ends it: the caller reconnects)."""
        xs.watch(REQUEST_KEY, WATCH_TOKEN)
        if self.last is None:  # never run what was there before we listened
            self.last = xs.read_or(REQUEST_KEY, b"")
        # The offer says "ready": only once a request written after it cannot be missed.
        xs.write(OFFER_KEY, encode_offer(self.types))
        while not stop():
            xs.read_watch(timeout=RECONNECT_S)
            raw = xs.read_or(REQUEST_KEY, b"")
            if not raw or raw == self.last:
                continue
            self.last = raw
            self._handle(xs, raw)

    def _handle(self, xs: Any, raw: bytes) -> None:
        try:
            request = parse_request(raw)
        except ProvokeMalformed as exc:
            log.warning("ignoring dom0's provoke request: %s", exc)
            return
        if request.type not in self.types:
            log.warning("dom0 asked for %s, which this kernel's LKDTM does not offer",
                        request.type)
            xs.write(TAKEN_KEY, Taken(request.id, request.type, TakenState.FAILED).encode())
            return
        self.provoked += 1
        provoke(request, self.direct, lambda taken: xs.write(TAKEN_KEY, taken.encode()))


def listen(xs_factory: Callable[[], Any], direct: str | Path = DIRECT,
           stop: Callable[[], bool] = lambda: False,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """Serve dom0's requests until *stop* (forever by default), reconnecting after a
    xenstore error; the number of requests provoked."""
    listener = Listener(offered_types(direct), direct)
    log.info("offering %d LKDTM crash types to dom0", len(listener.types))
    serve_until(xs_factory, listener.serve, stop, sleep)
    return listener.provoked
