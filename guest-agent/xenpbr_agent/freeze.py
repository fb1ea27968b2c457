"""Freezing the guest's file systems for the length of one boundary (``FIFREEZE``).

Dom0 snapshots the disks whose policy is ``snapshot`` between capturing the memory image
and writing the ack, and refuses a boundary where such a disk is mounted read-write but
not frozen: a file system that is frozen has flushed everything and accepts no writes,
so the snapshot is clean and matches the image. The agent therefore freezes every
read-write disk before it writes the request and thaws it after it reads the ack.

After a restore, the restored kernel's memory still shows the file systems frozen (the
image was taken while they were) and the process that waited for the ack is the one that
goes on: it thaws them on the very same path.

Rules (``frozen``):

* one freeze per super block: a second mount of the same device (a bind mount) shares
  the first one's outcome;
* ``EBUSY``: someone else froze it already. It is frozen, but not ours to thaw;
* ``EOPNOTSUPP``/``ENOTTY``/``EINVAL``: the file system cannot freeze (tmpfs, ...). It is
  reported not frozen and dom0 decides;
* a file system holding a regular file this process writes its output to (stdout,
  stderr) is not frozen: our own log line would block until the thaw, which never comes;
* any other error thaws what was frozen and raises :class:`AgentError`;
* thawing runs in reverse order whatever happens (exceptions, Ctrl-C, SIGTERM); a thaw
  error is logged, never raised.

While frozen, nothing the agent does may write to a disk: its state lives in ``/run``
(saved before freezing and after thawing), and Python does not write ``.pyc`` files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, Protocol

from xenpbr_agent import AgentError

log = logging.getLogger(__name__)

#: ``_IOWR('X', 119, int)`` and ``_IOWR('X', 120, int)`` (linux/fs.h).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878

#: errnos of a file system that cannot be frozen at all.
CANNOT_FREEZE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL})


class Freezer(Protocol):
    """What :func:`frozen` needs from the kernel; tests pass a fake."""

    def device(self, mount: str) -> int:
        """The device number of the file system mounted at ``mount`` (``st_dev``)."""

    def ioctl(self, mount: str, request: int) -> None:
        """Issue ``request`` (FIFREEZE, FITHAW) on ``mount``; raises OSError."""

    def output_devices(self) -> set[int]:
        """Devices holding regular files this process writes its output to."""


class KernelFreezer:
    """The real thing: ioctls on a descriptor of the mount point (needs CAP_SYS_ADMIN)."""

    def device(self, mount: str) -> int:
        return os.stat(mount).st_dev

    def ioctl(self, mount: str, request: int) -> None:
        fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, request, 0)
        finally:
            os.close(fd)

    def output_devices(self) -> set[int]:
        devices = set()
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode):
                    devices.add(st.st_dev)
        return devices


KERNEL = KernelFreezer()


def _freeze_one(freezer: Freezer, mount: str) -> bool | None:
    """Freeze ``mount``: True if we froze it, False if someone else had, None if it
    cannot be frozen. Other errors raise :class:`AgentError`."""
    try:
        freezer.ioctl(mount, FIFREEZE)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            log.info("%s is already frozen by someone else: counted frozen, left to them",
                     mount)
            return False
        if exc.errno in CANNOT_FREEZE:
            log.warning("%s: this file system cannot be frozen (%s); reported not frozen, "
                        "dom0 decides", mount, os.strerror(exc.errno or 0))
            return None
        hint = ("run xenpbr-agent as root (FIFREEZE needs CAP_SYS_ADMIN)"
                if exc.errno == errno.EPERM else "unmount it or fix it before this boundary")
        raise AgentError(f"cannot freeze the file system on {mount}: "
                         f"{exc.strerror or exc}; {hint}") from None
    return True


def _thaw_one(freezer: Freezer, mount: str) -> None:
    """Thaw ``mount``; errors are logged (the boundary's outcome matters more)."""
    try:
        freezer.ioctl(mount, FITHAW)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            log.warning("%s was not frozen any more when the agent thawed it", mount)
        else:
            log.error("cannot thaw %s: %s; thaw it by hand ('fsfreeze --unfreeze %s')",
                      mount, exc.strerror or exc, mount)


def _device(freezer: Freezer, mount: str) -> int:
    try:
        return freezer.device(mount)
    except OSError as exc:
        raise AgentError(f"cannot stat mount point {mount} to freeze it: "
                         f"{exc.strerror or exc}") from None


def _freeze_all(mounts: Iterable[str], freezer: Freezer, ours: list[str],
                done: set[str]) -> None:
    """Freeze each super block once, in order; appends what we froze to ``ours`` (for
    the thaw) and every mount point whose file system is now frozen to ``done``."""
    outcome: dict[int, bool] = {}  # device -> frozen (by us or someone else)
    busy = freezer.output_devices()
    for mount in mounts:
        dev = _device(freezer, mount)
        if dev not in outcome:
            outcome[dev] = _freeze_new(freezer, mount, dev in busy, ours)
        if outcome[dev]:
            done.add(mount)


def _freeze_new(freezer: Freezer, mount: str, busy: bool, ours: list[str]) -> bool:
    """Freeze a super block not seen yet; True if it is frozen now."""
    if busy:
        log.warning("%s holds this process's stdout/stderr (a regular file): not frozen, "
                    "or our own log would block; send the agent's output elsewhere "
                    "(journal, console)", mount)
        return False
    ours.append(mount)  # before the ioctl: a Ctrl-C just after it must still thaw
    try:
        result = _freeze_one(freezer, mount)
    except AgentError:
        ours.pop()
        raise
    if not result:
        ours.pop()  # someone else's, or not frozen at all
    return result is not None


def _thaw_all(mounts: list[str], freezer: Freezer) -> None:
    """Thaw ``mounts`` in reverse order; an interrupt in between still thaws the rest."""
    pending: KeyboardInterrupt | SystemExit | None = None
    for mount in reversed(mounts):
        try:
            _thaw_one(freezer, mount)
        except (KeyboardInterrupt, SystemExit) as exc:  # Ctrl-C, SIGTERM: thaw the rest
            pending = pending or exc
    if pending is not None:
        raise pending


@contextlib.contextmanager
def _quiet_window() -> Iterator[None]:
    """While frozen: no ``.pyc`` writes (an import would block on the frozen disk) and
    SIGTERM raises SystemExit, so systemd's stop still runs the thaw."""
    saved_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    main = threading.current_thread() is threading.main_thread()
    saved_term: Any = signal.signal(signal.SIGTERM, _terminate) if main else None
    try:
        yield
    finally:
        sys.dont_write_bytecode = saved_bytecode
        if main:
            signal.signal(signal.SIGTERM,
                          signal.SIG_DFL if saved_term is None else saved_term)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def frozen(mount_points: Iterable[str], freezer: Freezer | None = None,
           clock: Callable[[], float] = time.monotonic) -> Iterator[set[str]]:
    """Freeze the file systems at ``mount_points`` (in order) for the ``with`` body;
    yields the mount points whose file system is frozen. Thaws what it froze, in reverse
    order, however the body ends. ``freezer`` None: :data:`KERNEL`, looked up at call
    time so tests can replace it module-wide."""
    freezer = KERNEL if freezer is None else freezer
    ours: list[str] = []
    done: set[str] = set()
    start = clock()
    with _quiet_window():
        try:
            _freeze_all(mount_points, freezer, ours, done)
            if done:
                log.info("frozen for this boundary: %s", ", ".join(sorted(done)))
            yield set(done)
        finally:
            _thaw_all(ours, freezer)
            if ours:
                log.info("thawed %s after %.3f s frozen", ", ".join(reversed(ours)),
                         clock() - start)
