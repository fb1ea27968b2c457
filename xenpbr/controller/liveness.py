"""Dom0's liveness check for guests without a watchdog of their own.

A kernel that stops scheduling without crashing is only noticed if something expects to
hear from it. A guest with ``xen_wdt`` and a watchdog daemon has Xen do that; for the
others, the agent keeps a heartbeat in xenstore (``xenpbr-agent heartbeat``) and this
check, for domains whose config sets ``xenpbr_liveness_timeout``, shuts down a domain
whose heartbeat stood still that long while it ran, with reason ``watchdog``: from there
it is the same event as Xen's watchdog, and ``on_watchdog`` decides what follows.

Time only counts while dom0 was looking and the guest could run: a paused, suspended or
shut down domain has its clock reset, and so does every domain when this check was not
run for half a timeout (xenpbrd was busy capturing or restoring: not the guest's fault).
A domain is watched only after its first heartbeat, so a guest without the heartbeat
never is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from xenpbr.ctypes_libxc.xenctrl_structs import ShutdownReason
from xenpbr.hypervisor.base import DomainNotFound, Hypervisor

log = logging.getLogger(__name__)


@dataclass
class _Beat:
    name: str
    timeout: float
    value: bytes | None = None
    changed_at: float = 0.0
    armed: bool = False


class Liveness:
    """Heartbeats of the domains that asked for the check; :meth:`check` judges them."""

    def __init__(self, hypervisor: Hypervisor, read_beat: Callable[[int], bytes | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hypervisor, self.read_beat, self.clock = hypervisor, read_beat, clock
        self._beats: dict[int, _Beat] = {}
        self._checked_at: float | None = None

    def watch(self, domid: int, name: str, timeout: float) -> None:
        self._beats[domid] = _Beat(name, timeout, changed_at=self.clock())
        log.info("%s (domid %d): liveness check on, %.0f s without a heartbeat is a hang",
                 name, domid, timeout)

    def forget(self, domid: int) -> None:
        self._beats.pop(domid, None)

    @property
    def watching(self) -> list[int]:
        return sorted(self._beats)

    def check(self) -> list[int]:
        """Judge every watched domain now; return the domids declared hung (each was shut
        down with reason watchdog and is no longer watched)."""
        now = self.clock()
        away = None if self._checked_at is None else now - self._checked_at
        self._checked_at = now
        hung = []
        for domid, beat in list(self._beats.items()):
            if away is not None and away > beat.timeout / 2:
                beat.changed_at = now  # dom0 was not looking
            if self._stalled(domid, beat, now):
                self._declare_hung(domid, beat, now)
                hung.append(domid)
        return hung

    def _stalled(self, domid: int, beat: _Beat, now: float) -> bool:
        try:
            state = self.hypervisor.domain_state(domid)
        except DomainNotFound:
            self.forget(domid)
            return False
        if state.paused or state.shutdown or state.dying:
            beat.changed_at = now
            return False
        value = self.read_beat(domid)
        if value != beat.value:
            beat.value, beat.changed_at = value, now
            beat.armed = beat.armed or value is not None
            return False
        return beat.armed and now - beat.changed_at > beat.timeout

    def _declare_hung(self, domid: int, beat: _Beat, now: float) -> None:
        log.error("%s (domid %d): no heartbeat for %.1f s while it ran (limit %.0f s): "
                  "a hang; shutting it down with reason watchdog", beat.name, domid,
                  now - beat.changed_at, beat.timeout)
        self.forget(domid)
        try:
            self.hypervisor.shutdown(domid, ShutdownReason.WATCHDOG)
        except DomainNotFound:
            log.info("domain %d vanished before its shutdown", domid)
