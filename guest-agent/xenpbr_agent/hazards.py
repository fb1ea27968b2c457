"""Find the processes that would be unsafe to keep in a restartable image.

A process that lives in an image is resumed, after a restore, with the file offsets it
had when the image was taken. For a file on a disk that the restore does *not* revert (a
``persistent`` disk), a process that writes at its own offset, without ``O_APPEND``,
would then overwrite whatever was written there after the image point: auditd is the
classic case. Such open files are *hazards*: the agent reports each one in its boundary
request and dom0, which knows each disk's policy, refuses the capture and names the
process and the file (docs/consistency.md).

:func:`writers_on` lists every writer on one device, ``O_APPEND`` or not: when dom0
refuses a boundary because a ``persistent`` disk is mounted read-write, the agent names
the processes writing there (auditd, which appends, is the seeds' example).

Read from ``/proc``: ``/proc/PID/fd/N`` (the path) and ``/proc/PID/fdinfo/N`` (``flags:``
in octal, and ``mnt_id:``). The block device is the open file's own ``st_dev``, named
through ``/sys/dev/block/MAJ:MIN``: a service with its own mount namespace (systemd's
``ProtectSystem=``, ``PrivateTmp=``..., auditd on Debian 12) has mount ids the agent's
``mountinfo`` does not know, which once hid auditd on the lab's Debian guest. Where the
file cannot be stat'ed, the ``mnt_id`` is matched through ``/proc/self/mountinfo``.
Processes that vanish while being read are skipped; nothing here needs root beyond what
the agent already has. Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xenpbr.guestproto.wire import HAZARD, MAX_HAZARDS

O_ACCMODE, O_WRONLY, O_RDWR, O_APPEND = 0o3, 0o1, 0o2, 0o2000
SYS_DEV_BLOCK = "/sys/dev/block"


@dataclass(frozen=True)
class OpenWrite:
    """A regular file some process has open for writing (without ``O_APPEND`` when it
    comes from :func:`scan`)."""

    pid: int
    comm: str
    path: str
    dev: str  # the block device it lives on (xvdb, xvdb1, dm-0), "" if none

    def encode(self) -> str:
        """The request's hazard string: ``<dev> <pid> <comm> <path>`` (path last: it may
        hold spaces), cut to what the protocol allows."""
        comm = "".join(c if c.isprintable() and c.isascii() and c != " " else "?"
                       for c in self.comm) or "?"
        path = self.path.encode("ascii", "backslashreplace").decode()
        return f"{self.dev} {self.pid} {comm} {path}"[:128]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:  # the process or fd vanished, or is not ours to read
        return None


def _mount_devices(proc_pid: Path) -> dict[int, str]:
    """mnt_id -> block device name, from ``mountinfo`` (``-`` separates the optional
    fields; the source follows the file system type)."""
    devices: dict[int, str] = {}
    for line in (_read(proc_pid / "mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and fields and len(tail) >= 2 and tail[1].startswith("/dev/"):
            devices[int(fields[0])] = os.path.basename(os.path.realpath(tail[1]))
    return devices


def _device_of(fd_path: Path) -> str:
    """The block device holding the file open at ``fd_path`` (``/proc/PID/fd/N``), from
    its ``st_dev``; "" if it cannot be told (not on a block device, or gone)."""
    try:
        dev = os.stat(fd_path).st_dev
        link = os.readlink(f"{SYS_DEV_BLOCK}/{os.major(dev)}:{os.minor(dev)}")
    except OSError:
        return ""
    return os.path.basename(link)


def _fd_flags(fdinfo: str) -> tuple[int, int] | None:
    """``(flags, mnt_id)`` from an fdinfo text."""
    values = dict(line.split(":", 1) for line in fdinfo.splitlines() if ":" in line)
    try:
        return int(values["flags"].strip(), 8), int(values.get("mnt_id", "-1").strip())
    except (KeyError, ValueError):
        return None


def _open_writes(pid_dir: Path, devices: dict[int, str], *,
                 append_too: bool) -> list[OpenWrite]:
    """One process's regular files open for writing: without ``O_APPEND`` only (its
    hazards), or with ``append_too`` all of them."""
    comm = (_read(pid_dir / "comm") or "?").strip()
    found: list[OpenWrite] = []
    try:
        fds = sorted(os.listdir(pid_dir / "fd"), key=lambda n: int(n) if n.isdigit() else -1)
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(pid_dir / "fd" / fd)
        except OSError:
            continue
        info = _fd_flags(_read(pid_dir / "fdinfo" / fd) or "")
        if not target.startswith("/") or target.startswith("/dev/") or info is None:
            continue  # pipes, sockets, devices: no file offset on a disk
        flags, mnt_id = info
        if flags & O_ACCMODE in (O_WRONLY, O_RDWR) and (append_too or not flags & O_APPEND):
            dev = _device_of(pid_dir / "fd" / fd) or devices.get(mnt_id, "")
            found.append(OpenWrite(int(pid_dir.name), comm, target, dev))
    return found


def _all_open_writes(proc: str, skip_pids: frozenset[int],
                     append_too: bool) -> list[OpenWrite]:
    """:func:`_open_writes` of every process but ``skip_pids``, in pid order."""
    root = Path(proc)
    devices = _mount_devices(root / "self")
    found: list[OpenWrite] = []
    for pid in sorted(int(n) for n in os.listdir(root) if n.isdigit()):
        if pid not in skip_pids:
            found += _open_writes(root / str(pid), devices, append_too=append_too)
    return found


def scan(proc: str = "/proc", skip_pids: frozenset[int] = frozenset()) -> list[OpenWrite]:
    """Every regular file on a block device open for writing without ``O_APPEND``, by
    any process but ``skip_pids`` (the agent itself), in pid order."""
    return [w for w in _all_open_writes(proc, skip_pids, append_too=False) if w.dev]


def writers_on(dev: str, proc: str = "/proc",
               skip_pids: frozenset[int] = frozenset()) -> list[OpenWrite]:
    """Every file on block device ``dev`` open for writing, appending or not, by any
    process but ``skip_pids``, in pid order."""
    return [w for w in _all_open_writes(proc, skip_pids, append_too=True) if w.dev == dev]


def hazard_strings(found: list[OpenWrite]) -> tuple[str, ...]:
    """The request's ``hazards`` list: valid strings, at most the protocol's limit (the
    first ones; one is enough for dom0 to refuse, and the count goes to the log)."""
    encoded = [w.encode() for w in found]
    return tuple(h for h in encoded if HAZARD.fullmatch(h))[:MAX_HAZARDS]
