"""``xenpbr-lab store-bench STREAM``: the image store's costs, side by side, on the host.

Answers the optimisation questions of docs/benchmarks with one real ``xl save`` stream
(``xenpbr-lab sample`` fetches one from a lab guest), every variant measured in the same
run so their ratios hold on a noisy machine:

* where the store lives: tmpfs (``/dev/shm``) vs a disk file system (``/var/tmp``);
* the page codec: ``none`` vs ``zlib`` (what the store supports), and, when the
  modules are importable, what ``lz4`` and ``zstd`` would do to the same pages
  (compressed size and decode speed): data to decide whether a codec is worth adding;
* restoring: regenerating the stream from the store (the FIFO path, every page hashed)
  vs reading the ready-made hot stream file (:mod:`xenpbr.images.hotcache`).

Host numbers, not dom0's: dom0 under TCG is about 100x slower per pass, but the ratios
between variants of the same pass carry over.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenpbr.images import hotcache
from xenpbr.images.store import ImageStore
from xenpbr.stream.reader import read_stream

PAGE = 4096
LOCATIONS = {"tmpfs": "/dev/shm", "disk": "/var/tmp"}


def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _capture(store: ImageStore, data: bytes) -> str:
    with store.begin_capture("bench", "app", seq=1, fingerprint="f") as writer:
        stream = read_stream(io.BytesIO(data), on_page=writer.on_page)
        return writer.commit(stream, stream_bytes=len(data)).image_id


def _sink() -> Any:
    return open(os.devnull, "wb")


def store_variants(data: bytes, repeats: int) -> list[dict[str, Any]]:
    """Capture and regenerate for each location x codec; hot-stream read beside them."""
    rows = []
    mib = len(data) / 2**20
    for where, parent in LOCATIONS.items():
        for codec in ("none", "zlib"):
            root = Path(tempfile.mkdtemp(prefix="xenpbr-store-bench-", dir=parent))
            try:
                store = ImageStore(root / "store", codec=codec)
                capture_s = _best_of(lambda: _capture(store, data), 1)
                image_id = store.images("bench")[-1].image_id
                image = store.load("bench", image_id)

                def regenerate() -> None:
                    with _sink() as out:
                        store.regenerate(image, out)
                regen_s = _best_of(regenerate, repeats)
                hot = hotcache.warm(store, "bench", image_id)
                assert hot is not None

                def read_hot() -> None:
                    with open(hot, "rb") as f, _sink() as out:
                        shutil.copyfileobj(f, out, 1 << 20)
                hot_s = _best_of(read_hot, repeats)
                rows.append({"store": where, "codec": codec, "stream_mib": round(mib, 1),
                             "stored_mib": round(store.disk_bytes() / 2**20, 1),
                             "capture_mib_s": round(mib / capture_s, 1),
                             "regenerate_mib_s": round(mib / regen_s, 1),
                             "hot_read_mib_s": round(mib / hot_s, 1)})
            finally:
                shutil.rmtree(root, ignore_errors=True)
    return rows


def _pages(data: bytes, limit: int = 16384) -> list[bytes]:
    """Distinct non-zero pages of the stream's memory (what the store compresses)."""
    seen: dict[bytes, None] = {}
    zero = bytes(PAGE)

    def on_page(pfn: int, type_bits: int, page: bytes | memoryview) -> None:
        page = bytes(page)
        if page != zero and len(seen) < limit:
            seen.setdefault(page)
    read_stream(io.BytesIO(data), on_page=on_page)
    return list(seen)


def codec_candidates(data: bytes) -> list[dict[str, Any]]:
    """Size and decode speed of each available codec on the stream's distinct pages."""
    import zlib
    pages = _pages(data)
    raw = len(pages) * PAGE
    candidates: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
        "zlib-1": (lambda p: zlib.compress(p, 1), zlib.decompress)}
    for module, name in (("lz4.block", "lz4"), ("zstandard", "zstd-1")):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if name == "lz4":
            candidates[name] = (mod.compress, mod.decompress)
        else:
            cctx, dctx = mod.ZstdCompressor(level=1), mod.ZstdDecompressor()
            candidates[name] = (cctx.compress, dctx.decompress)
    rows = [{"codec": "none", "ratio": 1.0, "decode_mib_s": None}]
    for name, (encode, decode) in candidates.items():
        packed = [encode(p) for p in pages]
        kept = sum(min(len(c), PAGE) for c in packed)  # the store keeps raw when smaller
        start = time.perf_counter()
        for c in packed:
            decode(c)
        took = time.perf_counter() - start
        rows.append({"codec": name, "ratio": round(raw / kept, 2),
                     "decode_mib_s": round(raw / 2**20 / took, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xenpbr-lab store-bench", description=__doc__)
    parser.add_argument("stream", type=Path, help="an xl save stream (xenpbr-lab sample)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    data = args.stream.read_bytes()
    result: dict[str, Any] = {"stream": str(args.stream), "store": store_variants(data, args.repeats),
              "codecs": codec_candidates(data)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'store':6} {'codec':5} {'stored MiB':>10} {'capture MiB/s':>14} "
          f"{'regenerate MiB/s':>17} {'hot read MiB/s':>15}")
    for r in result["store"]:
        print(f"{r['store']:6} {r['codec']:5} {r['stored_mib']:>10} {r['capture_mib_s']:>14} "
              f"{r['regenerate_mib_s']:>17} {r['hot_read_mib_s']:>15}")
    print(f"\n{'codec':7} {'ratio':>6} {'decode MiB/s':>13}")
    for r in result["codecs"]:
        print(f"{r['codec']:7} {r['ratio']:>6} {str(r['decode_mib_s'] or '-'):>13}")
    regen = statistics.median(r["regenerate_mib_s"] for r in result["store"])
    hot = statistics.median(r["hot_read_mib_s"] for r in result["store"])
    print(f"\nhot stream read vs regenerate (median of variants): {hot / regen:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
