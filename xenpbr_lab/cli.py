"""``xenpbr-lab``: build the lab, boot real Xen in QEMU, run commands in dom0, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import bench as bench_methods
from .build import LabImages, build
from .demo import render, run_demo, write_report
from .errors import LabError
from .host import XenHost
from .paths import artifacts_root, cache_root
from .xl import LabDomain


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def cmd_build(args: argparse.Namespace) -> int:
    start = time.monotonic()
    images = build()
    elapsed = time.monotonic() - start
    artefacts = {"xen": images.xen, "kernel": images.kernel, "dom0 initramfs": images.dom0_initrd,
                 "guest initramfs": images.guest_initrd}
    cache_bytes = sum(p.stat().st_size for p in cache_root().rglob("*") if p.is_file())
    if args.json:
        print(json.dumps({"seconds": round(elapsed, 2), "steps": images.timings,
                          "kernel_version": images.kernel_version,
                          "cache": str(cache_root()), "cache_bytes": cache_bytes,
                          "artefacts": {k: str(v) for k, v in artefacts.items()},
                          "packages": {p.name: p.version for p in images.packages}}, indent=2))
        return 0
    print(f"lab built in {elapsed:.1f} s (steps: {images.timings})")
    for name, path in artefacts.items():
        print(f"  {name:16} {_size(path):>10}  {path}")
    print(f"  cache            {cache_bytes / 2**20:8.1f} MiB  {cache_root()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    images = build()
    workdir = artifacts_root() / time.strftime("run-%Y%m%d-%H%M%S")
    with XenHost(images, workdir) as host:
        print(f"# dom0 ready {host.boot_seconds:.1f} s after QEMU start", file=sys.stderr)
        result = host.run(" ".join(args.command), timeout=args.timeout, check=False)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.rc


def cmd_demo(args: argparse.Namespace) -> int:
    from .cpuhog import cpu_hog
    start = time.monotonic()
    images = build()
    with cpu_hog(args.cpu_hog):
        report = run_demo(images, time.monotonic() - start)
    report.cpu_hog_processes = args.cpu_hog
    write_report(report, Path(args.report))
    print(json.dumps(asdict(report), indent=2) if args.json else render(report))
    if not args.json:
        print(f"\nreport written to {args.report}")
    return 0 if report.recovered_from_phase and report.phase_reboot_s > 0 else 1


def cmd_measure(args: argparse.Namespace) -> int:
    from .measure import channel_figures, guest_figures
    images = build()
    workdir = artifacts_root() / time.strftime("measure-%Y%m%d-%H%M%S")
    with XenHost(images, workdir) as host:
        figures = {"qemu_start_to_dom0_ready_s": round(host.boot_seconds or 0, 2),
                   **channel_figures(host), **guest_figures(host)}
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        width = max(map(len, figures))
        for name, value in figures.items():
            print(f"  {name.ljust(width)}  {value}")
    return 0


def _asked_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The ``XenHost`` sizes given by ``--qemu-memory`` and ``--dom0-memory``."""
    return {key: value for key, value in (("memory_mib", args.qemu_memory),
                                          ("dom0_memory_mib", args.dom0_memory))
            if value is not None}


def _xen_version(host: XenHost) -> str:
    return host.run("xl info | sed -n 's/^xen_version *: //p'").stdout.strip()


def _csv(kind: type, allowed: tuple | None = None):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of "
                                             f"{', '.join(map(str, allowed or ())) or kind.__name__}")
        return values
    return parse


def cmd_bench(args: argparse.Namespace) -> int:
    """Normal reboot vs phase-based reboot vs xl save/restore, side by side."""
    from . import bench, bench_report, debian_bench
    images = build()
    workdir = artifacts_root() / time.strftime("bench-%Y%m%d-%H%M%S")
    samples: list = []
    facts: list = []
    not_run: list[str] = []
    xen = ""
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    def stop(signum: int, _frame: object) -> None:
        progress(f"xenpbr-lab bench: signal {signum}: no new method or configuration; "
                 "the method under way finishes its crashes, then what was measured is written")
        bench.STOP.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    busybox = [w for w in args.workloads if w != debian_bench.WORKLOAD]
    if busybox:
        xen = _bench_busybox(args, images, workdir, busybox, samples, facts, not_run,
                             progress)
    if debian_bench.WORKLOAD in args.workloads:  # its own dom0: Debian's, with systemd
        try:
            more, fact, xen = debian_bench.run(
                images, workdir, args.repeats, progress,
                tuple(m for m in args.methods if m in debian_bench.RUN_ORDER))
        except LabError as exc:  # keep what the busybox workloads measured
            why = f"debian failed: {str(exc)[:300]}"
            print(f"not run: {why}", file=sys.stderr, flush=True)
            not_run.append(why)
        else:
            samples += more
            facts.append(fact)
    command = ("xenpbr-lab bench --workloads " + ",".join(args.workloads) + " --memory " +
               ",".join(map(str, args.memory)) + f" --repeats {args.repeats}" +
               " --methods " + ",".join(args.methods)
               + (f" --dom0-vcpus {args.dom0_vcpus}" if args.dom0_vcpus != 1 else ""))
    detail = bench.as_json(bench.summarize(samples), samples, facts,
                           {"command": command, "date": started, "repeats": args.repeats,
                            "xen": xen, "machine": bench.machine(), "not_run": not_run,
                            "dom0_vcpus": args.dom0_vcpus})
    previous = Path(args.out) / "results-detail.json"
    if args.merge and previous.exists():
        detail = bench_report.merge(json.loads(previous.read_text()), detail)
    written = bench_report.write(detail, Path(args.out))
    if args.json:
        print(json.dumps(detail["rows"], indent=2))
    else:
        print(bench_report.markdown(detail))
        print("\nwritten: " + ", ".join(map(str, written)))
    return 0


def _bench_busybox(args: argparse.Namespace, images: LabImages, workdir: Path,
                   workloads: list[str], samples: list, facts: list,
                   not_run: list[str], progress: Callable[[str], None]) -> str:
    """The busybox workloads in one busybox dom0 (into ``samples``, ``facts`` and
    ``not_run``); Xen's version."""
    from . import bench
    sizes = bench.host_sizes(args.memory) | _asked_sizes(args)
    with XenHost(images, workdir, **sizes, dom0_vcpus=args.dom0_vcpus) as host:
        xen = _xen_version(host)
        try:
            for workload in workloads:
                for memory in args.memory:
                    if bench.STOP.is_set():
                        not_run.append(f"{workload} at {memory} MiB: stopped by a signal "
                                       "before it started")
                        continue
                    if (why := bench.fits(workload, memory)) is not None:
                        print(f"not run: {why}", file=sys.stderr, flush=True)
                        not_run.append(why)
                        continue
                    try:
                        more, fact = bench.run_config(
                            host, workload, memory, args.repeats, progress, workdir,
                            tuple(args.methods))
                    except LabError as exc:  # keep what the other configurations measured
                        why = f"{workload} at {memory} MiB failed: {str(exc)[:300]}"
                        print(f"not run: {why}", file=sys.stderr, flush=True)
                        not_run.append(why)
                        host.collect_artifacts(workdir / f"failure-{workload}-{memory}")
                        continue
                    samples += more
                    facts.append(fact)
                    measured = {s.method for s in more}
                    if bench.STOP.is_set() and measured != set(args.methods):
                        not_run.append(f"{workload} at {memory} MiB: stopped by a signal "
                                       f"after {', '.join(sorted(measured)) or 'nothing'}")
        except Exception:
            host.collect_artifacts(workdir / "failure")
            raise
    return xen


def cmd_consistency(args: argparse.Namespace) -> int:
    """Crash a guest with a snapshot root disk and a persistent data disk N times."""
    from . import consistency
    workdir = artifacts_root() / time.strftime("consistency-%Y%m%d-%H%M%S")
    with XenHost(build(), workdir) as host:
        try:
            report = consistency.run_proof(
                host, args.cycles, lambda line: print(line, file=sys.stderr, flush=True),
                workdir)
        except Exception:
            host.collect_artifacts(workdir / "failure")
            raise
    report["command"] = f"xenpbr-lab consistency --cycles {args.cycles}"
    path = consistency.write_report(report, Path(args.report))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key in ("cycles", "recovered_by_phase_app", "acked_records", "lost_records",
                    "duplicate_records", "fsck_root_clean", "fsck_data_clean",
                    "hazard_refused", "logger_after_restore_works", "disk_timings"):
            print(f"{key:28} {report[key]}")
        print(f"written: {path}")
    ok = (report["lost_records"] == 0 and report["fsck_root_clean"]
          and report["fsck_data_clean"] and report["hazard_refused"] is not None)
    return 0 if ok else 1


def cmd_faults(args: argparse.Namespace) -> int:
    """Inject N faults into a guest kernel, one after another; classify and recover each."""
    from . import faults
    kinds = faults.expand_kinds([k for k in args.kinds.split(",") if k])
    unknown = sorted(k for k in kinds if not faults.known_kind(k))
    if unknown or not kinds:
        print(f"xenpbr-lab faults: unknown kind(s) {unknown or kinds}; choose from "
              f"{', '.join(faults.KINDS)}, lkdtm:TYPE (an LKDTM crash type: lkdtm:BUG) or "
              "lkdtm (all of them)",
              file=sys.stderr)
        return 2
    path = Path(args.report)
    if args.fresh:
        path.unlink(missing_ok=True)
    workdir = artifacts_root() / time.strftime("faults-%Y%m%d-%H%M%S")
    command = (f"xenpbr-lab faults --count {args.count} --kinds {args.kinds} "
               f"--memory {args.memory} --guests {args.guests}"
               f"{' --liveness' if args.liveness else ''}")
    def stop(signum: int, _frame: object) -> None:
        print(f"xenpbr-lab faults: signal {signum}: no new injection; finishing the ones "
              "under way and the disk checks", file=sys.stderr, flush=True)
        faults.STOP.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with XenHost(build(), workdir, **_asked_sizes(args)) as host:
        try:
            report = faults.run_campaign(
                host, args.count, kinds, memory_mib=args.memory, observe_s=args.observe,
                guests=args.guests, liveness=args.liveness, report_path=path,
                command=command,
                progress=lambda line: print(line, file=sys.stderr, flush=True),
                evidence=workdir)
        except Exception:
            host.collect_artifacts(workdir / "failure")
            raise
    summary = report["summary"]
    print(json.dumps(summary, indent=2) if args.json else faults.markdown(report))
    print(f"written: {path} and {path.with_suffix('.md')}", file=sys.stderr)
    ok = (summary["service_back"] == summary["injections"] and summary["lost_records"] == 0
          and summary["fsck_clean_runs"] == summary["checked_runs"])
    return 0 if ok else 1


def cmd_resurrect(args: argparse.Namespace) -> int:
    """Crash a key-value application's guest under three recovery methods; compare."""
    from . import resurrection_proof as proof
    workdir = artifacts_root() / time.strftime("resurrect-%Y%m%d-%H%M%S")
    cycles = {"resurrection": args.cycles, "phasereboot": args.cycles_phasereboot,
              "normal": args.cycles_normal}
    with XenHost(build(), workdir) as host:
        try:
            report = proof.run_proof(
                host, cycles, lambda line: print(line, file=sys.stderr, flush=True),
                workdir, args.seed)
        except Exception:
            host.collect_artifacts(workdir / "failure")
            raise
    report["command"] = (f"xenpbr-lab resurrect --cycles {args.cycles} --cycles-phasereboot "
                         f"{args.cycles_phasereboot} --cycles-normal {args.cycles_normal} "
                         f"--seed {report['seed']}")
    report["machine"] = __import__("xenpbr_lab.bench", fromlist=["machine"]).machine()
    report["evidence"] = str(workdir)
    paths = proof.write_report(report, Path(args.report))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key in ("cycles", "acked_writes", "lost_writes", "lost_without",
                    "corrupt_detected", "extraction_s", "downtime_s", "overhead_pct"):
            print(f"{key:18} {json.dumps(report[key])}")
        print("written: " + ", ".join(map(str, paths)))
    problems = proof.verdict(report)
    for problem in problems:
        print(f"xenpbr-lab resurrect: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: at least {minimum}")
        return value
    return parse


def cmd_regen_bench(args: argparse.Namespace) -> int:
    """Regenerating a stream from the page store in dom0: per page vs batched."""
    from . import regen_bench
    workdir = artifacts_root() / time.strftime("regen-bench-%Y%m%d-%H%M%S")
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with XenHost(build(), workdir) as host:
        try:
            xen = _xen_version(host)
            rows = [regen_bench.run(host, memory, args.repeats, progress)
                    for memory in args.memory]
        except Exception:
            host.collect_artifacts(workdir / "failure")
            raise
    report = {"command": "xenpbr-lab regen-bench --memory "
                         f"{','.join(map(str, args.memory))} --repeats {args.repeats}",
              "date": started, "xen": xen, "rows": rows}
    written = regen_bench.write(report, Path(args.out))
    print(json.dumps(rows, indent=2) if args.json else regen_bench.markdown(report))
    print("written: " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Fetch one real ``xl save`` stream of a lab guest (for ``store-bench``)."""
    from . import bench
    out = Path(args.out) if args.out else cache_root() / "samples" / \
        f"{args.workload}-{args.memory}.xl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with XenHost(build(), artifacts_root() / time.strftime("sample-%Y%m%d-%H%M%S")) as host:
        guest = LabDomain(host, "sample", memory_mib=args.memory, mode="bench",
                          extra=f"lab.workload={args.workload} "
                                f"lab.docs={bench.documents(args.memory)}")
        guest.create()
        guest.watch_console([bench.LAST_BOUNDARY[args.workload], bench.ALIVE], timeout=600)
        guest.save_checkpoint("/tmp/sample.xl", timeout=600)
        out.write_bytes(host.get("/tmp/sample.xl"))
    print(f"{out}: {out.stat().st_size} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xenpbr-lab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build (or reuse) the boot artefacts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("run", help="boot Xen, run a shell command in dom0, stop")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("command", nargs="+")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="crash a guest on real Xen and show its recovery")
    p.add_argument("--json", action="store_true")
    p.add_argument("--report", default="build/demo-report.json",
                   help="where to write the JSON report (default build/demo-report.json)")
    p.add_argument("--cpu-hog", type=int, default=0, metavar="N",
                   help="run N busy processes beside QEMU for the whole demo, to show it "
                        "on a loaded machine (6 on 2 cores: about 4x slower)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("bench", help="recovery downtime: normal vs phase-based vs xl restore")
    p.add_argument("--workloads", type=_csv(str, ("bare", "services", "app", "debian")),
                   default=["bare", "services", "app", "debian"],
                   help="bare, services, app: busybox guests at each --memory; debian: a "
                        "Debian 12 guest with systemd and PostgreSQL (512 MiB) on a Debian "
                        "dom0 (about 30 min alone); default: all four")
    p.add_argument("--memory", type=_csv(int, bench_methods.MEMORY_MIB),
                   default=list(bench_methods.DEFAULT_MEMORY_MIB),
                   help="guest memory sizes in MiB, of "
                        + ",".join(map(str, bench_methods.MEMORY_MIB))
                        + " (default 128,256,512; above 512 QEMU and dom0 grow with the "
                        "largest: bench.host_sizes)")
    p.add_argument("--qemu-memory", type=_at_least(512), default=None,
                   help="memory of the QEMU machine in MiB (default: what --memory needs)")
    p.add_argument("--dom0-memory", type=_at_least(512), default=None,
                   help="dom0's memory in MiB (default: what --memory needs)")
    p.add_argument("--dom0-vcpus", type=int, choices=(1, 2), default=1,
                   help="dom0's vCPUs (default 1; 2: a restore checks its hot stream "
                   "while xl reads it, as on a real host's dom0)")
    p.add_argument("--repeats", type=int, default=5, help="crashes per method (default 5)")
    p.add_argument("--methods", type=_csv(str, bench_methods.METHODS),
                   default=list(bench_methods.DEFAULT_METHODS),
                   help="recovery methods (default normal,phasereboot,xl-restore,"
                        "phasereboot-standby; add phasereboot-fifo to measure the hot "
                        "stream)")
    p.add_argument("--out", default="docs/benchmarks", help="where the results go")
    p.add_argument("--merge", action="store_true",
                   help="keep the configurations of the results already in --out that "
                        "this run does not measure (re-run some configurations)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("regen-bench", help="regenerating a stream from the page store in "
                                           "dom0: per page vs batched (docs/benchmarks)")
    p.add_argument("--memory", type=_csv(int, (128, 256, 512)), default=[128, 512])
    p.add_argument("--repeats", type=_at_least(1), default=3)
    p.add_argument("--out", default="docs/benchmarks/regeneration")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_regen_bench)
    p = sub.add_parser("consistency", help="disk consistency over N crash/phase-reboot cycles")
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--report", default="build/consistency-report.json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_consistency)
    p = sub.add_parser("faults", help="fault campaign: inject N faults into a guest kernel "
                                      "(docs/faults.md); the report is merged across runs")
    p.add_argument("--count", type=_at_least(1), default=200)
    p.add_argument("--kinds", default=",".join(("stack", "text", "operand", "hang", "crash")),
                   help="comma-separated kinds, injected in turn (default: all but "
                   "lkdtm:TYPE, LKDTM's crash type TYPE, which the guest then loads; "
                   "lkdtm: each of the fault types of LKDTM, docs/faults.md)")
    p.add_argument("--memory", type=_at_least(64), default=192,
                   help="guest memory in MiB (default 192)")
    p.add_argument("--guests", type=_at_least(1), default=1,
                   help="guests injected at once, each in its own thread (default 1)")
    p.add_argument("--liveness", action="store_true",
                   help="guests without Xen's watchdog: hangs are left to xenpbrd's "
                        "liveness check on the agent's heartbeat")
    p.add_argument("--qemu-memory", type=_at_least(512), default=None,
                   help="memory of the QEMU machine in MiB (for big guests; default 4096)")
    p.add_argument("--dom0-memory", type=_at_least(512), default=None,
                   help="dom0's memory in MiB (it holds the image store; default 2048)")
    p.add_argument("--observe", type=float, default=40.0,
                   help="seconds without an effect before a fault counts as silent "
                        "(default 40; must exceed the guest's 20 s watchdog)")
    p.add_argument("--report", default="docs/faults/report.json",
                   help="the JSON report, merged with what it holds (a .md beside it)")
    p.add_argument("--fresh", action="store_true", help="start the report anew")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_faults)
    p = sub.add_parser("resurrect", help="resurrection proof: a key-value application's "
                                         "acknowledged writes over N crashes, against "
                                         "phase-based reboot alone and a normal reboot")
    p.add_argument("--cycles", type=_at_least(1), default=20,
                   help="crashes with resurrection (default 20)")
    p.add_argument("--cycles-phasereboot", type=_at_least(3), default=3,
                   help="crashes with phase-based reboot alone (default 3, at least 3)")
    p.add_argument("--cycles-normal", type=_at_least(3), default=3,
                   help="crashes with xl's normal reboot (default 3, at least 3)")
    p.add_argument("--seed", type=int, help="seed of the random crash moments")
    p.add_argument("--report", default="build/resurrection-report.json",
                   help="the JSON report (a .md beside it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_resurrect)
    p = sub.add_parser("sample", help="save one real xl stream of a lab guest (store-bench input)")
    p.add_argument("--workload", choices=("bare", "services", "app"), default="app")
    p.add_argument("--memory", type=int, default=256)
    p.add_argument("--out", help="default: the lab cache's samples/ folder")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("store-bench", help="image store costs on the host: tmpfs vs disk, "
                                           "codecs, hot stream (input: xenpbr-lab sample)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("xenpbr_lab.store_bench",
                                             fromlist=["main"]).main(a.rest))
    p = sub.add_parser("measure", help="time the lab: boot, control channel, guest events")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_measure)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except LabError as exc:
        print(f"xenpbr-lab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
