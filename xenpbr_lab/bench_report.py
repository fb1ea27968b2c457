"""Write ``make bench`` results: JSON rows, a markdown table and a PNG plot.

``results.json`` is the list of summary rows (``workload``, ``memory_mib``, ``method``,
``runs``, ``median_s``, ``min_s``, ``max_s``, ...); ``results-detail.json`` keeps every
sample, the capture figures and xenpbrd's timeline breakdown; ``results.md`` says what
ran where and leads with the ratios; ``results.png`` plots the medians with min-max bars,
and ``results-scaling.png`` (when a workload ran at two guest sizes or more) each cost
against guest memory.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from .bench import step_medians

log = logging.getLogger(__name__)

METHOD_ORDER = ("normal", "phasereboot", "phasereboot-standby", "xl-restore",
                "phasereboot-fifo")


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    workloads = ("bare", "services", "app")
    return sorted(rows, key=lambda r: (workloads.index(r["workload"])
                                       if r["workload"] in workloads else 99,
                                       r["memory_mib"], METHOD_ORDER.index(r["method"])))


def markdown(detail: dict[str, Any]) -> str:
    """The results as a markdown page."""
    meta, rows = detail["meta"], _sorted(detail["rows"])
    lines = [
        "# Benchmark: recovery downtime, methods side by side",
        "",
        *([f"Command: `{meta['command']}`, {meta['date']}, {meta['repeats']} crashes per "
           f"method and configuration, all in one lab session (Xen {meta.get('xen', '?')})."]
          if not meta.get("runs") else
          ["Runs (each configuration's methods come from one run, side by side; Xen "
           f"{meta.get('xen', '?')}, {meta['repeats']} crashes per method and "
           "configuration):", ""] +
          [f"- `{r['command']}`, {r['date']}"
           + (f": {', '.join(r['configs'])}" if r.get("configs") else ": the rest")
           for r in meta["runs"]] + [""]),
        f"Machine: {_machines(meta)}, guests under {meta['machine']['accelerator']}: "
        "absolute times are roughly ten times native, so **compare the ratios**, which were "
        "measured back to back in the same dom0.",
        "",
        "Downtime = crash (`xl sysrq c`) to the guest's service answering again (first "
        "heartbeat after the panic), timed in dom0.",
        "",
        "| workload | memory | method | runs | median s | min s | max s | vs normal reboot "
        "| vs xl restore |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        reduction = "" if r.get("reduction_pct") is None else f"{r['reduction_pct']:+.1f} % less" \
            if r["reduction_pct"] >= 0 else f"{-r['reduction_pct']:.1f} % more"
        lines.append(f"| {r['workload']} | {r['memory_mib']} MiB | {r['method']} | {r['runs']} "
                     f"| {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} "
                     f"| {reduction.replace('+', '')} | {_ratio(r.get('vs_xl_restore'))} |")
    lines += [f"\nNot run: {why}." for why in meta.get("not_run", [])]
    lines += ["", "## Capture cost (phase-based reboot)", "",
              "| workload | memory | phase | capture s | guest paused s | raw MiB | stored MiB |",
              "|---|---:|---|---:|---:|---:|---:|"]
    for cfg in detail["configs"]:
        for c in cfg["capture"]:
            lines.append(f"| {cfg['workload']} | {cfg['memory_mib']} MiB | {c['phase']} | "
                         f"{_num(c.get('capture_s'))} | {_num(c.get('paused_s'))} | "
                         f"{_mib(c.get('raw_bytes'))} | {_mib(c.get('stored_bytes'))} |")
    lines += _timelines(detail)
    lines += ["", "## Restore throughput beside dom0's memory bandwidth", "",
              "Raw stream of the deepest image divided by xenpbrd's restore step "
              "(`restore_started` to `restore_finished`: disk reverts, `xl restore`, domid), "
              "median of the runs. The yardstick is the fastest native copy of the guest's "
              "memory size in dom0 (libc `memcpy` through ctypes, or `dd` from /dev/zero "
              "into tmpfs, best of three each); the last column is phasereboot's restore "
              "throughput as a fraction of it.", "",
              "| workload | memory | raw MiB | phasereboot MiB/s | phasereboot-fifo MiB/s "
              "| dom0 native copy MiB/s | fraction |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in restore_throughput(detail):
        lines.append(f"| {row['workload']} | {row['memory_mib']} MiB | {_num(row['raw_mib'])} | "
                     f"{_num(row['phasereboot'])} | {_num(row['phasereboot-fifo'])} | "
                     f"{_num(row['dom0_copy_mib_s'] or None)} | "
                     f"{_num(row['fraction_of_copy'], 3)} |")
    lines += _scaling_lines(detail)
    lines.append("")
    return "\n".join(lines)


def _machines(meta: dict[str, Any]) -> str:
    """The machine, or each run's when merged runs ran on different ones."""
    def name(m: dict[str, Any]) -> str:
        return f"{m['cpu']} ({m['cpus']} CPUs)"
    groups: dict[str, list[str]] = {}
    for run in (r for r in meta.get("runs", []) if r.get("machine")):
        groups.setdefault(name(run["machine"]), []).extend(run.get("configs") or ["the rest"])
    if len(groups) <= 1:
        return name(meta["machine"])
    return "; ".join(f"{m} for {', '.join(configs)}" for m, configs in groups.items())


def _ratio(value: float | None) -> str:
    """A downtime ratio to xl restore's, e.g. ``0.42x``; empty where there is none."""
    return "" if value is None else f"{value:.2f}x"


def _timelines(detail: dict[str, Any]) -> list[str]:
    """Per configuration, the median of each step of xenpbrd's recoveries (the columns
    are the steps any configuration has), for each phase-based method."""
    lines: list[str] = []
    for method, title in (("phasereboot", ""), ("phasereboot-standby", " with a standby"),
                          ("phasereboot-fifo", " with the hot stream off")):
        per_cfg = []
        for cfg in detail["configs"]:
            marks = [s["breakdown"] for s in detail["samples"] if s["method"] == method
                     and (s["workload"], s["memory_mib"]) == (cfg["workload"],
                                                               cfg["memory_mib"])]
            got = step_medians(marks)
            if got["steps_median_s"]:
                per_cfg.append((cfg, got))
        if not per_cfg:
            continue
        steps = list(dict.fromkeys(k for _, got in per_cfg for k in got["steps_median_s"]))
        lines += ["", f"## Where a phase-based reboot spends its time{title} (`{method}`, "
                  "median s per configuration)", "",
                  "| workload | memory | " + " | ".join(f"`{s}`" for s in steps)
                  + " | biggest |", "|---|---:|" + "---:|" * len(steps) + "---|"]
        for cfg, got in per_cfg:
            cells = [_num(got["steps_median_s"].get(s)) for s in steps]
            lines.append(f"| {cfg['workload']} | {cfg['memory_mib']} MiB | "
                         + " | ".join(cells) + f" | `{got['biggest']}` |")
    return lines


def restore_throughput(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration: MiB/s of each phase-based method's restore step."""
    rows = []
    for cfg in detail["configs"]:
        raw = cfg["capture"][-1].get("raw_bytes") if cfg["capture"] else None
        row: dict[str, Any] = {"workload": cfg["workload"], "memory_mib": cfg["memory_mib"],
                               "raw_mib": raw / 2**20 if raw else None,
                               "dom0_copy_mib_s": cfg["dom0_copy_mib_s"]}
        for method in ("phasereboot", "phasereboot-fifo"):
            took = [s["breakdown"]["restore_finished"] - s["breakdown"]["restore_started"]
                    for s in detail["samples"]
                    if s["method"] == method and s["workload"] == cfg["workload"]
                    and s["memory_mib"] == cfg["memory_mib"]
                    and {"restore_started", "restore_finished"} <= set(s["breakdown"])]
            row[method] = raw / 2**20 / statistics.median(took) if raw and took else None
        copy = row["dom0_copy_mib_s"]
        row["fraction_of_copy"] = (row["phasereboot"] / copy
                                   if row["phasereboot"] and copy else None)
        rows.append(row)
    return rows


def scaling(detail: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration, the costs that grow with guest memory (issue 18, goal 5): the
    guest's pause over all its captures, the disk its newest image takes (its distinct
    pages as if alone in the store: images of one domain share pages, so their sizes do
    not add up) and its hot stream (one raw copy of it), and each method's median
    downtime."""
    downtime = {(r["workload"], r["memory_mib"], r["method"]): r["median_s"]
                for r in detail["rows"]}
    rows = []
    for cfg in detail["configs"]:
        caps = cfg["capture"]
        key = (cfg["workload"], cfg["memory_mib"])
        rows.append({
            "workload": cfg["workload"], "memory_mib": cfg["memory_mib"],
            "capture_paused_s": _total(c.get("paused_s") for c in caps),
            "store_mib": (caps[-1]["stored_bytes"] / 2**20
                          if caps and caps[-1].get("stored_bytes") else None),
            "hot_stream_mib": _hot_stream_mib(cfg),
            "xenpbrd_mib": _rss_growth(cfg.get("xenpbrd_rss_mib") or {}),
            "downtime_s": {m: downtime[(*key, m)] for m in METHOD_ORDER
                           if (*key, m) in downtime}})
    return rows


def _hot_stream_mib(cfg: dict[str, Any]) -> float | None:
    """The newest image's hot stream as written (runs before 2026-12-07 20:00 did not
    record it: then the raw stream's size, which a hot stream was before it left the
    zero pages to Xen)."""
    if cfg.get("hot_stream_bytes"):
        return float(cfg["hot_stream_bytes"]) / 2**20
    caps = cfg["capture"]
    return caps[-1]["raw_bytes"] / 2**20 if caps and caps[-1].get("raw_bytes") else None


def _rss_growth(rss: dict[str, float | None]) -> float | None:
    """What protecting the guest added to xenpbrd's resident memory (None: not measured,
    as in runs before it was)."""
    idle, protecting = rss.get("idle"), rss.get("protecting")
    return None if idle is None or protecting is None else round(protecting - idle, 1)


def _total(values: Any, unit: float = 1.0) -> float | None:
    """The sum of the known values over ``unit``; None if none is known."""
    known = [v for v in values if v is not None]
    return sum(known) / unit if known else None


def _grows(rows: list[dict[str, Any]]) -> bool:
    """True if some workload was measured at two guest sizes or more."""
    sizes: dict[str, set[int]] = {}
    for r in rows:
        sizes.setdefault(r["workload"], set()).add(r["memory_mib"])
    return any(len(s) > 1 for s in sizes.values())


def _scaling_lines(detail: dict[str, Any]) -> list[str]:
    rows = scaling(detail)
    if not _grows(rows):
        return []
    methods = [m for m in METHOD_ORDER if any(m in r["downtime_s"] for r in rows)]
    lines = ["", "## How each cost grows with guest memory", "",
             "Per configuration of this page (`results-scaling.png` plots them): the guest's "
             "pause summed over its captures; the dom0 disk of its newest image (its "
             "distinct pages as if alone in the store: a domain's images share pages, so "
             "their sizes do not add up) and of that image's hot stream (one raw copy); "
             "what protecting it added to xenpbrd's resident memory in dom0 (`VmRSS` "
             "with the guest past its last boundary against xenpbrd idle; a hot stream "
             "on tmpfs is RAM too; a standby's memory is in Xen, one more guest's); "
             "each method's median downtime.", "",
             "| workload | memory | captures paused s | newest image MiB | hot stream MiB | "
             "xenpbrd MiB | " + " | ".join(f"{m} s" for m in methods) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(methods)]
    for r in sorted(rows, key=lambda r: (r["workload"], r["memory_mib"])):
        lines.append(f"| {r['workload']} | {r['memory_mib']} MiB | "
                     f"{_num(r['capture_paused_s'])} | {_num(r['store_mib'], 1)} | "
                     f"{_num(r['hot_stream_mib'], 1)} | {_num(r['xenpbrd_mib'], 1)} | "
                     + " | ".join(_num(r["downtime_s"].get(m)) for m in methods) + " |")
    return lines


def scaling_plot(detail: dict[str, Any], path: Path) -> bool:
    """Three panels against guest memory (capture pause, disk per protected domain,
    downtime by method), one line per workload; False without matplotlib or when no
    workload ran at two sizes."""
    rows = scaling(detail)
    if not _grows(rows):
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install '.[bench]'): no plot")
        return False
    fig, (pause, disk, down) = plt.subplots(1, 3, figsize=(15, 4.5))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = sorted((r for r in rows if r["workload"] == workload),
                      key=lambda r: r["memory_mib"])
        _line(pause, mine, lambda r: r["capture_paused_s"], workload)
        _line(disk, mine, lambda r: r["store_mib"], f"{workload}: newest image")
        _line(disk, mine, lambda r: r["hot_stream_mib"], f"{workload}: hot stream", "--")
        _line(disk, mine, lambda r: r["xenpbrd_mib"], f"{workload}: xenpbrd memory", ":")
        for method in METHOD_ORDER:
            _line(down, mine, lambda r, m=method: r["downtime_s"].get(m),
                  f"{workload}: {method}")
    for ax, label in ((pause, "guest paused by its captures (s)"),
                      (disk, "dom0 disk and memory per protected domain (MiB)"),
                      (down, "downtime, crash to service (s)")):
        ax.set_xlabel("guest memory (MiB)")
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    fig.suptitle("xenpbr costs against guest memory (QEMU TCG: compare the slopes)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _line(ax: Any, rows: list[dict[str, Any]], value: Any, label: str,
          style: str = "-") -> None:
    """One line of known points (memory, value); nothing if fewer than one is known."""
    points = [(r["memory_mib"], value(r)) for r in rows if value(r) is not None]
    if points:
        ax.plot(*zip(*points), style, marker="o", label=label)


def _num(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def _mib(value: Any) -> str:
    return "-" if value is None else f"{int(value) / 2**20:.1f}"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Grouped bars (median, min-max whiskers) per configuration; False without
    matplotlib (install the ``bench`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install '.[bench]'): no plot")
        return False
    rows = _sorted(rows)
    configs = list(dict.fromkeys((r["workload"], r["memory_mib"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs)), 4.5))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        found = {(r["workload"], r["memory_mib"]): r for r in rows if r["method"] == method}
        xs = [k + (i - (len(methods) - 1) / 2) * width for k, c in enumerate(configs)
              if c in found]
        meds = [found[c]["median_s"] for c in configs if c in found]
        errs = [[found[c]["median_s"] - found[c]["min_s"] for c in configs if c in found],
                [found[c]["max_s"] - found[c]["median_s"] for c in configs if c in found]]
        ax.bar(xs, meds, width, yerr=errs, capsize=3, label=method)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{w}\n{m} MiB" for w, m in configs])
    ax.set_ylabel("downtime, crash to service answering (s)")
    ax.set_title("xenpbr recovery downtime on Xen 4.17\n(guests under QEMU TCG: compare ratios)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def merge(previous: dict[str, Any], detail: dict[str, Any]) -> dict[str, Any]:
    """``detail`` with the configurations of ``previous`` it did not measure again: a
    configuration's methods always come from one run (their ratios stay side by side);
    ``meta.runs`` lists every run that contributed."""
    fresh = {(c["workload"], c["memory_mib"]) for c in detail["configs"]}

    def kept(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [i for i in items if (i["workload"], i["memory_mib"]) not in fresh]
    merged = dict(detail)
    merged["rows"] = kept(previous["rows"]) + detail["rows"]
    merged["samples"] = kept(previous["samples"]) + detail["samples"]
    merged["configs"] = kept(previous["configs"]) + detail["configs"]
    runs = previous["meta"].get("runs") or [
        {k: previous["meta"].get(k) for k in ("command", "date")}]
    for run in runs:
        run.setdefault("machine", previous["meta"].get("machine"))
    merged["meta"] = {**detail["meta"], "runs": runs + [
        {"command": detail["meta"]["command"], "date": detail["meta"]["date"],
         "machine": detail["meta"].get("machine"),
         "configs": sorted(f"{w}-{m}" for w, m in fresh)}]}
    return merged


def write(detail: dict[str, Any], outdir: Path) -> list[Path]:
    """Write results.json, results-detail.json, results.md and results.png."""
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("results.json", json.dumps(_sorted(detail["rows"]), indent=2)),
                       ("results-detail.json", json.dumps(detail, indent=2)),
                       ("results.md", markdown(detail))):
        (outdir / name).write_text(text + "\n")
        written.append(outdir / name)
    if plot(detail["rows"], outdir / "results.png"):
        written.append(outdir / "results.png")
    if scaling_plot(detail, outdir / "results-scaling.png"):
        written.append(outdir / "results-scaling.png")
    return written
