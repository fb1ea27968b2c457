"""Make xenconsoled's guest console logs follow a renamed domain.

xenconsoled (``--log=guest``) names each domain's log file after the domain's name when
it first sees the domain (``guest-NAME.log``), and reads the names again only when it
reopens its logs, on SIGHUP (what logrotate sends it). A standby domain
(:mod:`xenpbr.images.standby`) is seen as ``NAME--standby``; once renamed to its guest's
name, the recovered guest's console would go on into ``guest-NAME--standby.log`` while
an operator (and every tool tailing it) reads ``guest-NAME.log``. A SIGHUP right after
the rename, before the guest runs, moves it back where it belongs.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

_LOG = logging.getLogger(__name__)

COMMAND = "xenconsoled"


def pids(proc: Path = Path("/proc")) -> list[int]:
    """The pids of the running xenconsoled processes (normally one)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == COMMAND:
                found.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def reopen_logs(proc: Path = Path("/proc")) -> int:
    """Ask xenconsoled to reopen its logs under the domains' current names; how many
    processes were asked (0: none runs, nothing to do). Never raises: a console log
    under the old name is a nuisance, not a reason to fail a recovery."""
    asked = 0
    for pid in pids(proc):
        try:
            os.kill(pid, signal.SIGHUP)
            asked += 1
        except OSError as exc:
            _LOG.warning("could not ask xenconsoled (pid %d) to reopen its logs: %s", pid,
                         exc)
    return asked
