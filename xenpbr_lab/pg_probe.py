"""Time a crash of the Debian guest until its PostgreSQL answers dom0 again (runs in dom0).

``python3 -m xenpbr_lab.pg_probe --ip IP --query SQL -- TRIGGER...``: records the time,
runs the trigger (``xl sysrq NAME c``, and for the hand-made alternative the script that
restores the checkpoint), waits until the crashed domain (``--domid``) is gone (until then
the old server could still answer), then polls the server: a TCP connect to port 5432 with a short
timeout (a dead guest's SYN is dropped, and connect would otherwise wait for its first
retransmit) and, once it connects, the query through ``psql``; the first correct-looking
answer ends the wait. Prints one JSON line: ``{"downtime_s", "answer", "attempts"}``.

Polling is cheap and bounded by the poll interval (0.1 s), so the figure is downtime as
a client sees it, within about a tenth of a second. No deadline of its own: the caller's
wait is the hang detector.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

PORT = 5432


def _connects(ip: str, timeout: float) -> bool:
    try:
        with socket.create_connection((ip, PORT), timeout=timeout):
            return True
    except OSError:
        return False


def _ask(ip: str, query: str) -> str | None:
    done = subprocess.run(["psql", "-h", ip, "-U", "postgres", "-d", "lab", "-qAt", "-c",
                           query], capture_output=True, text=True, check=False,
                          env={"PGCONNECT_TIMEOUT": "2", "PATH": "/usr/bin:/bin"})
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenpbr_lab.pg_probe")
    parser.add_argument("--ip", required=True)
    parser.add_argument("--query", required=True)
    parser.add_argument("--domid", type=int, required=True,
                        help="the domain being crashed: polling starts once it is gone")
    parser.add_argument("trigger", help="shell command that crashes (and recovers) it")
    args = parser.parse_args(argv)
    start = time.monotonic()
    subprocess.Popen(["sh", "-c", args.trigger], stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    while subprocess.run(["xenstore-exists", f"/local/domain/{args.domid}"],
                         capture_output=True, check=False).returncode == 0:
        time.sleep(0.05)
    attempts = 0
    while True:
        attempts += 1
        if _connects(args.ip, 0.3):
            answer = _ask(args.ip, args.query)
            if answer is not None:
                print(json.dumps({"downtime_s": round(time.monotonic() - start, 3),
                                  "answer": answer, "attempts": attempts}))
                return 0
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
