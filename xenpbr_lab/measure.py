"""Measurements of the lab itself: control-channel latency and throughput, boot and
guest timings. ``xenpbr-lab measure`` prints them (``--json`` for machines)."""

from __future__ import annotations

import os
import statistics
import time

from .host import XenHost
from .xl import LabDomain


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def channel_figures(host: XenHost, rounds: int = 20, size_mib: int = 32) -> dict[str, float]:
    """Round-trip latency of ping and of running ``true``; put/get throughput."""
    pings, runs = [], []
    for _ in range(rounds):
        t = time.monotonic(); host.uptime(); pings.append(time.monotonic() - t)
        t = time.monotonic(); host.run(["true"]); runs.append(time.monotonic() - t)
    blob = os.urandom(size_mib * 2**20)
    t = time.monotonic(); host.put("/tmp/channel-blob", blob); put_s = time.monotonic() - t
    t = time.monotonic(); back = host.get("/tmp/channel-blob"); get_s = time.monotonic() - t
    host.run(["rm", "-f", "/tmp/channel-blob"])
    assert back == blob, "control channel corrupted a file in transit"
    return {"ping_median_ms": _median_ms(pings), "run_true_median_ms": _median_ms(runs),
            "put_mib_s": round(size_mib / put_s, 1), "get_mib_s": round(size_mib / get_s, 1)}


def guest_figures(host: XenHost) -> dict[str, float]:
    """Guest create -> console marker, and crash -> ``xl list`` shows it crashed."""
    guest = LabDomain(host, "measure", mode="service", on_crash="preserve")
    t = time.monotonic()
    guest.create()
    created = time.monotonic() - t
    guest.watch_console([r"XENPBR-GUEST: service ready"], timeout=180)
    # The watcher's t0 is dom0 time; create->marker is measured on the host clock.
    marker = time.monotonic() - t
    offset = guest.console_size()
    crash = guest.watch_console([r"Kernel panic - not syncing"], after=offset, timeout=60,
                                trigger=f"xl sysrq {guest.name} c")
    t_seen = crash["found"]["Kernel panic - not syncing"]["t"] - crash["t0"]
    t = time.monotonic()
    guest.wait_for_state(lambda e: e.crashed, "crashed", timeout=60)
    listed = time.monotonic() - t
    guest.destroy()
    return {"xl_create_s": round(created, 2), "create_to_marker_s": round(marker, 2),
            "sysrq_to_panic_s": round(t_seen, 2), "panic_seen_to_xl_list_crashed_s":
            round(listed, 2)}
