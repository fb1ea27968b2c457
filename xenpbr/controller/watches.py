"""The xenstore watches dom0 keeps on each managed guest's keys.

Separate because two owners need the same set: the controller adds a guest's watches
when it adopts (or restores) it and drops them when it is destroyed, and the event loop
(:mod:`xenpbr.daemon`) sweeps every watched domain.
"""

from __future__ import annotations

import logging

from xenpbr.guestproto import control
from xenpbr.errors import XenpbrError
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)


class GuestWatches:
    """domid -> the (path, token) watches on its request, status and invalidate keys and
    its resurrection delivery confirmations."""

    def __init__(self, xs: XenstoreClient) -> None:
        self.xs = xs
        self.watching: dict[int, list[tuple[str, str]]] = {}

    def watch(self, domid: int) -> None:
        if domid in self.watching:
            return
        watches = [control.request_watch(domid), control.status_watch(domid),
                   control.invalidation_watch(domid), control.resurrected_watch(domid)]
        for path, token in watches:
            self.xs.watch(path, token)
        self.watching[domid] = watches

    def unwatch(self, domid: int) -> None:
        for path, token in self.watching.pop(domid, []):
            try:
                self.xs.unwatch(path, token)
            except XenpbrError as exc:
                log.debug("unwatch %s: %s", path, exc)
