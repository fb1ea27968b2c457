"""Checks run *inside a lab guest* (``lab.mode=probe``): the guest's view of xenstore
through xenpbr's client over /dev/xen/xenbus. Prints one JSON line prefixed with
``XENPBR-PROBE:`` on the console for the host to parse.

What it establishes: a guest can write below its own ``data/``, cannot write below its
``control/`` or another domain's tree, can read what dom0 wrote in ``control/``, gets
watch events, and how long reads/writes take from a guest.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from xenpbr.xenstore import PermissionDenied, XenstoreClient, XenstoreError


def _latency(fn, rounds: int = 50) -> float:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return round(statistics.median(samples) * 1e6, 1)


def _denied(fn) -> str:
    try:
        fn()
    except PermissionDenied:
        return "denied"
    except XenstoreError as exc:
        return f"error: {exc}"
    return "allowed"


def probe() -> dict[str, object]:
    out: dict[str, object] = {}
    with XenstoreClient() as xs:
        domid = int(xs.read("domid"))
        home = xs.get_domain_path(domid)
        out["domid"], out["home"] = domid, home
        xs.write("data/xenpbr/probe", b"hello")
        out["own_data_roundtrip"] = xs.read("data/xenpbr/probe") == b"hello"
        out["write_control"] = _denied(lambda: xs.write("control/xenpbr/forged", b"x"))
        out["write_dom0_tree"] = _denied(lambda: xs.write("/local/domain/0/forged", b"x"))
        out["dom0_note"] = xs.read_or("control/xenpbr/note", b"").decode()
        xs.watch("data/xenpbr/watched", "tok")
        first = xs.read_watch(timeout=5)  # xenstored fires once on registration
        xs.write("data/xenpbr/watched", b"1")
        second = xs.read_watch(timeout=5)
        out["watch_events"] = [e.token if e else None for e in (first, second)]
        out["read_us"] = _latency(lambda: xs.read("data/xenpbr/probe"))
        out["write_us"] = _latency(lambda: xs.write("data/xenpbr/probe", b"x"))
    return out


def main() -> int:
    try:
        result = probe()
    except Exception as exc:  # report anything to the console, never hang the guest
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print("XENPBR-PROBE: " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
