"""Helpers for the real-Xen contract tests (``test_hypervisor_real.py``,
``test_watcher_real.py``): run ``LibxcHypervisor`` snippets in dom0, record raw domain
watch firings, run ``python -m xenpbr.watcher`` in the background, and build a guest
ramdisk whose kernel arms Xen's watchdog (``xen_wdt``) and lets it expire.

Not a test module (no ``test_`` prefix); the test files import it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import statistics
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from xenpbr_lab import kmod
from xenpbr_lab.cpio import CpioWriter
from xenpbr_lab.errors import LabTimeout
from xenpbr_lab.host import XenHost
from xenpbr_lab.xl import LabDomain

#: Prologue of every hypervisor snippet: the interface, its errors, a JSON-able state.
HV_PROLOGUE = """
import json, errno, os, subprocess, time
from xenpbr.hypervisor import *
from xenpbr.hypervisor.libxc import LibxcHypervisor
from xenpbr.ctypes_libxc import XenCtrl, ForeignMemory
from xenpbr.hypervisor.guest_memory import GuestMemory

def st(s):
    return {"domid": s.domid, "uuid": str(s.uuid), "paused": s.paused,
            "shutdown": s.shutdown, "dying": s.dying, "running": s.running,
            "blocked": s.blocked,
            "reason": s.shutdown_reason.name if s.shutdown_reason is not None else None,
            "code": s.shutdown_code, "xl_state": s.xl_state, "vcpus_online": s.vcpus_online,
            "max_vcpu_id": s.max_vcpu_id, "pages": s.memory_pages}

def err(fn, *args):
    try:
        fn(*args)
        return None
    except Exception as exc:
        return type(exc).__name__

def xl(domid):
    \"\"\"The State column `xl list` prints for domid (None if not listed).\"\"\"
    out = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines()[1:]:
        f = line.split()
        if f[1] == str(domid):
            return f[4]
    return None

def listed(hv, domid):
    return [s for s in hv.list_domains() if s.domid == domid]
"""


def hv_snippet(dom0_python: Callable[..., Any], code: str, timeout: float = 120.0) -> Any:
    """Run *code* in dom0 after :data:`HV_PROLOGUE`; return the JSON of its last line."""
    return dom0_python(HV_PROLOGUE + textwrap.dedent(code), timeout=timeout)


def create_unmonitored(guest: LabDomain, paused: bool = True) -> None:
    """``xl create -e``: no xl process waits for the domain's death. Needed when the
    domain will shut down with a code xl does not know: xl's monitor would destroy it
    ("Unknown shutdown reason code ... Destroying domain")."""
    guest.write_config()
    guest.host.run(["xl", "create", "-e", *(["-p"] if paused else []), guest.config_path])


def forget_in_xenstore(host: XenHost, domid: int) -> None:
    """Remove what libxl left in xenstore for a domain destroyed behind its back
    (``LibxcHypervisor.destroy`` is the bare hypercall, not ``xl destroy``)."""
    host.run(f"xenstore-rm /local/domain/{domid} /libxl/{domid}", check=False)


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 60.0,
               interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabTimeout(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- watch recorder

RECORDER = r'''
"""Record every @introduceDomain/@releaseDomain firing with a domain snapshot."""
import json, signal, sys, time
from xenpbr.hypervisor.libxc import LibxcHypervisor
from xenpbr.xenstore import XenstoreClient

stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
deadline = time.monotonic() + float(sys.argv[1])
with LibxcHypervisor() as hv, XenstoreClient() as xs:
    for path in ("@introduceDomain", "@releaseDomain"):
        xs.watch(path, "rec")
    # xenstored fires each watch once on registration: swallow those two.
    initial = [xs.read_watch(timeout=10) for _ in range(2)]
    print("recorder ready " + json.dumps([ev.path for ev in initial if ev]),
          file=sys.stderr, flush=True)
    while not stop and time.monotonic() < deadline:
        ev = xs.read_watch(timeout=0.25)
        if ev is None:
            continue
        t = time.monotonic()
        doms = [{"domid": s.domid, "state": s.xl_state, "code": s.shutdown_code,
                 "dying": s.dying} for s in hv.list_domains() if s.domid != 0]
        print(json.dumps({"path": ev.path, "t": t, "domains": doms}), flush=True)
print("recorder done", file=sys.stderr, flush=True)
'''


class BackgroundDom0:
    """A dom0 process started in the background; stdout and stderr go to files."""

    def __init__(self, host: XenHost, name: str, command: str, ready: str,
                 timeout: float = 30.0) -> None:
        self.host = host
        self.out, self.err, self.pidfile = (f"/tmp/{name}.out", f"/tmp/{name}.err",
                                            f"/tmp/{name}.pid")
        host.run(f"rm -f {self.out} {self.err} {self.pidfile}; "
                 f"{command} > {self.out} 2> {self.err} & echo $! > {self.pidfile}")
        self.pid = int(host.run(["cat", self.pidfile]).stdout)
        try:
            wait_until(f"{name} ready", lambda: ready in self.stderr(), timeout, 0.3)
        except LabTimeout as exc:
            raise LabTimeout(f"{exc}; stderr: {self.stderr()[-2000:]}") from exc

    def stderr(self) -> str:
        return self.host.run(["cat", self.err], check=False).stdout

    def lines(self) -> list[dict]:
        text = self.host.run(["cat", self.out], check=False).stdout
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def running(self) -> bool:
        """True while the process lives (dom0's init does not reap orphans: a zombie
        counts as exited)."""
        probe = f"grep -q '^State:.*[^Z] (' /proc/{self.pid}/status 2>/dev/null"
        return self.host.run(probe, check=False).rc == 0

    def wait_exit(self, timeout: float = 60.0) -> None:
        wait_until(f"dom0 process {self.pid} exit", lambda: not self.running(), timeout, 0.3)

    def stop(self) -> None:
        if self.running():
            self.host.run(["kill", "-TERM", str(self.pid)], check=False)
            self.wait_exit(15)


class WatchRecorder(BackgroundDom0):
    """Raw watch firings (``path``, dom0 ``t``, snapshot ``domains``) as seen in dom0."""

    def __init__(self, host: XenHost, seconds: float = 600.0) -> None:
        host.put("/tmp/xenpbr_watch_recorder.py", RECORDER.encode())
        super().__init__(host, "recorder",
                         f"python3 /tmp/xenpbr_watch_recorder.py {seconds}",
                         "recorder ready")

    def firings(self, path: str | None = None, since: float = 0.0) -> list[dict]:
        return [f for f in self.lines() if (path is None or f["path"] == path)
                and f["t"] >= since]


class WatcherCli(BackgroundDom0):
    """``python3 -m xenpbr.watcher --json`` running in dom0."""

    def __init__(self, host: XenHost, args: str, name: str = "watcher") -> None:
        super().__init__(host, name, f"python3 -m xenpbr.watcher --json {args}",
                         "xenpbr.watcher: ready")

    def events(self) -> list[dict]:
        return self.lines()


# --------------------------------------------------------------------------- watchdog guest

WDT_RAMDISK = "/lab/guest-wdt.cpio.gz"
WDT_INIT = "/lab-wdt-init.sh"


def _sysroot() -> Path:
    libdir = os.environ.get("XENPBR_TEST_LIBDIR")
    if libdir:
        return Path(libdir).parents[2]
    from xenpbr_lab.build import unpacked_sysroot
    return unpacked_sysroot()[0]


def install_watchdog_ramdisk(host: XenHost, kernel_version: str) -> str:
    """Put a guest ramdisk into dom0 that loads ``xen_wdt`` and arms the watchdog.

    The lab guest image has no watchdog driver, so the driver (and the watchdog core it
    needs) is appended as a second cpio archive, with an ``rdinit`` wrapper that loads
    them and starts the real ``/init``. The guest arms the watchdog when it sees
    ``lab.wdt=<seconds>`` on its command line: it opens ``/dev/watchdog``, writes once and
    closes without the magic ``V``, so the watchdog keeps running unfed and Xen shuts the
    domain down with reason watchdog ``<seconds>`` later (``SCHEDOP_watchdog``).
    Use ``extra=f"rdinit={WDT_INIT} lab.wdt=2"`` and ``ramdisk=WDT_RAMDISK``.
    """
    if host.run(["test", "-s", WDT_RAMDISK], check=False).rc == 0:
        return WDT_RAMDISK  # already built in this dom0
    root = _sysroot() / "lib/modules" / kernel_version
    order = kmod.load_order(["xen_wdt"], root)
    script = ["#!/bin/sh", "export PATH=/usr/bin:/usr/sbin:/bin:/sbin",
              "mount -t proc proc /proc",
              "secs=$(sed -n 's/.*lab.wdt=\\([0-9]*\\).*/\\1/p' /proc/cmdline)",
              "umount /proc"]
    for ko in order:
        param = " timeout=${secs:-60}" if ko.stem == "xen_wdt" else ""
        script.append(f"insmod /lib/modules/{kernel_version}/{ko.relative_to(root)}{param}")
    script += [
        "if [ -n \"$secs\" ]; then (",
        "  while [ ! -e /dev/watchdog ] || [ ! -e /dev/hvc0 ]; do sleep 0.2; done",
        "  sleep 1",
        "  echo \"XENPBR-GUEST: arming watchdog timeout=$secs\" > /dev/hvc0",
        "  printf x > /dev/watchdog",
        ") & fi",
        "exec /init",
    ]
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", mtime=0) as gz:
        writer = CpioWriter(gz)  # type: ignore[arg-type]
        for ko in order:
            writer.file(f"lib/modules/{kernel_version}/{ko.relative_to(root)}", ko.read_bytes())
        writer.file(WDT_INIT.lstrip("/"), ("\n".join(script) + "\n").encode(), 0o755)
        writer.close()
    extra = buf.getvalue()
    host.put("/tmp/wdt-extra.cpio.gz", extra)
    # Linux unpacks concatenated archives; pad the first to 4 bytes.
    host.run(f"cat /lab/guest.cpio.gz > {WDT_RAMDISK}.tmp && "
             f"size=$(wc -c < {WDT_RAMDISK}.tmp) && "
             f"head -c $(( (4 - size % 4) % 4 )) /dev/zero >> {WDT_RAMDISK}.tmp && "
             f"cat /tmp/wdt-extra.cpio.gz >> {WDT_RAMDISK}.tmp && "
             f"mv {WDT_RAMDISK}.tmp {WDT_RAMDISK}")
    return WDT_RAMDISK


def watchdog_guest_settings(seconds: int, ramdisk: str) -> dict[str, object]:
    """LabDomain kwargs for a guest whose watchdog expires *seconds* after it arms it."""
    return {"ramdisk": ramdisk, "extra": f"rdinit={WDT_INIT} lab.wdt={seconds}",
            "on_watchdog": "preserve"}


# --------------------------------------------------------------------------- figures

def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p90 of 10 values is the 9th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": statistics.median(values),
            "p90": percentile(values, 90), "min": min(values), "max": max(values)}


# --------------------------------------------------------------------------- the agent

AGENT_LINE = r"XENPBR-AGENT: (\S+) (\S+) rc=(\d+)"


def agent_verdicts(guest: LabDomain, count: int, after: int = 0,
                   timeout: float = 300) -> list[tuple[str, str, int]]:
    """The first ``count`` ``(phase, verdict, rc)`` the guest's agent printed after
    console offset ``after`` (waiting for them)."""
    guest.wait_for_console(r"(?s)(?:%s.*?){%d}" % (AGENT_LINE, count), after=after,
                           timeout=timeout)
    found = re.findall(AGENT_LINE, guest.console()[after:])
    return [(p, v, int(rc)) for p, v, rc in found[:count]]


def assert_disks_consistent(report: dict[str, Any], cycles: int) -> None:
    """What a consistency proof's report (``xenpbr_lab.consistency``) must say after
    ``cycles`` crashes: each recovered from the app phase, the writer ran, no
    acknowledged record lost or doubled, both disks clean, the logger works again."""
    assert report["cycles"] == cycles, report
    assert report["recovered_by_phase_app"] == cycles, report  # never a normal reboot
    assert report["acked_records"] > cycles, report  # the writer ran in every cycle
    assert report["lost_records"] == 0 and report["duplicate_records"] == 0, report
    assert report["fsck_root_clean"] and report["fsck_data_clean"], report
    assert report["logger_after_restore_works"], report
