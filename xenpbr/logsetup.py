"""Log lines a reader understands: priorities for the journal, timestamps for a file.

Why: under systemd, stderr goes to the journal, which stores every line at priority
"info" unless the line starts with a ``<N>`` syslog prefix (sd-daemon(3): SD_ERR is
``<3>`` ...). Without it xenpbrd's CRITICAL "<domain> is DOWN" line was filtered out by
``journalctl -p err`` and never paged anyone. So when stderr is the journal, each line
(every line of a traceback too) carries its priority and no timestamp (the journal adds
its own); anywhere else (a terminal, the lab's log file) lines keep today's human
format with timestamps and level names.

"stderr is the journal": systemd sets ``$JOURNAL_STREAM`` to ``<device>:<inode>`` of the
stream it connected; a child that redirected stderr elsewhere inherits the variable, so
the device and inode are compared with stderr's own, as systemd.exec(5) recommends.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, TextIO

#: logging level -> syslog priority (sd-daemon(3)): crit, err, warning, info, debug.
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
              logging.INFO: 6, logging.DEBUG: 7}
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels: the next lower standard)."""
    for level in sorted(PRIORITIES, reverse=True):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


class JournalFormatter(logging.Formatter):
    """``<N>name: message``, with the prefix on every line (journald reads it per line)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(stream: TextIO | None = None,
                      environ: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` (stderr) is the journal stream systemd connected."""
    env = os.environ if environ is None else environ
    dev_ino = env.get("JOURNAL_STREAM", "")
    if not dev_ino:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
        dev, ino = (int(x) for x in dev_ino.split(":"))
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class _Handler(logging.StreamHandler):
    """Ours, so that a second :func:`setup` replaces it instead of doubling lines."""


def setup(level: str | int = "info", stream: TextIO | None = None,
          journal: bool | None = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in the format its reader
    wants: the journal's (``journal`` None: detect it) or the human one.
    Handlers that others installed (pytest's) are kept."""
    stream = stream or sys.stderr
    if journal is None:
        journal = stderr_is_journal(stream)
    handler = _Handler(stream)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
