"""After a phase-based reboot: what waits until the restored guest reports ready.

Separate because it is the one part of a recovery that runs after the guest has its
service back. Two pieces of work follow a recovery: destroying the crashed domain it
set aside (:mod:`xenpbr.recovery`, "The crashed domain set aside") and warming the
domain's newest image up again (its hot stream, and the standby the recovery used up).
Both take dom0's CPU and Xen's: Xen scrubs the crashed domain's memory, dom0's hotplug
scripts tear its backends down, a standby is a whole restore. Done right after the
unpause they ran while the guest reconnected its devices on the same CPUs (at 128 MiB
in the lab, the destroy took 0.5-0.9 s after the ack). Held until the guest is ready,
the 128 MiB bench went from 1.52x to 1.44x `xl restore`'s downtime: within the
machine's noise, but the work is off the guest's path and a standby's replacement no
longer competes with its resume (docs/benchmarks/README.md).

So the daemon holds them for each recovered domain until the first of:

- the guest's agent reports ``ready`` or ``steps-failed`` (its after-restore steps ran);
- :data:`GRACE_S` after the hand-over: an agent that never reports must not keep a
  crashed domain's memory, nor its domain without a standby, for long;
- another recovery starts: its restore may need the memory, so every crashed domain
  held aside is destroyed first (its warm-up stays held);
- xenpbrd stops: the crashed domains go, the warm-ups are not started.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

#: The longest a recovered domain's aftermath waits for its guest's ``ready``, in seconds.
GRACE_S = 60.0


@dataclass
class _Held:
    aside: str | None  # the crashed domain, renamed and still there
    deadline: float


class Aftermath:
    """The held aftermath of each recovered domain, and when it runs."""

    def __init__(self, destroy: Callable[[str, str], None], warm: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic,
                 grace_s: float = GRACE_S) -> None:
        """``destroy(name, aside)`` destroys a set-aside domain and logs a failure;
        ``warm(name)`` warms the domain's newest image up (neither may raise)."""
        self.destroy, self.warm, self.clock, self.grace_s = destroy, warm, clock, grace_s
        self._held: dict[str, _Held] = {}

    def hold(self, name: str, aside: str | None) -> None:
        """``name`` was just handed back to its guest; ``aside`` is its crashed domain,
        if the recovery left it set aside."""
        self._held[name] = _Held(aside, self.clock() + self.grace_s)
        if aside is not None:
            log.info("%s: %s waits until the guest reports ready (at most %.0f s)", name,
                     aside, self.grace_s)

    def holding(self, name: str) -> bool:
        """True while ``name``'s aftermath waits (its warm-up must not start early)."""
        return name in self._held

    def guest_ready(self, name: str) -> None:
        """The guest reported its after-restore steps done: run its aftermath now."""
        self._settle(name, "the guest reported ready")

    def settle_due(self) -> None:
        """Run the aftermath of every domain whose guest did not report in time."""
        now = self.clock()
        for name in [n for n, held in self._held.items() if held.deadline <= now]:
            self._settle(name, f"no ready from the guest within {self.grace_s:.0f} s")

    def free_memory(self) -> None:
        """A recovery starts: destroy every crashed domain held aside (its restore may
        need the memory); the warm-ups stay held."""
        for name, held in self._held.items():
            self._destroy(name, held, "another recovery starts")

    def stop(self) -> None:
        """xenpbrd stops: destroy every crashed domain held aside, start no warm-up."""
        for name, held in self._held.items():
            self._destroy(name, held, "xenpbrd stops")
        self._held.clear()

    def _settle(self, name: str, why: str) -> None:
        held = self._held.pop(name, None)
        if held is None:
            return
        self._destroy(name, held, why)
        self.warm(name)

    def _destroy(self, name: str, held: _Held, why: str) -> None:
        if held.aside is None:
            return
        start = self.clock()
        self.destroy(name, held.aside)
        log.info("%s: destroyed %s (%s) in %.2f s", name, held.aside, why,
                 self.clock() - start)
        held.aside = None
