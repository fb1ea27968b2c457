"""Run xenpbrd and the xenpbr CLI inside the lab's dom0."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .host import XenHost

STATE = "/var/lib/xenpbr"
LOG = "/var/log/xenpbrd.log"
_START = (f"rm -rf {STATE} && mkdir -p {STATE} && XENPBR_STATE_DIR={STATE} setsid python3 -m "
          f"xenpbr.daemon > {LOG} 2>&1 < /dev/null & echo $! > /run/xenpbrd.pid")
_READY = (f"for i in $(seq 150); do grep -q 'xenpbrd serving' {LOG} && exit 0; sleep 0.2; "
          f"done; cat {LOG}; exit 1")


def start(host: "XenHost") -> None:
    """Start xenpbrd with an empty state directory and wait until it serves."""
    host.run(_START)
    host.run(_READY, timeout=60)


def stop(host: "XenHost") -> str:
    """Stop xenpbrd; return its log."""
    return host.run(f"kill $(cat /run/xenpbrd.pid); sleep 0.5; cat {LOG}", check=False).stdout


def cli(host: "XenHost", *args: str, timeout: float = 120.0) -> Any:
    """Run ``xenpbr ARGS --json`` in dom0 and return the parsed JSON."""
    argv = ["env", f"XENPBR_STATE_DIR={STATE}", "python3", "-m", "xenpbr.cli", *args, "--json"]
    return json.loads(host.run(argv, timeout=timeout).stdout)
