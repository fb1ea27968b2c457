"""A hostile guest beside a calm one on real Xen (issue 13, points 1 and 2).

``lab.mode=deluge`` writes well-formed boundary requests, each with a fresh seq, as fast
as its shell can, then the bad requests an independent test found unanswered. Two
``lab.mode=calm`` guests run the agent with three phases and time each boundary: the
first alone, the second while the flood runs. The calm guests must be served about as
fast under the flood as alone, the flooder's bad requests each answered with their
refusal, counted, published and shown by ``xenpbr status``, and a calm guest crashed
under the flood recovered and its next request answered. The figures (latencies, CPU and
memory of xenpbrd and xenstored, the image store's size) are printed for the report.

Run: ``.venv/bin/python -m pytest tests/lab/test_hostile_real.py -x -s``
"""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.lab.xen_real import agent_verdicts
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.host import XenHost
from xenpbr_lab.xl import LabDomain

PHASES = "kernel,services,app"
QUOTA = 512 << 20  # per domain, set in dom0's /etc/xenpbr/xenpbr.conf for this test
CONF = "/etc/xenpbr/xenpbr.conf"
ACK_LOG = "/tmp/hostile-acks.log"

#: The deluge's bad requests (guest-init.sh) and the refusal each must be acked with
#: (None: any refusal; a well-formed request whose list adds a phase reaches the
#: controller, or is rate-limited after the flood).
BAD = {"dotdot": "bad-request:phase", "slash": "bad-request:phase",
       "nul": "bad-request:phase", "long": "bad-request:phase",
       "undeclared": "unknown-phase", "badlist": "bad-request:phases", "undeclist": None}

#: dom0 Python: CPU seconds and RSS of xenpbrd and xenstored (from /proc).
USAGE = r"""
import json, os, subprocess
tick = os.sysconf("SC_CLK_TCK")
def usage(pid):
    stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    rss = [l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")][0].split()[1]
    return {"cpu_s": (int(stat[11]) + int(stat[12])) / tick, "rss_kib": int(rss)}
pids = {"xenpbrd": int(open("/run/xenpbrd.pid").read())}
for name in ("xenstored", "oxenstored"):
    out = subprocess.run(["pidof", name], capture_output=True, text=True).stdout.split()
    if out:
        pids["xenstored"] = int(out[0])
def size(top):  # as `du -sb` counts: apparent bytes of every file (dom0's du is busybox's)
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(top) for f in fs)
root = "/var/lib/xenpbr/images"
from pathlib import Path
from xenpbr.images.store import ImageStore
store = ImageStore(Path(root))
print(json.dumps({**{k: usage(p) for k, p in pids.items()}, "store_bytes": size(root),
                  "domains": {d: store.usage(d).total for d in NAMES}}))
"""


#: dom0 Python: log, on dom0's clock, every change of a guest's request and ack (one
#: recursive watch on /local/domain), so a boundary's latency can be measured in dom0:
#: from the request's write to its answer, without the guest's own CPU share in it.
TIMELINE = r"""
import os, re, time
from xenpbr.xenstore import XenstoreClient
keep = re.compile(r"/local/domain/(\d+)/(data/xenpbr/request|control/xenpbr/ack)$")
with XenstoreClient() as xs, open("/tmp/hostile-timeline.log", "w") as out:
    xs.watch("/local/domain", "timeline")
    while not os.path.exists("/tmp/hostile-timeline.stop"):
        ev = xs.read_watch(timeout=1)
        m = keep.match(ev.path) if ev is not None else None
        if m:
            value = (xs.read_or(ev.path, b"") or b"")[:200].decode("ascii", "replace")
            out.write(f"{time.monotonic():.3f} {m.group(1)} {m.group(2)} {value}\n")
            out.flush()
"""


def start_timeline(xen_host: XenHost) -> None:
    xen_host.put("/tmp/hostile-timeline.py", TIMELINE.encode())
    xen_host.run("rm -f /tmp/hostile-timeline.stop; python3 /tmp/hostile-timeline.py "
                 "> /tmp/hostile-timeline.err 2>&1 < /dev/null & echo $! > /run/timeline.pid")
    time.sleep(2)


def dom0_latencies(xen_host: XenHost, domid: int) -> dict[int, tuple[float, str]]:
    """seq -> (seconds from the request's write to its answer, the answer), on dom0's
    clock, from the timeline log (restored:<g> acks are not answers to a write)."""
    written: dict[int, float] = {}
    answered: dict[int, tuple[float, str]] = {}
    for line in xen_host.run(["cat", "/tmp/hostile-timeline.log"]).stdout.splitlines():
        t, dom, key, value = (line.split(" ", 3) + [""])[:4]
        if int(dom) != domid:
            continue
        if key.endswith("request") and (m := re.search(r'"seq":\s*(\d+)', value)):
            written.setdefault(int(m.group(1)), float(t))
        elif key.endswith("ack") and (m := re.fullmatch(r"(\d+) (\S+)", value)):
            seq = int(m.group(1))
            if seq in written and not m.group(2).startswith("restored"):
                answered.setdefault(seq, (float(t) - written[seq], m.group(2)))
    return answered


def capture_seconds(log: str, name: str) -> dict[int, float]:
    """seq -> seconds the capture of that boundary took (xenpbrd's log)."""
    seqs = dict(re.findall(rf"{name}: capturing phase (\S+) \(seq (\d+)\)", log))
    return {int(seqs[phase]): float(seconds) for phase, seconds in
            re.findall(rf"{name}: captured phase (\S+) \(\S+\) in ([\d.]+) s", log)
            if phase in seqs}


def measure(xen_host: XenHost, *names: str) -> dict:
    """xenpbrd's and xenstored's CPU and RSS, the store's size and each domain's usage."""
    code = f"NAMES = {list(names)!r}\n" + USAGE
    return json.loads(xen_host.run(["python3", "-c", code]).stdout.strip().splitlines()[-1])


def calm_guest(xen_host: XenHost, lab_domain, prefix: str) -> LabDomain:
    guest = lab_domain(prefix, mode="calm", extra=f"lab.phases={PHASES}",
                       on_crash="phasereboot")
    guest.write_config()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    return guest


def boundary_seconds(guest: LabDomain) -> dict[str, float]:
    """Each phase's boundary as the guest timed it (agent run, request to ack)."""
    return {p: float(t1) - float(t0) for p, t0, t1 in
            re.findall(r"XENPBR-TIMED: (\S+) ([\d.]+) ([\d.]+)", guest.console())}


def lab_key(xen_host: XenHost, guest: LabDomain, key: str) -> None:
    """Write control/xenpbr-lab/KEY in the guest's home, readable by the guest."""
    domid = guest.domid
    base = f"/local/domain/{domid}/control/xenpbr-lab"
    xen_host.run(f"xenstore-write {base}/{key} 1 && xenstore-chmod {base} n0 r{domid} && "
                 f"xenstore-chmod {base}/{key} n0 r{domid}")


def published(xen_host: XenHost, name: str) -> dict[str, str]:
    out = xen_host.run(["xenstore-ls", "-f", f"/xenpbr/domains/{name}"]).stdout
    prefix = f"/xenpbr/domains/{name}/"
    return {m.group(1)[len(prefix):]: m.group(2)
            for m in re.finditer(r'^(\S+) = "(.*)"$', out, re.M) if m.group(1).startswith(prefix)}


@pytest.fixture
def xenpbrd_with_quota(xen_host: XenHost):
    """xenpbrd with a per-domain image quota (the store must stay bounded by it)."""
    xen_host.run(f"mkdir -p /etc/xenpbr && printf '[images]\\ndefault_quota = {QUOTA}\\n' "
                 f"> {CONF}")
    xenpbrd_lab.start(xen_host)
    try:
        yield
    finally:
        xen_host.run("touch /tmp/hostile-timeline.stop; kill $(cat /run/timeline.pid)",
                     check=False)
        print("---- xenpbrd log ----\n" + xenpbrd_lab.stop(xen_host)[-6000:])
        xen_host.run(f"rm -f {CONF} {ACK_LOG} /tmp/hostile-timeline.*", check=False)


@pytest.mark.long  # 3.5 min: make test-long (CI keeps test_protocol_real's hostile guest)
@pytest.mark.timeout(1800)  # a kill limit only: TCG on a loaded machine can be very slow
def test_a_flood_costs_only_the_flooder(xen_host, lab_domain, xenpbrd_with_quota) -> None:
    started = time.monotonic()
    start_timeline(xen_host)
    alone = calm_guest(xen_host, lab_domain, "calm")
    first = agent_verdicts(alone, 3, timeout=600)
    alone_dom0 = dom0_latencies(xen_host, alone.domid)
    assert [(p, v) for p, v, _ in first] == [(p, "captured") for p in PHASES.split(",")]
    alone_s = boundary_seconds(alone)
    before = measure(xen_host, alone.name)

    flood = lab_domain("deluge", mode="deluge", extra="lab.flood=900",
                       on_crash="phasereboot")
    flood.write_config()
    xenpbrd_lab.cli(xen_host, "create", flood.config_path)
    flood.wait_for_console(r"XENPBR-DELUGE: flooding", timeout=300)
    flood_started = time.monotonic()

    calm = calm_guest(xen_host, lab_domain, "calmer")  # boots and marks under the flood
    under = agent_verdicts(calm, 3, timeout=900)
    assert [(p, v) for p, v, _ in under] == [(p, "captured") for p in PHASES.split(",")]
    under_s = boundary_seconds(calm)
    under_dom0 = dom0_latencies(xen_host, calm.domid)
    assert "XENPBR-DELUGE: wrote" not in flood.console(), "the flood ended too early"

    offset = calm.console_size()  # crashed under the flood: recovered, then served
    xen_host.run(["xl", "sysrq", calm.name, "c"])
    (phase, verdict, rc), = agent_verdicts(calm, 1, after=offset, timeout=900)
    assert (phase, verdict, rc) == ("app", "restored:1", 0)
    offset = calm.console_size()
    lab_key(xen_host, calm, "again")
    calm.wait_for_console(r"XENPBR-AGENT: .* again", after=offset, timeout=600)
    again = re.search(r"XENPBR-AGENT: (\S+) (\S+) rc=(\d+) again", calm.console()[offset:])
    assert again and again.group(2) == "skipped", calm.console()[offset:]
    again_dom0 = dom0_latencies(xen_host, calm.domid)
    assert "XENPBR-DELUGE: wrote" not in flood.console(), "the flood ended too early"
    during = measure(xen_host, alone.name, calm.name, flood.name)
    time.sleep(20)  # the flood alone: what it costs dom0 a second
    flood_only = measure(xen_host, alone.name, calm.name, flood.name)

    fdomid = flood.domid
    poll = f"while :; do xenstore-read /local/domain/{fdomid}/control/xenpbr/ack; sleep 0.1; done"
    xen_host.run(f"sh -c '{poll}' > {ACK_LOG} 2>/dev/null < /dev/null & "
                 "echo $! > /run/hostile-acks.pid")
    try:
        lab_key(xen_host, flood, "stop")
        flood.wait_for_console(r"XENPBR-DELUGE: done", timeout=1200)
    finally:
        xen_host.run("kill $(cat /run/hostile-acks.pid)", check=False)
    console = flood.console()
    wrote = re.search(r"XENPBR-DELUGE: wrote (\d+) requests in (\d+) s", console)
    answers = dict(re.findall(r"XENPBR-BAD: (\S+) seq=\d+ ack=(.*)", console))
    assert set(answers) == set(BAD), console[-3000:]
    seen_by_dom0 = set(xen_host.run(["cat", ACK_LOG]).stdout.split("\n"))
    for case, reason in BAD.items():
        ack = answers[case].strip()
        assert re.fullmatch(r"\d+ refused:\S+", ack), (case, ack)
        assert reason is None or ack.endswith(f" refused:{reason}"), (case, ack)
        assert ack in seen_by_dom0, (case, ack, sorted(seen_by_dom0)[-20:])

    time.sleep(3)  # refusal counters are published at most once a second
    counts = {k[len("refusals/"):]: int(v) for k, v in published(xen_host, flood.name).items()
              if k.startswith("refusals/")}
    assert counts.get("bad-request-phase", 0) >= 4 and counts.get("unknown-phase", 0) >= 1
    assert counts.get("bad-request-phases", 0) >= 1 and counts.get("rate-limited", 0) >= 1
    status = {row["name"]: row for row in xenpbrd_lab.cli(xen_host, "status")}
    assert status[flood.name]["refusals"]["bad-request:phase"] == counts["bad-request-phase"]
    assert status[calm.name]["refusals"] == {} and status[alone.name]["refusals"] == {}
    after = measure(xen_host, alone.name, calm.name, flood.name)
    assert xenpbrd_lab.running(xen_host)

    assert all(used <= QUOTA for used in after["domains"].values()), after["domains"]
    assert after["store_bytes"] <= 3 * QUOTA  # pages are shared between domains

    xen_host.run("touch /tmp/hostile-timeline.stop", check=False)
    log = xenpbrd_lab.log_text(xen_host)
    alone_cap, under_cap = capture_seconds(log, alone.name), capture_seconds(log, calm.name)
    print("\n" + "\n".join(line for line in log.splitlines()
                            if re.search(r"captured phase|recovered via|capturing phase", line)))
    print(f"\nboundary seconds alone (guest):       {alone_s}")
    print(f"boundary seconds under flood (guest): {under_s}")
    print(f"request->answer alone (dom0):       {alone_dom0}")
    print(f"request->answer under flood (dom0): {under_dom0}")
    print(f"after the recovery (dom0): {again_dom0}")
    print(f"flood: {wrote.group(1) if wrote else '?'} requests in "
          f"{wrote.group(2) if wrote else '?'} s (guest clock); host "
          f"{time.monotonic() - flood_started:.0f} s; refusals {counts}")
    window = {k: round(flood_only[k]["cpu_s"] - during[k]["cpu_s"], 2)
              for k in ("xenpbrd", "xenstored") if k in during}
    print(f"CPU seconds in 20 s of flood alone (no capture): {window}")
    for label, m in (("before flood", before), ("during flood", during),
                     ("after flood", after)):
        print(f"{label}: xenpbrd {m['xenpbrd']}, xenstored {m.get('xenstored')}, "
              f"image store {m['store_bytes']} bytes {m['domains']}")
    print(f"test wall time {time.monotonic() - started:.0f} s")
    # Asserted: the calm guest's wait for dom0, on dom0's clock: from its request's write
    # to its answer, less the capture itself. That is what xenpbrd's scheduling decides
    # (queueing behind the flood, judging, answering). Printed, not asserted: the capture
    # time and the guest-side figures. Under TCG on a shared host, the flooder's busy
    # vCPU takes host CPU from dom0's and the calm guest's emulated CPUs (in the first
    # runs: captures 4x slower, calm boots 10x slower, with xenpbrd serving each request
    # at once); on hardware that contention is the Xen scheduler's, not xenpbrd's.
    assert sorted(alone_dom0) == [1, 2, 3] and sorted(under_dom0) == [1, 2, 3]
    assert 4 in again_dom0 and again_dom0[4][1] == "skipped", again_dom0
    wait_alone = {q: round(t - alone_cap[q], 2) for q, (t, _) in alone_dom0.items()}
    wait_under = {q: round(t - under_cap[q], 2) for q, (t, _) in under_dom0.items()}
    print(f"captures alone {alone_cap}, under flood {under_cap} (seconds)")
    print(f"waiting for dom0 (answer - request - capture): alone {wait_alone}, "
          f"under flood {wait_under}")
    for seq, seconds in wait_alone.items():
        assert wait_under[seq] <= max(3 * seconds, seconds + 10), (wait_alone, wait_under)
