"""Run xenpbrd and the xenpbr CLI inside the lab's dom0."""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .host import XenHost

STATE = "/var/lib/xenpbr"
LOG = "/var/log/xenpbrd.log"
_START = (f"rm -rf {STATE} && mkdir -p {STATE} && XENPBR_STATE_DIR={STATE} setsid python3 -m "
          f"xenpbr.xenpbrd > {LOG} 2>&1 < /dev/null & echo $! > /run/xenpbrd.pid")
_READY = (f"for i in $(seq 150); do grep -q 'xenpbrd serving' {LOG} && exit 0; sleep 0.2; "
          f"done; cat {LOG}; exit 1")


def start(host: "XenHost", fresh: bool = True) -> None:
    """Start xenpbrd and wait until it serves: with an empty state directory, or
    (``fresh=False``) with the state a previous xenpbrd left, as after a crash of it."""
    if fresh:
        host.run(_START)
        host.run(_READY, timeout=60)
        return
    served = log_text(host).count("xenpbrd serving")
    host.run(_START.replace(f"rm -rf {STATE} && ", "").replace(f"> {LOG}", f">> {LOG}"))
    wait_for_log(host, "xenpbrd serving", timeout=60, count=served + 1)


def kill(host: "XenHost") -> None:
    """SIGKILL xenpbrd: no cleanup of any kind runs (the children it started live on)."""
    host.run(_ALIVE + "pid=$(cat /run/xenpbrd.pid); kill -9 $pid; "
             "while alive; do sleep 0.05; done", timeout=30)
    host.run(f"echo '---- xenpbrd killed (SIGKILL) ----' >> {LOG}")


def wait_for_log(host: "XenHost", pattern: str, timeout: float = 120.0,
                 count: int = 1) -> None:
    """Wait until ``pattern`` (an ERE) appears ``count`` times in xenpbrd's log."""
    host.run(f"i=0; while [ $(grep -cE {shlex.quote(pattern)} {LOG}) -lt {count} ]; do "
             f"i=$((i+1)); [ $i -gt {int(timeout * 10)} ] && exit 1; sleep 0.1; done",
             timeout=timeout + 10)


#: xenpbrd's log line when it destroyed a crashed domain it had set aside until the
#: guest reported ready (xenpbr.controller.aftermath).
ASIDE_DESTROYED = r"{name}: destroyed {name}--crashed \(the guest reported ready\)"

#: xenpbrd's log line when a domain's standby is ready (xenpbr.images.standby.prepare).
STANDBY_READY = r"standby of {name}/{image} ready as {name}--standby "


def newest_image(host: "XenHost", name: str) -> str:
    """The id of the domain's newest image (``xenpbr images``)."""
    return max((r["image"] for r in cli(host, "images", name) if r.get("image")), default="")


def wait_for_standby(host: "XenHost", name: str, count: int = 1,
                     timeout: float = 600.0) -> None:
    """Until xenpbrd has prepared ``count`` standby domains of ``name``'s newest image in
    all (a standby of an earlier phase's image, prepared before the guest reached its
    last boundary, does not count)."""
    wait_for_log(host, STANDBY_READY.format(name=name, image=newest_image(host, name)),
                 timeout=timeout, count=count)


def log_text(host: "XenHost") -> str:
    return host.run(["cat", LOG], check=False).stdout


#: Shell: true while process $pid exists and is not a zombie (dom0's init does not reap
#: the daemons the control server orphans, so `kill -0` alone would never turn false).
_ALIVE = ('alive() { [ -e /proc/$pid ] && [ "$(cut -d" " -f3 /proc/$pid/stat 2>/dev/null)" '
          '!= Z ]; }; ')


def stop(host: "XenHost", grace: float = 60.0) -> str:
    """Stop xenpbrd (SIGTERM: it finishes the capture or recovery under way, then exits;
    SIGKILL after ``grace`` seconds) and wait until it is gone, so that the next test's
    xenpbrd never runs beside it; return its log."""
    host.run(_ALIVE + "pid=$(cat /run/xenpbrd.pid); kill $pid 2>/dev/null; i=0; "
             f"while alive && [ $i -lt {int(grace * 10)} ]; do "
             "sleep 0.1; i=$((i+1)); done; kill -9 $pid 2>/dev/null; "
             "while alive; do sleep 0.05; done",
             check=False, timeout=grace + 30)
    return log_text(host)


def cli(host: "XenHost", *args: str, timeout: float = 120.0) -> Any:
    """Run ``xenpbr ARGS --json`` in dom0 and return the parsed JSON."""
    argv = ["env", f"XENPBR_STATE_DIR={STATE}", "python3", "-m", "xenpbr.cli", *args, "--json"]
    return json.loads(host.run(argv, timeout=timeout).stdout)


def running(host: "XenHost") -> bool:
    """True if the xenpbrd started last is alive (not a zombie)."""
    return host.run(_ALIVE + "pid=$(cat /run/xenpbrd.pid); alive", check=False).rc == 0


def rss_mib(host: "XenHost") -> float | None:
    """xenpbrd's resident memory in MiB (``VmRSS``), None if it is not running: what
    dom0 spends in the daemon itself (decoded manifests kept, buffers), apart from the
    store and the hot streams on disk or tmpfs."""
    out = host.run("pid=$(cat /run/xenpbrd.pid); grep '^VmRSS:' /proc/$pid/status",
                   check=False)
    fields = out.stdout.split()
    if out.rc != 0 or len(fields) < 2 or not fields[1].isdigit():
        return None
    return round(int(fields[1]) / 1024, 1)
