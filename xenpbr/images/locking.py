"""The store lock: many captures/readers at once, or one garbage collector.

``flock(2)`` on ``<store>/lock``: captures and restores hold it *shared* for their whole
duration, GC holds it *exclusive*. So GC never compacts a pack a restore is reading,
and never mistakes a capture in progress for an interrupted one: any unsealed pack it
finds under the exclusive lock belongs to a writer that died. The kernel drops the
lock when its holder dies, so a killed capture never blocks GC. Each acquisition opens
its own file description, so threads of one process exclude each other too.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Self

from xenpbr.images.errors import StoreBusy

_POLL = 0.05


class StoreLock:
    """One held lock; release it with :meth:`release` (or use it as a context manager)."""

    def __init__(self, path: Path, exclusive: bool, timeout: float) -> None:
        self.exclusive = exclusive
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._fd, mode)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._fd)
                    self._fd = -1
                    what = "exclusively (for GC)" if exclusive else "shared"
                    raise StoreBusy(f"could not lock {path} {what} within {timeout:.0f} s: "
                                    f"{'a capture or restore is running' if exclusive else 'GC is running'}; "
                                    "retry later") from None
                time.sleep(_POLL)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
