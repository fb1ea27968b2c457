"""``xenpbr-lab regen-bench``: regenerating a stream from the page store, in dom0, three
ways side by side (issue 18, goal 2).

A crash before the hot stream is ready (or with ``xenpbr_hot_stream = 0``) restores by
regenerating the image's ``xl save`` stream from the page store into xl, every page
checked. This measures that regeneration alone (into ``/dev/null``), in the lab's dom0
(one vCPU under TCG, where per-page Python and SHA-256 cost the most), on a real
stream of a lab guest captured into a fresh store, each variant best of ``repeats``,
interleaved, in one boot:

* ``per_page_sha256``: the writer asks for one page at a time and each is re-hashed with
  SHA-256 (how every restore regenerated before 2026-12-07; still the path of any
  caller without a batch source);
* ``batched_sha256``: one call per PAGE_DATA record, SHA-256 (what ``xenpbr verify``
  and ``verify_first`` do);
* ``batched_crc32``: one call per record, each record's CRC-32 (what a restore does now).
"""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path
from typing import Any, Callable

from . import bench
from .host import XenHost
from .xl import LabDomain

VARIANTS = ("per_page_sha256", "batched_sha256", "batched_crc32")
STREAM = "/tmp/regen-bench.xl"

_SNIPPET = """
import io, json, os, sys, tempfile, time
from xenpbr.images.store import ImageStore
from xenpbr.stream import read_stream, write_stream

def per_page_sha256(store, image, out):
    with store.reader(image) as pages:
        return write_stream(out, image.stream, pages.get_page)

def batched_sha256(store, image, out):
    with store.reader(image) as pages:
        pages.verify_all()
        return image.meta.stream_bytes

def batched_crc32(store, image, out):
    return store.regenerate(image, out)

store = ImageStore(tempfile.mkdtemp(dir="/tmp", prefix="regen-bench-"))
with open({stream!r}, "rb") as f, store.begin_capture("rb", "kernel", seq=1,
                                                      fingerprint="rb") as w:
    meta = w.commit(read_stream(f, on_page=w.on_page), stream_bytes=os.path.getsize({stream!r}))
image = store.load("rb", meta.image_id)
variants = [per_page_sha256, batched_sha256, batched_crc32]
times = {{v.__name__: [] for v in variants}}
with open(os.devnull, "wb") as out:
    for _ in range({repeats}):
        for v in variants:  # interleaved: a busy moment hits every variant alike
            start = time.perf_counter()
            v(store, image, out)
            times[v.__name__].append(time.perf_counter() - start)
print(json.dumps({{"stream_bytes": meta.stream_bytes, "data_pages": meta.data_pages,
                  "times": times}}))
"""


def run(host: XenHost, memory_mib: int, repeats: int,
        progress: Callable[[str], None]) -> dict[str, Any]:
    """Capture one ``memory_mib`` guest's stream and time the three variants on it."""
    guest = LabDomain(host, f"regen-{memory_mib}", memory_mib=memory_mib, mode="bench",
                      extra=f"lab.workload=bare lab.docs={bench.documents(memory_mib)}")
    guest.create()
    guest.watch_console([bench.LAST_BOUNDARY["bare"], bench.ALIVE], timeout=900)
    guest.save_checkpoint(STREAM, timeout=900)
    guest.destroy()
    progress(f"{memory_mib} MiB: stream saved; timing {repeats} rounds")
    code = textwrap.dedent(_SNIPPET.format(stream=STREAM, repeats=repeats))
    out = host.run(["python3", "-"], stdin=code.encode(), timeout=600 * repeats).stdout
    host.run(f"rm -rf {STREAM} /tmp/regen-bench-*", check=False)
    raw = json.loads(out.strip().splitlines()[-1])
    return summarize(memory_mib, raw)


def summarize(memory_mib: int, raw: dict[str, Any]) -> dict[str, Any]:
    """Best and median seconds per variant, MiB/s of the best, and each variant's
    speed-up over the per-page one."""
    mib = raw["stream_bytes"] / 2**20
    row: dict[str, Any] = {"memory_mib": memory_mib, "stream_mib": round(mib, 2),
                           "data_pages": raw["data_pages"]}
    best = {v: min(raw["times"][v]) for v in VARIANTS}
    for v in VARIANTS:
        row[v] = {"best_s": round(best[v], 3),
                  "median_s": round(statistics.median(raw["times"][v]), 3),
                  "mib_s": round(mib / best[v], 1),
                  "speedup": round(best["per_page_sha256"] / best[v], 2)}
    return row


def markdown(report: dict[str, Any]) -> str:
    """The report as a table, led by the speed-ups."""
    lines = [f"# Regenerating a stream from the page store, in dom0 ({report['date']})", "",
             f"Command: `{report['command']}`. Xen {report['xen']}, dom0 with one vCPU under "
             "QEMU TCG; best of the rounds (median in brackets), the variants interleaved "
             "in one boot (xenpbr_lab/regen_bench.py says what each is).", "",
             "| guest | stream MiB | variant | best s (median) | MiB/s | vs per page |",
             "|---:|---:|---|---:|---:|---:|"]
    for row in report["rows"]:
        for v in VARIANTS:
            r = row[v]
            lines.append(f"| {row['memory_mib']} MiB | {row['stream_mib']} | `{v}` | "
                         f"{r['best_s']} ({r['median_s']}) | {r['mib_s']} | "
                         f"{r['speedup']}x |")
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], outdir: Path) -> list[Path]:
    """``regeneration.json`` and ``regeneration.md`` in ``outdir``."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / "regeneration.json", outdir / "regeneration.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    return paths
