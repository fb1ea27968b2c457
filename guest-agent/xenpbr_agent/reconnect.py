"""One loop for the agent's long-running listeners: serve on a xenstore connection until
told to stop, and after a xenstore error (xenstored restarted, the guest resumed from
an image) open a new connection after a pause instead of dying."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from xenpbr.xenstore import XenstoreError

log = logging.getLogger(__name__)

RECONNECT_S = 1.0


def serve_until(xs_factory: Callable[[], Any], serve: Callable[[Any, Callable[[], bool]], None],
                stop: Callable[[], bool],
                sleep: Callable[[float], None] = time.sleep) -> None:
    """Call ``serve(xs, stop)`` on a fresh connection until *stop*; a xenstore error ends
    that connection, logged, and the next one opens :data:`RECONNECT_S` later."""
    while not stop():
        try:
            with xs_factory() as xs:
                serve(xs, stop)
        except XenstoreError as exc:
            log.warning("xenstore error (%s); reconnecting in %.0f s", exc, RECONNECT_S)
            sleep(RECONNECT_S)
