#!/usr/bin/env python3
"""Measure the candidate record checksums: ns per 256-byte record and per 64 KiB.

The resurrection region's checksum (docs/resurrection.md, "Checksum") is chosen by this
measurement: zlib.crc32 and hashlib.blake2b(digest_size=8) from the standard library, and
crc32c / xxhash when those packages are importable (reported as "not installed" otherwise).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import time
import zlib
from collections.abc import Callable

SIZES = (256, 65536)


def per_call_ns(fn: Callable[[bytes], object], data: bytes, budget_s: float = 0.3) -> float:
    """Best-of-5 nanoseconds per call, each round about ``budget_s / 5`` seconds."""
    loops = 1
    while True:
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn(data)
        elapsed = time.perf_counter_ns() - start
        if elapsed > budget_s * 1e9 / 5:
            break
        loops *= 2
    best = elapsed / loops
    for _ in range(4):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn(data)
        best = min(best, (time.perf_counter_ns() - start) / loops)
    return best


def candidates() -> dict[str, Callable[[bytes], object] | None]:
    found: dict[str, Callable[[bytes], object] | None] = {
        "zlib.crc32": zlib.crc32,
        "blake2b(digest_size=8)": lambda d: hashlib.blake2b(d, digest_size=8).digest(),
    }
    for name, attr in (("crc32c", "crc32c"), ("xxhash", "xxh64_intdigest")):
        try:
            found[f"{name}.{attr}"] = getattr(importlib.import_module(name), attr)
        except ImportError:
            found[f"{name}.{attr}"] = None
    return found


def main() -> None:
    blobs = {size: os.urandom(size) for size in SIZES}
    print(f"{'checksum':28} {'ns/256 B':>10} {'ns/64 KiB':>11} {'GB/s (64 KiB)':>14}")
    for name, fn in candidates().items():
        if fn is None:
            print(f"{name:28} not installed")
            continue
        small, big = (per_call_ns(fn, blobs[size]) for size in SIZES)
        print(f"{name:28} {small:10.0f} {big:11.0f} {65536 / big:14.2f}")


if __name__ == "__main__":
    main()
