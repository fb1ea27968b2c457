#!/usr/bin/env python3
"""Experiment (issue 18, goal 1): does `xl restore` of xenpbr's hot stream lose to `xl
restore` of the hand-made checkpoint? One lab session, one bare guest under xenpbrd
until its hot stream is ready; then, with xenpbrd stopped, `xl save` of the same guest,
and `xl restore -p` of each stream timed inside dom0, alternating, REPEATS times each,
beside the cost of starting one `xl` process (`xl domid Domain-0`).

Run: `.venv/bin/python tools/exp-restore-streams.py [MEMORY_MIB]`; prints one JSON
object and writes it to lab-artifacts/exp18-*/result.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from xenpbr_lab import bench, xenpbrd
from xenpbr_lab.build import build
from xenpbr_lab.host import XenHost
from xenpbr_lab.paths import artifacts_root

MEMORY_MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 128
REPEATS = 3
#: Timed inside dom0, so the lab's control channel is not in the figure.
TIMED = ("import subprocess, sys, time; t = time.monotonic(); "
         "p = subprocess.run(sys.argv[1:], capture_output=True); "
         "print(p.returncode, time.monotonic() - t)")


def timed(host: XenHost, *argv: str) -> float:
    rc, seconds = host.run(["python3", "-c", TIMED, *argv], timeout=600).stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(argv)} failed ({rc})")
    return float(seconds)


def main() -> None:
    workdir = artifacts_root() / time.strftime("exp18-%Y%m%d-%H%M%S")
    out: dict[str, object] = {"memory_mib": MEMORY_MIB, "dom0_vcpus": 2}
    with XenHost(build(), workdir, dom0_vcpus=2) as host:
        xenpbrd.start(host)
        guest = bench._guest(host, "bare", MEMORY_MIB, "phasereboot")
        bench._start(host, guest, "phasereboot", "bare")
        image = xenpbrd.newest_image(host, guest.name)
        hot = host.run(f"find {xenpbrd.STATE} -name '{image}.stream'").stdout.split()[0]
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "xenpbrd.log").write_text(xenpbrd.stop(host))
        host.run(f"xl save {guest.name} /run/full.chk", timeout=600)  # the guest is gone
        out["bytes"] = dict(zip(("hot", "full"), (int(n) for n in host.run(
            f"stat -c %s {hot} /run/full.chk").stdout.split())))
        times: dict[str, list[float]] = {"hot": [], "full": [], "xl_process": []}
        for _ in range(REPEATS):
            for kind, path in (("hot", hot), ("full", "/run/full.chk")):
                times[kind].append(round(timed(host, "xl", "restore", "-p", path), 3))
                host.run(f"xl destroy {guest.name}")
            times["xl_process"].append(round(timed(host, "xl", "domid", "Domain-0"), 3))
        out["seconds"] = times
        out["median"] = {k: round(statistics.median(v), 3) for k, v in times.items()}
    print(json.dumps(out, indent=1))
    (workdir / "result.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
