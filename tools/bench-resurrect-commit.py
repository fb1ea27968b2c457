#!/usr/bin/env python3
"""Measure the commit cost of the guest library: ns per ``Region.put`` of a 200-byte value.

Runs anywhere (no Xen): the region is not registered, and when not root it is neither
locked nor given real pfns (the commit itself is the same stores either way). Prints the
median of several rounds, and the cost of an in-process dict store for comparison.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "guest-agent")]

from xenpbr_agent.resurrect import Region  # noqa: E402

PUTS = 20000
KEYS = 1000
VALUE = b"v" * 200


def fake_pfns(address: int, count: int) -> list[int]:
    return list(range(1, count + 1))


def round_ns(region: Region, keys: list[bytes]) -> float:
    start = time.perf_counter_ns()
    for i in range(PUTS):
        region.put(keys[i % KEYS], VALUE)
    return (time.perf_counter_ns() - start) / PUTS


def dict_ns(keys: list[bytes]) -> float:
    store: dict[bytes, bytes] = {}
    start = time.perf_counter_ns()
    for i in range(PUTS):
        store[keys[i % KEYS]] = VALUE
    return (time.perf_counter_ns() - start) / PUTS


def main() -> None:
    root = os.geteuid() == 0
    region = Region.create("bench", 2 * KEYS * 256, 256, register=False, lock=root,
                           **({} if root else {"pfn_lookup": fake_pfns}))
    keys = [b"key-%06d" % i for i in range(KEYS)]
    rounds = [round_ns(region, keys) for _ in range(7)]
    region.close()
    baseline = statistics.median(dict_ns(keys) for _ in range(7))
    print(f"put of a 200-byte value: {statistics.median(rounds):.0f} ns median "
          f"(min {min(rounds):.0f}, max {max(rounds):.0f}; {PUTS} puts x 7 rounds, "
          f"{KEYS} keys, {'locked' if root else 'unlocked'}); dict store: {baseline:.0f} ns")


if __name__ == "__main__":
    main()
