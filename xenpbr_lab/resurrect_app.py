"""The resurrection proof's application: an in-memory key-value store in the guest.

Runs inside a lab guest (Python 3.9+, stdlib plus the agent package). It applies a steady
stream of writes to an in-memory dict and, in ``region`` mode, commits each one to a
resurrection region (:class:`xenpbr_agent.resurrect.Region`) before acknowledging it; every
acknowledged write is one line::

    ACK <seq> <key> <value-digest>

(``seq`` is the region's, ``value-digest`` the first 16 hex digits of the value's SHA-256),
so the harness knows the latest acknowledged value of every key. On start it loads what
dom0 resurrected (:func:`xenpbr_agent.resurrected.load_resurrected`), prints
``LOADED <key> <value-digest>`` for each key and ``LOADED-COUNT <n>``, and puts them back
into its new region (so they survive the next crash too). ``plain`` mode is the same
workload without a region, for the overhead comparison; both end (after ``--duration``
or on SIGTERM) with ``DONE <writes> <seconds> <writes-per-second>``.

Separate from the lab harness because it is the guest's program: the harness only reads
its output.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import time
from typing import Any, Callable, TextIO

APP = "kvdemo"


def digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()[:16]


def value_for(i: int, size: int) -> bytes:
    """A value unique to write ``i`` (so every acknowledged write has its own digest)."""
    head = f"{i}:".encode()
    return (head + b"v" * size)[:max(size, len(head))]


class PlainStore:
    """The workload's store without registration: a dict and a counter."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.seq = 0

    def put(self, key: bytes, value: bytes) -> int:
        self.seq += 1
        self.data[key] = value
        return self.seq

    def close(self) -> None:
        pass


class RegionStore(PlainStore):
    """The same store, each write committed to a resurrection region first."""

    def __init__(self, app: str, size: int, slot_size: int) -> None:
        super().__init__()
        from xenpbr_agent.resurrect import Region  # the agent's library, in the guest
        self.region: Any = Region.create(app, size, slot_size=slot_size)

    def put(self, key: bytes, value: bytes) -> int:
        seq = int(self.region.put(key, value))
        self.data[key] = value
        return seq

    def close(self) -> None:
        self.region.close()


def load(app: str, store: PlainStore, out: TextIO) -> int:
    """Put what dom0 resurrected into ``store``, printing each key; the count."""
    from xenpbr_agent.resurrected import load_resurrected
    loaded = load_resurrected(app)
    for key, value in sorted(loaded.items()):
        store.put(key, value)
        out.write(f"LOADED {key.decode('ascii', 'replace')} {digest(value)}\n")
    out.write(f"LOADED-COUNT {len(loaded)}\n")
    out.flush()
    return len(loaded)


def run(store: PlainStore, out: TextIO, keys: int, value_size: int, duration: float,
        rate: float, stopped: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
        ) -> tuple[int, float]:
    """Apply writes until ``duration`` (0: forever) or ``stopped()``; (writes, seconds)."""
    start = clock()
    writes = 0
    while not stopped() and (duration <= 0 or clock() - start < duration):
        key = b"k%06d" % (writes % keys)
        value = value_for(writes, value_size)
        seq = store.put(key, value)
        out.write(f"ACK {seq} {key.decode()} {digest(value)}\n")
        out.flush()
        writes += 1
        if rate > 0:
            time.sleep(max(0.0, start + writes / rate - clock()))
    return writes, clock() - start


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m xenpbr_lab.resurrect_app",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("region", "plain"), default="region")
    parser.add_argument("--app", default=APP, help=f"application name (default {APP})")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys (default 1000)")
    parser.add_argument("--value-size", type=int, default=64, help="value bytes (default 64)")
    parser.add_argument("--region-mib", type=int, default=4, help="region size (default 4)")
    parser.add_argument("--slot-size", type=int, default=256, help="slot bytes (default 256)")
    parser.add_argument("--duration", type=float, default=0.0, help="seconds (0: until "
                                                                     "SIGTERM)")
    parser.add_argument("--rate", type=float, default=0.0, help="writes/s (0: as fast as "
                                                                 "it can)")
    parser.add_argument("--log", help="append the lines here (e.g. a tmpfs file) instead "
                                      "of stdout")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    out = open(args.log, "a", buffering=1) if args.log else sys.stdout
    store = (RegionStore(args.app, args.region_mib << 20, args.slot_size)
             if args.mode == "region" else PlainStore())
    try:
        if args.mode == "region":
            load(args.app, store, out)
        writes, seconds = run(store, out, args.keys, args.value_size, args.duration,
                              args.rate, lambda: bool(stop))
        out.write(f"DONE {writes} {seconds:.3f} {writes / seconds if seconds else 0:.1f}\n")
    finally:
        store.close()
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
