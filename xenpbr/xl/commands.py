"""Short synchronous ``xl`` commands: create (and its ``-N`` dry run), destroy, unpause,
the ``xl list`` state letters, domid, sysrq.

Separate from :mod:`xenpbr.xl.fifo` because these commands finish on their own and only
their exit status and output matter, while ``xl save``/``xl restore`` stream through a
FIFO under a watchdog. Each function keeps the exact argv and the error behaviour its
callers have always relied on (some report a missing xl, some treat any failure as "no
such domain").
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence
from pathlib import Path

from xenpbr.xl.errors import XlFailed, XlMissing

__all__ = [
    "XL",
    "ask",
    "call",
    "create",
    "destroy",
    "domain_state",
    "domid",
    "dry_run_create",
    "failure",
    "run",
    "sysrq",
    "unpause",
]

_LOG = logging.getLogger(__name__)

XL: tuple[str, ...] = ("xl",)  #: the default command (tests and the lab substitute others)
Completed = subprocess.CompletedProcess


def call(xl: Sequence[str], *args: str, timeout: float | None) -> Completed[str]:
    """Run ``xl args`` to completion, capturing its text output; nothing is caught."""
    return subprocess.run([*xl, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def run(argv: list[str]) -> Completed[str]:
    """Run xl; a missing xl is an error saying what to install, not a traceback."""
    try:
        return call(XL, *argv, timeout=None)
    except FileNotFoundError as exc:
        raise XlMissing("`xl` was not found on PATH: xenpbr needs Xen's toolstack in dom0 "
                        "(Debian: apt install xen-utils)") from exc


def failure(what: str, proc: Completed[str], after: str) -> XlFailed:
    """An :class:`XlFailed` naming the command, xl's exit status, its message and what
    happened as a consequence (*after*)."""
    message = (proc.stderr or proc.stdout).strip()[-800:] or "(no message)"
    return XlFailed(f"{what} failed (xl exit status {proc.returncode}): {message}; {after}",
                    proc.returncode, proc.stderr)


def dry_run_create(config: Path) -> Completed[str]:
    """``xl -N create CONFIG``: xl's own check of a config, creating nothing."""
    return run(["-N", "create", str(config)])


def create(config: Path, paused: bool = False) -> Completed[str]:
    """``xl create [-p] CONFIG``."""
    return run(["create", *(["-p"] if paused else []), str(config)])


def sysrq(domain: str, key: str) -> Completed[str]:
    """``xl sysrq DOMAIN KEY`` (a missing xl raises :class:`FileNotFoundError`)."""
    return call(XL, "sysrq", domain, key, timeout=None)


def ask(xl: Sequence[str], *args: str, timeout: float) -> Completed[str] | str:
    """Run a short xl command; its result, or why it could not run."""
    try:
        return call(xl, *args, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)


def domid(xl: Sequence[str], name: str, timeout: float = 60.0) -> int | None:
    """The domid of domain ``name``, or None if there is no such domain."""
    result = ask(xl, "domid", name, timeout=timeout)
    if isinstance(result, str):
        _LOG.warning("xl domid %s failed: %s", name, result)
        return None
    text = result.stdout.strip()
    return int(text) if result.returncode == 0 and text.isdigit() else None


def destroy(xl: Sequence[str], name: str, timeout: float = 120.0) -> str | None:
    """``xl destroy name``; return None on success, else xl's message."""
    result = ask(xl, "destroy", name, timeout=timeout)
    if isinstance(result, str):
        return result
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip()


def unpause(xl: Sequence[str], name: str, timeout: float = 60.0) -> str | None:
    """``xl unpause name``; return None on success, else xl's message."""
    result = ask(xl, "unpause", name, timeout=timeout)
    if isinstance(result, str):
        return result
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip()


def domain_state(xl: Sequence[str], name: str, timeout: float = 60.0) -> str | None:
    """xl's six state letters for ``name`` (e.g. ``-b----``, ``--p---``), or None if there
    is no such domain (or xl could not be asked: callers treat that as "not running")."""
    result = ask(xl, "list", name, timeout=timeout)
    if isinstance(result, str):
        _LOG.warning("xl list %s failed: %s", name, result)
        return None
    for line in result.stdout.splitlines()[1:] if result.returncode == 0 else []:
        fields = line.split()
        if len(fields) >= 5 and fields[0] == name and len(fields[4]) == 6:
            return fields[4]
    return None


def rename(xl: Sequence[str], old: str, new: str, timeout: float = 60.0) -> str | None:
    """``xl rename old new``; return None on success, else xl's message."""
    result = ask(xl, "rename", old, new, timeout=timeout)
    if isinstance(result, str):
        return result
    return None if result.returncode == 0 else (result.stderr or result.stdout).strip()


def _info_field(xl: Sequence[str], field: str, timeout: float) -> str | None:
    """One field of ``xl info``, None if xl could not say."""
    result = ask(xl, "info", timeout=timeout)
    if isinstance(result, str) or result.returncode != 0:
        return None
    for line in result.stdout.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return None


def free_memory_mib(xl: Sequence[str], timeout: float = 60.0) -> int | None:
    """Xen's free memory in MiB (``xl info``'s ``free_memory``), None if xl could not
    say."""
    value = _info_field(xl, "free_memory", timeout)
    return int(value) if value is not None and value.isdigit() else None


def xen_commandline(xl: Sequence[str], timeout: float = 60.0) -> str | None:
    """Xen's boot command line (``xl info``'s ``xen_commandline``), None if xl could
    not say."""
    return _info_field(xl, "xen_commandline", timeout)
