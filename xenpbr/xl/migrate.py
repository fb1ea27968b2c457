"""Live capture: ``xl migrate`` to a local recorder that never starts the domain.

``xl save -c`` suspends the guest for the whole copy of its memory. ``xl migrate`` copies
memory while the guest runs (libxl's ``LIBXL_SUSPEND_LIVE``: passes over the pages the
guest dirtied, then a short suspend for the last ones), and with ``-s ""`` its "host"
argument is a shell command xl runs with the stream on its stdin and the receiver's
answers read from its stdout (``create_migration_child`` in Xen's tools/xl/xl_migrate.c).

The recorder is that command, in plain ``sh``:

1. it prints xl's receiver banner (xl reads it before sending anything);
2. a background ``cat`` copies the stream (the same bytes as an ``xl save`` file: the xl
   header with the domain's config, then the libxl stream) into our FIFO;
3. in the foreground ``cat`` holds its stdout, xl's answer channel, open on a *release*
   FIFO that we hold open. xl, having sent the whole stream with the guest suspended,
   waits there for the receiver's "ready" message.

We read the stream up to its END record, take the disk snapshots while the guest is
still suspended, then close the release FIFO: the foreground ``cat`` exits without a
word, xl reads EOF instead of "ready" and takes its failure path, which resumes the
guest where it is (``libxl_domain_resume`` with ``suspend_cancel``: the same resume as
``xl save -c``) and exits 1 after printing :data:`RESUMED_AT_SENDER`. That exit is the
success of a live capture; every other outcome is a failure (see :func:`check_outcome`).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

#: What xl's migration receiver prints first (``migrate_receiver_banner`` in xl.h).
BANNER = "xl migration receiver ready, send binary domain data."
#: What xl prints when the receiver went away after the stream: the guest is resumed.
RESUMED_AT_SENDER = "Migration failed, resuming at sender."
#: libxc's message when Xen cannot track the pages a PV guest dirties: a hypervisor built
#: without ``CONFIG_SHADOW_PAGING`` (Debian 12's xen-hypervisor-4.17-amd64 is) has no
#: log-dirty mode for PV guests, so no live migration and no live capture of them. The
#: guest was never suspended: a capture falls back to ``xl save -c``.
LOGDIRTY_UNSUPPORTED = "Failed to enable logdirty"
#: xl's messages for a suspend that failed (the stream is incomplete; the guest was
#: resumed by xl's own failure path or never suspended).
SUSPEND_FAILED = "libxl_domain_suspend failed"


class Recorder:
    """The receiving end of one ``xl migrate``: the stream FIFO, the release FIFO and the
    command xl runs. Use as a context manager: leaving it releases xl in every case, so a
    failure on our side never leaves the guest suspended."""

    def __init__(self, directory: Path) -> None:
        self.stream = directory / "stream"
        self._release_path = directory / "release"
        os.mkfifo(self.stream, 0o600)
        os.mkfifo(self._release_path, 0o600)
        # read-write: opening never blocks, and the recorder's cat finds a writer and waits
        # in read() until this descriptor closes (its only writer): that is the release
        self._release_fd: int | None = os.open(self._release_path, os.O_RDWR | os.O_CLOEXEC)

    def rune(self) -> str:
        """The shell command for ``xl migrate -s "" DOMAIN <rune>``. fd 3 keeps xl's stream
        for the background ``cat``: sh gives an asynchronous command /dev/null as stdin."""
        stream, release = shlex.quote(str(self.stream)), shlex.quote(str(self._release_path))
        return (f"printf '%s\\n' {shlex.quote(BANNER)} && exec 3<&0 && "
                f"{{ cat <&3 >{stream} 3<&- & }} && exec cat {release} 3<&-")

    def release(self) -> None:
        """Let xl go on (and resume the guest); idempotent."""
        if self._release_fd is not None:
            os.close(self._release_fd)
            self._release_fd = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_outcome(returncode: int | None, output: str) -> str | None:
    """Why this ``xl migrate`` run is not a complete live capture (None: it is one).

    Success is the failure path xl takes when the receiver leaves after the stream: exit
    status 1 with :data:`RESUMED_AT_SENDER`, and no failed suspend before it."""
    if LOGDIRTY_UNSUPPORTED in output:
        return ("this Xen cannot track the pages a PV guest dirties (log-dirty mode: Xen "
                "built without CONFIG_SHADOW_PAGING)")
    if SUSPEND_FAILED in output:
        return "the live save failed (xl: libxl_domain_suspend failed)"
    if returncode == 0:
        return "xl reported a completed migration: the domain may have been destroyed"
    if returncode != 1 or RESUMED_AT_SENDER not in output:
        return f"xl did not resume the domain after the stream (exit status {returncode})"
    return None
