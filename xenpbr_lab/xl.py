"""Domains in the lab, driven with xl inside dom0.

A :class:`LabDomain` has explicit verbs (create, wait_for_console, save_checkpoint,
restore, destroy) like Firecracker's ``Microvm``; every wait has a deadline and a
failure says which domain and which console log to read.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenpbr.domconfig import render

from .errors import LabError, LabTimeout

if TYPE_CHECKING:
    from .host import XenHost

log = logging.getLogger(__name__)

CONSOLE_DIR = "/var/log/xen/console"
DOMAIN_DIR = "/lab/domains"
_LIST_LINE = re.compile(r"^(?P<name>\S+)\s+(?P<id>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+"
                        r"(?P<state>[-rbpscdwS?]{6})\s+(?P<time>[\d.]+)")


@dataclass(frozen=True)
class XlListEntry:
    """One row of ``xl list``."""

    name: str
    domid: int
    memory_mib: int
    vcpus: int
    state: str
    cpu_time: float

    @property
    def crashed(self) -> bool:
        """Shut down with reason crash (xl shows ``s`` and ``c``)."""
        return "c" in self.state


def xl_list(host: "XenHost") -> dict[str, XlListEntry]:
    """Parse ``xl list`` into entries keyed by domain name."""
    out = host.run(["xl", "list"], timeout=60).stdout
    entries = {}
    for line in out.splitlines()[1:]:
        m = _LIST_LINE.match(line)
        if m:
            entries[m["name"]] = XlListEntry(m["name"], int(m["id"]), int(m["mem"]),
                                             int(m["vcpus"]), m["state"], float(m["time"]))
    return entries


def render_config(settings: dict[str, object]) -> str:
    """An xl config file from a dict (the same rendering ``xenpbr create`` hands xl)."""
    return render(settings)  # type: ignore[arg-type]


class LabDomain:
    """A PV guest of the lab: the busybox initramfs with Debian's kernel."""

    def __init__(self, host: "XenHost", name: str, memory_mib: int = 128, vcpus: int = 1,
                 mode: str = "shell", on_crash: str = "preserve", extra: str = "",
                 **settings: object) -> None:
        self.host = host
        self.name = name
        self.config = {
            "name": name, "type": "pv", "kernel": "/lab/vmlinuz",
            "ramdisk": "/lab/guest.cpio.gz",
            "extra": f"console=hvc0 quiet lab.mode={mode} {extra}".strip(),
            "memory": memory_mib, "vcpus": vcpus, "on_crash": on_crash, **settings}
        self.config_path = f"{DOMAIN_DIR}/{name}.cfg"
        self.console_log = f"{CONSOLE_DIR}/guest-{name}.log"

    def write_config(self) -> None:
        """Put this domain's xl config into dom0 and start a fresh console log (for
        creating it some other way than :meth:`create`, e.g. ``xenpbr create``)."""
        self.host.put(self.config_path, render_config(self.config).encode())
        self.host.run(f"rm -f {shlex.quote(self.console_log)}")

    def create(self, paused: bool = False, timeout: float = 120.0) -> float:
        """Write the config into dom0 and ``xl create`` it; return the seconds it took."""
        self.write_config()
        argv = ["xl", "create", *(["-p"] if paused else []), self.config_path]
        return self.host.run(argv, timeout=timeout).elapsed

    def entry(self) -> XlListEntry | None:
        """This domain's ``xl list`` row, or None if it does not exist."""
        return xl_list(self.host).get(self.name)

    @property
    def domid(self) -> int:
        entry = self.entry()
        if entry is None:
            raise LabError(f"domain {self.name} does not exist")
        return entry.domid

    def console(self) -> str:
        """The guest's console output so far (logged by xenconsoled)."""
        result = self.host.run(["cat", self.console_log], check=False)
        return result.stdout

    def wait_for_console(self, pattern: str, timeout: float = 120.0,
                         after: int = 0) -> re.Match[str]:
        """Wait until the console (from offset ``after``) matches the regex ``pattern``.

        The wait runs in dom0 (one round trip per second at most), not as host polling.
        """
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            text = self.console()[after:]
            match = regex.search(text)
            if match:
                return match
            if time.monotonic() > deadline:
                tail = "\n    ".join(text.splitlines()[-10:])
                raise LabTimeout(f"domain {self.name}: no console line matching {pattern!r} "
                                 f"within {timeout:.0f} s; console tail:\n    {tail}")
            time.sleep(0.5)

    def console_size(self) -> int:
        """Bytes of console output so far (an offset for later waits)."""
        out = self.host.run(f"wc -c < {shlex.quote(self.console_log)} 2>/dev/null || echo 0",
                            check=False).stdout.strip()
        return int(out or 0)

    def watch_console(self, patterns: list[str], after: int = 0, timeout: float = 120.0,
                      trigger: str | None = None) -> dict:
        """Wait in dom0 for each regex in order; return the watcher's report: ``t0`` and,
        per pattern, dom0's monotonic time when it first appeared (see
        :mod:`xenpbr_lab.console_watch`). ``trigger`` runs in dom0 right after ``t0``."""
        argv = ["python3", "-m", "xenpbr_lab.console_watch", self.console_log,
                "--after", str(after), "--timeout", str(timeout),
                *(["--trigger", trigger] if trigger else []), *patterns]
        result = self.host.run(argv, timeout=timeout + 30, check=False)
        try:
            report = json.loads(result.stdout)
        except ValueError as exc:
            raise LabError(f"console watcher failed for {self.name}: {result.stderr}") from exc
        if report["missing"]:
            raise LabTimeout(f"domain {self.name}: console never showed {report['missing']} "
                             f"within {timeout:.0f} s (console log {self.console_log})")
        return report

    def wait_for_state(self, predicate, what: str, timeout: float = 60.0) -> XlListEntry:
        """Wait until ``predicate(entry)`` holds for this domain's ``xl list`` row."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.entry()
            if entry is not None and predicate(entry):
                return entry
            if time.monotonic() > deadline:
                raise LabTimeout(f"domain {self.name} never became {what} within "
                                 f"{timeout:.0f} s (last: {entry})")
            time.sleep(0.25)

    def save_checkpoint(self, path: str, timeout: float = 300.0) -> float:
        """``xl save -c``: write a restorable image, leave the guest running."""
        return self.host.run(["xl", "save", "-c", self.name, path], timeout=timeout).elapsed

    def restore(self, path: str, paused: bool = False, timeout: float = 300.0) -> float:
        """``xl restore`` the image at ``path`` with this domain's config."""
        argv = ["xl", "restore", *(["-p"] if paused else []), self.config_path, path]
        return self.host.run(argv, timeout=timeout).elapsed

    def destroy(self) -> None:
        """``xl destroy`` if it exists (idempotent)."""
        if self.entry() is not None:
            self.host.run(["xl", "destroy", self.name], timeout=60)
