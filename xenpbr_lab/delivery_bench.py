"""Measure the dom0 -> guest paths for resurrection delivery on real Xen (docs/resurrection.md,
"Delivery"): xenstore chunks (what xenpbr uses), a block device attached for the purpose, and
dom0 touching frames of the guest directly.

Separate from the lab tests because it is a measurement, not a pass/fail check: it boots the
lab, starts one busybox guest, runs :data:`DOM0_SCRIPT` in dom0 (with this tree's ``xenpbr``
package copied in, so it measures the code under review) and prints one JSON object::

    python -m xenpbr_lab.delivery_bench [--mib 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

from xenpbr_lab.build import build
from xenpbr_lab.host import XenHost
from xenpbr_lab.paths import artifacts_root
from xenpbr_lab.xl import LabDomain

PACKAGE = Path(__file__).resolve().parents[1] / "xenpbr"

DOM0_SCRIPT = r'''
import json, os, statistics, subprocess, sys, time
sys.path.insert(0, "/tmp/delivery-bench")
from xenpbr.xenstore import XenstoreClient
from xenpbr.resurrection.deliver import write_delivery, clear_delivery, manifest_path
from xenpbr.resurrection.model import Record
from xenpbr.guestproto.resurrection_delivery import parse_manifest, decode_chunk

domid, mib, runs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
records = [Record(b"k%d" % i, i + 1, os.urandom(1000)) for i in range(mib * 1024)]
out = {"domid": domid, "records": len(records), "runs": runs}

def timed(fn):
    start = time.monotonic(); fn(); return time.monotonic() - start

write, read = [], []
with XenstoreClient() as xs:
    for _ in range(runs):
        stats = {}
        write.append(timed(lambda: stats.update(s=write_delivery(
            xs, domid, "bench", 1, records, [], cap=64 << 20))))
        base = manifest_path(domid, "bench")
        def read_back():
            m = parse_manifest(xs.read(base))
            for i in range(m.chunks):
                decode_chunk(i, xs.read(f"{base}/{i}"))
        read.append(timed(read_back))
        clear_delivery(xs, domid, "bench")
out["xenstore"] = {"payload_bytes": stats["s"].bytes, "chunks": stats["s"].chunks,
                   "write_s": write, "read_back_s": read,
                   "write_mib_s": stats["s"].bytes / (1 << 20) / statistics.median(write)}

def xl(*argv):
    start = time.monotonic()
    proc = subprocess.run(["xl", *argv], capture_output=True, text=True, timeout=120)
    return time.monotonic() - start, proc.returncode, (proc.stderr or proc.stdout)[-300:]

subprocess.run(["truncate", "-s", f"{mib * 2}M", "/tmp/delivery-bench.img"], check=True)
attach, connected, detach, errors = [], [], [], []
def frontend_state():
    proc = subprocess.run(["sh", "-c", f"xenstore-read /local/domain/{domid}/device/vbd/"
                           f"$(xenstore-list /local/domain/{domid}/device/vbd | tail -1)/state"],
                          capture_output=True, text=True)
    return proc.stdout.strip()
for _ in range(runs):
    start = time.monotonic()
    t, rc, err = xl("block-attach", str(domid),
                    "format=raw,vdev=xvdz,access=rw,script=/lab/block-lab,"
                    "target=/tmp/delivery-bench.img")
    (attach.append(t) if rc == 0 else errors.append(f"attach ({t:.2f} s): {err}"))
    while frontend_state() != "4" and time.monotonic() - start < 20:
        time.sleep(0.01)
    connected.append([time.monotonic() - start, frontend_state()])
    t, rc, err = xl("block-detach", str(domid), "xvdz")
    if rc != 0:
        errors.append(f"detach ({t:.2f} s): {err}")
        t2, rc, err = xl("block-detach", "-f", str(domid), "xvdz")
        t = t + t2
        errors += [] if rc == 0 else [f"detach -f: {err}"]
    detach.append(t)
out["block"] = {"attach_s": attach, "frontend_connected_s_state": connected,
                "detach_s": detach, "errors": errors}

try:
    from xenpbr.hypervisor.libxc import LibxcHypervisor
    with LibxcHypervisor() as hv:
        pfns = hv.populated_pfns(domid)[:mib * 256]
        frames = [timed(lambda: hv.read_pfns(domid, pfns)) for _ in range(runs)]
    out["frames"] = {"pages": len(pfns), "map_read_s": frames}
except Exception as exc:  # a measurement: report what failed
    out["frames"] = {"error": repr(exc)}
print(json.dumps(out))
'''


def package_tar() -> bytes:
    """This tree's ``xenpbr`` package as a tar (sources only)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(PACKAGE.rglob("*.py")):
            tar.add(path, arcname=str(path.relative_to(PACKAGE.parent)))
    return buf.getvalue()


def run(mib: int, runs: int) -> dict[str, object]:
    host = XenHost(build(), artifacts_root() / time.strftime("delivery-bench-%Y%m%d-%H%M%S"))
    with host:
        host.start()
        guest = LabDomain(host, "dlvbench")
        guest.create()
        host.put("/tmp/delivery-bench.tgz", package_tar())
        host.put("/tmp/delivery-bench.py", DOM0_SCRIPT.encode())
        host.run("mkdir -p /tmp/delivery-bench && tar -xzf /tmp/delivery-bench.tgz "
                 "-C /tmp/delivery-bench")
        result = host.run(["python3", "/tmp/delivery-bench.py", str(guest.domid), str(mib),
                           str(runs)], timeout=900)
        report: dict[str, object] = json.loads(result.stdout)
        report["lab_kvm"] = "kvm" in " ".join(host.qemu_argv())
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xenpbr_lab.delivery_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1, help="payload MiB (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.mib, args.runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
