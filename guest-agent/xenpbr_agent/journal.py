"""Keep systemd-journald off the disks while the agent has them frozen.

journald writes every log line to ``/var/log/journal``. With the root file system frozen
for a boundary (:mod:`xenpbr_agent.freeze`), its next write blocks in the kernel, in an
uninterruptible sleep that the kernel's task freezer cannot interrupt; ``xl save``
suspends the guest through that freezer, which gives up after 20 s, and dom0's capture
then fails with "guest did not suspend" (seen in the lab's Debian guest at every
boundary). So, around the freeze, journald is asked to write to ``/run/log/journal``
instead (``journalctl --relinquish-var``) and, after the thaw, to move back and flush
(``journalctl --flush``): the lines of the window are kept, in order.

Nothing happens on a guest without journald (busybox, sysvinit) or without a persistent
journal. A failure is logged, never raised: the boundary goes on (and may then fail to
capture, which dom0 reports).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

SOCKET = "/run/systemd/journal/socket"
PERSISTENT = "/var/log/journal"

Runner = Callable[[Sequence[str]], int]


def _run(argv: Sequence[str]) -> int:
    """Run ``argv`` without a shell; its exit status (127 if it cannot be started)."""
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, check=False)
    except OSError as exc:
        log.warning("%s: %s", argv[0], exc)
        return 127
    if done.returncode != 0:
        log.warning("%s failed (%d): %s", " ".join(argv), done.returncode,
                    done.stderr.strip()[:300])
    return done.returncode


def journald_persistent(socket: str | None = None, persistent: str | None = None) -> bool:
    """True if journald runs and keeps its journal on disk (the paths: :data:`SOCKET`
    and :data:`PERSISTENT`, read at call time so tests can point them elsewhere)."""
    return (os.path.exists(SOCKET if socket is None else socket)
            and os.path.isdir(PERSISTENT if persistent is None else persistent))


@contextlib.contextmanager
def off_the_disks(active: bool, run: Runner = _run) -> Iterator[None]:
    """Journald writes to ``/run`` for the ``with`` body (``active``: journald keeps a
    persistent journal); back to ``/var``, flushed, however the body ends."""
    moved = active and run(["journalctl", "--relinquish-var"]) == 0
    if moved:
        log.info("journald writes to /run/log/journal while the disks are frozen")
    try:
        yield
    finally:
        if moved:
            run(["journalctl", "--flush"])
