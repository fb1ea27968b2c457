"""Timestamp console events inside dom0, where they happen.

Polling a guest console log from the host costs a control-channel round trip per look and
blurs timings by that much. This module runs *in dom0*: it follows a console log file and
records dom0's monotonic clock the moment each pattern first appears (after an optional
byte offset), then prints one JSON object. Standard library only.

    python3 -m xenpbr_lab.console_watch LOG [--after N] [--timeout S] [--trigger CMD]
        PATTERN [PATTERN ...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

POLL_SECONDS = 0.02


def watch(path: str, patterns: list[str], after: int, timeout: float,
          trigger: str | None = None) -> dict[str, object]:
    """Wait for each pattern in order; return their dom0 times and captured groups.

    ``trigger`` (a shell command) runs after the start time ``t0`` is taken, so a
    measured interval can start at the very action that causes the events.
    """
    t0 = time.monotonic()
    trigger_rc = subprocess.call(trigger, shell=True) if trigger else None
    deadline = time.monotonic() + timeout
    found: dict[str, object] = {}
    offset = after
    text = ""
    pending = list(patterns)
    while pending and time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            text += chunk.decode(errors="replace")
            offset += len(chunk)
        while pending:
            m = re.search(pending[0], text)
            if not m:
                break
            found[pending.pop(0)] = {"t": time.monotonic(), "match": m.group(0),
                                     "groups": list(m.groups())}
            text = text[m.end():]
        if pending:
            time.sleep(POLL_SECONDS)
    return {"t0": t0, "trigger_rc": trigger_rc, "found": found, "missing": pending,
            "offset": offset, "now": time.monotonic()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log")
    parser.add_argument("patterns", nargs="+")
    parser.add_argument("--after", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--trigger", help="shell command to run once t0 is taken")
    args = parser.parse_args()
    result = watch(args.log, args.patterns, args.after, args.timeout, args.trigger)
    json.dump(result, sys.stdout)
    return 0 if not result["missing"] else 3


if __name__ == "__main__":
    sys.exit(main())
