"""``xenpbr-agent heartbeat``: show dom0 that this kernel still schedules processes.

A hung kernel cannot say so. This loop rewrites a counter in xenstore every few seconds;
dom0 (for a domain whose config sets ``xenpbr_liveness_timeout``) treats a counter that
stands still while the guest runs as a hang. Start it after the last phase (as
``[after-last-phase]`` does with services), so no image holds a heartbeat that a restore
would resume mid-beat; a restored guest starts a fresh one. A xenstore error (its
connection is re-established after a restore) is logged and the next beat reconnects:
the loop never ends on its own unless ``count`` says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from xenpbr.guestproto.wire import HEARTBEAT_KEY
from xenpbr.xenstore import XenstoreError

log = logging.getLogger(__name__)

MIN_INTERVAL, MAX_INTERVAL = 0.5, 60.0


def beat(xs_factory: Callable[[], Any], interval: float, count: int | None = None,
         sleep: Callable[[float], None] = time.sleep) -> int:
    """Write ``1, 2, 3, ...`` to the heartbeat key every *interval* seconds (forever, or
    *count* times); return the number of beats written."""
    written = n = 0
    xs: Any = None
    while count is None or n < count:
        n += 1
        try:
            if xs is None:
                xs = xs_factory().__enter__()
            xs.write(HEARTBEAT_KEY, str(n))
            written += 1
        except XenstoreError as exc:
            log.warning("heartbeat %d not written (%s); reconnecting at the next", n, exc)
            _close(xs)
            xs = None
        if count is None or n < count:
            sleep(interval)
    _close(xs)
    return written


def _close(xs: Any) -> None:
    if xs is not None:
        try:
            xs.__exit__(None, None, None)
        except XenstoreError:
            pass
