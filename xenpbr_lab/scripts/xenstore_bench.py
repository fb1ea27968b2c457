#!/usr/bin/env python3
"""Compare xenstore client candidates in a real dom0 (run as root, xenstored running).

Candidates:
  ctypes    xenpbr's client over libxenstore.so.4 (xenpbr.xenstore.XenstoreClient)
  lowlevel  Xen's own C extension xen.lowlevel.xs (Debian: xen-utils-4.17, found under
            /usr/lib/xen-4.17/lib/python)
  pyxs      pure-Python pyxs, if importable
  fake      xenpbr's in-memory FakeXenstore (no Xen needed: a self-test of this script)

For each available candidate it measures median and p90 latency of: read, write,
write+read-back, a watch round trip (write on one handle, event received on another) and
a transaction of 10 writes. Unavailable candidates are reported with the reason.

Usage (in dom0):
  python3 xenstore_bench.py                     # table for ctypes, lowlevel, pyxs
  python3 xenstore_bench.py --json > bench.json # machine-readable
  python3 xenstore_bench.py --candidates ctypes --iterations 1000
  python3 xenstore_bench.py --contract          # also run the client contract suite
  python3 xenstore_bench.py --candidates fake --contract --contract-target fake
                                                # anywhere: checks the script itself

Only the standard library and the xenpbr package are needed; if xenpbr is not installed
the repository containing this script is put on sys.path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import statistics
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
DEBIAN_XEN_PYTHON = "/usr/lib/xen-4.17/lib/python"
DEFAULT_CANDIDATES = ("ctypes", "lowlevel", "pyxs")
ALL_CANDIDATES = ("ctypes", "lowlevel", "pyxs", "fake")
OPS = ("read", "write", "write+readback", "watch_roundtrip", "transaction_10_writes")
WAIT = 5.0


def _import_xenpbr() -> None:
    import importlib.util

    if importlib.util.find_spec("xenpbr") is None:
        sys.path.insert(0, str(REPO_ROOT))


class Unavailable(Exception):
    """The candidate cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------
# Candidates: one adapter each, all with the same small interface.
# Paths are str; values bytes.


class Adapter:
    name = "?"

    def open(self) -> Any: raise NotImplementedError
    def close(self, h: Any) -> None: raise NotImplementedError
    def read(self, h: Any, path: str) -> bytes: raise NotImplementedError
    def write(self, h: Any, path: str, value: bytes) -> None: raise NotImplementedError
    def rm(self, h: Any, path: str) -> None: raise NotImplementedError
    def watch(self, h: Any, path: str, token: str) -> None: raise NotImplementedError
    def unwatch(self, h: Any, path: str, token: str) -> None: raise NotImplementedError
    def wait_event(self, h: Any, timeout: float) -> tuple[str, str] | None: raise NotImplementedError
    def transaction_writes(self, h: Any, items: list[tuple[str, bytes]]) -> int:
        """Write all items in one transaction, retrying on conflict; return attempts."""
        raise NotImplementedError

    def describe(self) -> str:
        return ""


class CtypesAdapter(Adapter):
    name = "ctypes"

    def __init__(self, libdir: str | None) -> None:
        _import_xenpbr()
        from xenpbr.xenstore import XenstoreClient, XenstoreUnavailable

        self._cls = XenstoreClient
        self._libdir = libdir
        try:
            XenstoreClient(libdir).open().close()
        except XenstoreUnavailable as e:
            raise Unavailable(str(e)) from e

    def describe(self) -> str:
        from xenpbr.ctypes_libxc import xenstore as b

        info = b.load(self._libdir).xenpbr_info
        return f"xenpbr XenstoreClient over {info.path} ({info.version})"

    def open(self) -> Any:
        return self._cls(self._libdir).open()

    def close(self, h: Any) -> None:
        h.close()

    def read(self, h, path):
        return h.read(path)

    def write(self, h, path, value):
        h.write(path, value)

    def rm(self, h, path):
        h.rm(path)

    def watch(self, h, path, token):
        h.watch(path, token)

    def unwatch(self, h, path, token):
        h.unwatch(path, token)

    def wait_event(self, h, timeout):
        ev = h.read_watch(timeout=timeout)
        return None if ev is None else (ev.path, ev.token)

    def transaction_writes(self, h, items):
        attempts = []

        def body(t):
            attempts.append(1)
            for p, v in items:
                t.write(p, v)

        h.run_transaction(body, retries=20, backoff=0)
        return len(attempts)


class FakeAdapter(CtypesAdapter):
    name = "fake"

    def __init__(self, libdir: str | None = None) -> None:
        _import_xenpbr()
        from xenpbr.xenstore import FakeXenstoreServer

        self._server = FakeXenstoreServer()

    def describe(self) -> str:
        return "xenpbr FakeXenstore (in-memory, no Xen)"

    def open(self):
        return self._server.connect(0)


class LowlevelAdapter(Adapter):
    name = "lowlevel"

    def __init__(self, xen_python_dir: str) -> None:
        if os.path.isdir(xen_python_dir) and xen_python_dir not in sys.path:
            sys.path.append(xen_python_dir)
        try:
            import xen.lowlevel.xs as xs_mod  # type: ignore[import-not-found]
        except ImportError as e:
            where = (f"{xen_python_dir} exists" if os.path.isdir(xen_python_dir)
                     else f"{xen_python_dir} does not exist (install xen-utils-4.17)")
            raise Unavailable(f"cannot import xen.lowlevel.xs ({e}); {where}; it is built "
                              f"for Debian's python3.11, this is {platform.python_version()}"
                              ) from e
        self._mod = xs_mod
        try:
            xs_mod.xs().close()
        except Exception as e:  # xen.lowlevel.xs.Error
            raise Unavailable(f"xen.lowlevel.xs cannot connect: {e}") from e
        self._tokens: dict[str, Any] = {}

    def describe(self) -> str:
        return f"xen.lowlevel.xs from {getattr(self._mod, '__file__', '?')}"

    def open(self):
        return self._mod.xs()

    def close(self, h):
        h.close()

    def read(self, h, path):
        return h.read("", path)

    def write(self, h, path, value):
        h.write("", path, value)

    def rm(self, h, path):
        h.rm("", path)

    def watch(self, h, path, token):
        # xen.lowlevel.xs keys watches by the token *object*: keep the same one
        h.watch(path, self._tokens.setdefault(token, token))

    def unwatch(self, h, path, token):
        h.unwatch(path, self._tokens[token])

    def wait_event(self, h, timeout):
        r, _, _ = select.select([h.fileno()], [], [], timeout)
        if not r:
            return None
        path, token = h.read_watch()
        return (path.decode() if isinstance(path, bytes) else path), token

    def transaction_writes(self, h, items):
        attempts = 0
        while True:
            attempts += 1
            t = h.transaction_start()
            for p, v in items:
                h.write(t, p, v)
            if h.transaction_end(t, False):
                return attempts
            if attempts > 20:
                raise RuntimeError("transaction kept conflicting")


class PyxsAdapter(Adapter):
    name = "pyxs"

    def __init__(self) -> None:
        try:
            import pyxs  # type: ignore[import-not-found]
        except ImportError as e:
            raise Unavailable(f"pyxs is not importable ({e}); 'pip install pyxs' to include "
                              "it (last release 0.4.1, 2016)") from e
        self._mod = pyxs
        try:
            c = pyxs.Client()
            c.connect()
            c.close()
        except Exception as e:
            raise Unavailable(f"pyxs cannot connect: {e!r}") from e

    def describe(self) -> str:
        return f"pyxs {getattr(self._mod, '__version__', '?')} (pure Python, unix socket)"

    def open(self):
        c = self._mod.Client()
        c.connect()
        return {"client": c, "monitor": None}

    def close(self, h):
        if h["monitor"] is not None:
            with contextlib.suppress(Exception):
                h["monitor"].close()
        h["client"].close()

    def read(self, h, path):
        return h["client"].read(path.encode())

    def write(self, h, path, value):
        h["client"].write(path.encode(), value)

    def rm(self, h, path):
        h["client"].delete(path.encode())

    def watch(self, h, path, token):
        if h["monitor"] is None:
            h["monitor"] = h["client"].monitor()
        h["monitor"].watch(path.encode(), token.encode())

    def unwatch(self, h, path, token):
        h["monitor"].unwatch(path.encode(), token.encode())

    def wait_event(self, h, timeout):
        import queue

        # Monitor.wait() cannot time out; its router thread fills Monitor.events.
        try:
            path, token = h["monitor"].events.get(timeout=timeout)
        except queue.Empty:
            return None
        return path.decode(), token.decode()

    def transaction_writes(self, h, items):
        c = h["client"]
        attempts = 0
        while True:
            attempts += 1
            c.transaction()
            for p, v in items:
                c.write(p.encode(), v)
            if c.commit():
                return attempts
            if attempts > 20:
                raise RuntimeError("transaction kept conflicting")


def make_adapter(name: str, args: argparse.Namespace) -> Adapter:
    if name == "ctypes":
        return CtypesAdapter(args.libdir)
    if name == "lowlevel":
        return LowlevelAdapter(args.xen_python_dir)
    if name == "pyxs":
        return PyxsAdapter()
    if name == "fake":
        return FakeAdapter()
    raise ValueError(name)


# --------------------------------------------------------------------------------------------
# Measurements


def _stats(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    p90 = statistics.quantiles(us, n=10)[8] if len(us) >= 2 else us[0]
    return {"n": len(us), "median_us": statistics.median(us), "p90_us": p90,
            "min_us": us[0], "max_us": us[-1], "mean_us": statistics.fmean(us)}


def _timed(n: int, warmup: int, fn: Callable[[int], object]) -> list[float]:
    for i in range(warmup):
        fn(-1 - i)
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def _wait_for(a: Adapter, h: Any, path: str, token: str) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        ev = a.wait_event(h, max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise RuntimeError(f"watch event for {path} not received within {WAIT}s")
        if ev == (path, token):
            return


def bench_candidate(a: Adapter, base: str, iterations: int, warmup: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    h = a.open()
    other = a.open()
    try:
        key = f"{base}/k"
        a.write(h, key, b"initial")

        results["read"] = _stats(_timed(iterations, warmup, lambda i: a.read(h, key)))
        results["write"] = _stats(_timed(
            iterations, warmup, lambda i: a.write(h, key, str(i).encode())))

        def write_readback(i: int) -> None:
            v = f"wr{i}".encode()
            a.write(h, key, v)
            if a.read(h, key) != v:
                raise RuntimeError("read-back mismatch")

        results["write+readback"] = _stats(_timed(iterations, warmup, write_readback))

        wpath, token = f"{base}/w", "bench"
        a.watch(other, wpath, token)
        _wait_for(a, other, wpath, token)  # xenstored fires once on registration

        def roundtrip(i: int) -> None:
            p = f"{wpath}/e"
            a.write(h, p, str(i).encode())
            _wait_for(a, other, p, token)

        results["watch_roundtrip"] = _stats(
            _timed(max(1, iterations // 2), warmup, roundtrip))
        a.unwatch(other, wpath, token)

        attempts: list[int] = []
        items = [(f"{base}/tx/{j}", b"v") for j in range(10)]
        results["transaction_10_writes"] = _stats(_timed(
            max(1, iterations // 4), warmup,
            lambda i: attempts.append(a.transaction_writes(h, items))))
        results["transaction_10_writes"]["retries"] = sum(attempts) - len(attempts)
    finally:
        with contextlib.suppress(Exception):
            a.rm(h, base)
        a.close(other)
        a.close(h)
    return results


# --------------------------------------------------------------------------------------------
# Contract (optional)


def run_contract(args: argparse.Namespace) -> list[dict[str, Any]]:
    path = Path(args.contract_file)
    if not path.is_file():
        return [{"check": "contract", "passed": False,
                 "error": f"{path} not found; pass --contract-file"}]
    _import_xenpbr()
    import importlib.util

    spec = importlib.util.spec_from_file_location("xenstore_contract", path)
    if spec is None or spec.loader is None:
        return [{"check": "contract", "passed": False, "error": f"{path} is not a module"}]
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    factory: Callable[[], Any]
    if args.contract_target == "fake":
        from xenpbr.xenstore import FakeXenstoreServer

        server = FakeXenstoreServer()
        factory = lambda: server.connect(0)  # noqa: E731
    else:
        from xenpbr.xenstore import XenstoreClient, XenstoreError

        factory = lambda: XenstoreClient(args.libdir).open()  # noqa: E731
        try:
            factory().close()
        except XenstoreError as e:
            return [{"check": "contract", "passed": False, "error": f"not run: {e}"}]
    return [{"check": n, "passed": ok, "error": err} for n, ok, err in mod.run_contract(factory)]


# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "host": platform.node(),
                           "kernel": platform.release(),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for key, p in (("hypervisor", "/sys/hypervisor/type"),
                   ("xen_major", "/sys/hypervisor/version/major"),
                   ("xen_minor", "/sys/hypervisor/version/minor"),
                   ("xen_extra", "/sys/hypervisor/version/extra")):
        with contextlib.suppress(OSError):
            env[key] = Path(p).read_text().strip()
    return env


def format_table(report: dict[str, Any]) -> str:
    lines = []
    env = report["environment"]
    xen = ".".join(env[k] for k in ("xen_major", "xen_minor") if k in env) + env.get("xen_extra", "")
    lines.append(f"xenstore bench: python {env['python']}, kernel {env['kernel']}, "
                 f"xen {xen or 'n/a'}, {report['iterations']} iterations")
    header = f"{'candidate':<10} {'operation':<24} {'median us':>10} {'p90 us':>10} {'n':>6}"
    lines.append(header)
    lines.append("-" * len(header))
    for name, c in report["candidates"].items():
        if c["status"] != "ok":
            lines.append(f"{name:<10} {c['status']}: {c['reason']}")
            continue
        for op in OPS:
            s = c["results"][op]
            lines.append(f"{name:<10} {op:<24} {s['median_us']:>10.1f} {s['p90_us']:>10.1f} "
                         f"{s['n']:>6}")
    if report.get("contract"):
        lines.append("")
        lines.append("contract:")
        for row in report["contract"]:
            mark = "PASS" if row["passed"] else "FAIL"
            lines.append(f"  {mark} {row['check']}")
            if row["error"]:  # last line only; --json has the whole traceback
                lines.append("      " + row["error"].rstrip().splitlines()[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                    help=f"comma-separated subset of {','.join(ALL_CANDIDATES)} "
                         f"(default: %(default)s)")
    ap.add_argument("--iterations", type=int, default=200,
                    help="samples for read/write (watch: half, transaction: a quarter)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--libdir", default=None,
                    help="directory of libxenstore.so.4 for the ctypes candidate "
                         "(default: $XENPBR_LIBDIR or the system)")
    ap.add_argument("--xen-python-dir", default=DEBIAN_XEN_PYTHON,
                    help="where xen.lowlevel.xs lives (default: %(default)s)")
    ap.add_argument("--base", default=None,
                    help="scratch xenstore path (default: /xenpbr-bench/<random>)")
    ap.add_argument("--contract", action="store_true",
                    help="also run tests/unit/xenstore_contract.py (see --contract-target)")
    ap.add_argument("--contract-target", choices=("ctypes", "fake"), default="ctypes",
                    help="client the contract runs against (default: %(default)s)")
    ap.add_argument("--contract-file",
                    default=str(REPO_ROOT / "tests" / "unit" / "xenstore_contract.py"))
    args = ap.parse_args(argv)
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = set(args.candidates) - set(ALL_CANDIDATES)
    if unknown:
        ap.error(f"unknown candidates: {sorted(unknown)}")
    if args.iterations < 1:
        ap.error("--iterations must be >= 1")

    report: dict[str, Any] = {"environment": environment(), "iterations": args.iterations,
                              "candidates": {}}
    for name in args.candidates:
        entry: dict[str, Any]
        try:
            adapter = make_adapter(name, args)
        except Unavailable as e:
            entry = {"status": "unavailable", "reason": str(e)}
        else:
            base = args.base or f"/xenpbr-bench/{uuid.uuid4().hex[:10]}"
            try:
                results = bench_candidate(adapter, f"{base}-{name}", args.iterations,
                                          args.warmup)
            except Exception as e:  # keep going with the other candidates
                entry = {"status": "failed", "reason": f"{e!r}",
                         "traceback": traceback.format_exc(limit=5)}
            else:
                entry = {"status": "ok", "description": adapter.describe(), "results": results}
        report["candidates"][name] = entry
    if args.contract:
        report["contract"] = run_contract(args)

    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(format_table(report))
    failed = any(c["status"] == "failed" for c in report["candidates"].values())
    failed |= any(not r["passed"] for r in report.get("contract", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
