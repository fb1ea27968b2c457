"""The phase protocol on real Xen: the guest agent in a lab guest, dom0's protocol code in
dom0, talking through the real xenstored (no capture: dom0 only answers).

* ``lab.mode=agent``: the agent marks three phases; dom0 answers ``captured``,
  ``restored:1`` (pretended: no real restore) and ``refused:hazard``; the guest shows the
  verdicts, exit codes and which configured steps ran.
* ``lab.mode=hostile``: the guest writes bad requests with ``xenstore-write`` (dom0
  leaves them in ``control/xenpbr-lab/case/<n>``); dom0 refuses each with its reason,
  the guest cannot forge an ack, and the agent's good request is still served.
"""

from __future__ import annotations

import json
import re

RESPONDER = r"""
import json, subprocess, time
from xenpbr.xenstore import XenstoreClient
from xenpbr.guestproto.control import (PhaseProtocol, ack_path, control_path,
                                     domid_from_token, generation_path, request_watch)
from xenpbr.guestproto.gate import Outcome, RateLimit, RequestGate
from xenpbr.guestproto.wire import Verdict

DOMID, NAME, PLANS, EXPECT, CASES = {domid}, {name!r}, {plans!r}, {expect}, {cases!r}
lab = f"/local/domain/{{DOMID}}/control/xenpbr-lab"
report = {{"events": []}}
with XenstoreClient() as xs:
    proto = PhaseProtocol(xs, RequestGate(RateLimit(1000, 60)))
    proto.register(DOMID)
    for n, case in enumerate(CASES):
        xs.write(f"{{lab}}/case/{{n}}", bytes.fromhex(case))
    xs.write(f"{{lab}}/handled", "0")
    xs.set_perms(lab, owner=0, acl=[(DOMID, "r")])
    report["perms"] = str(xs.get_perms(control_path(DOMID)))
    path, token = request_watch(DOMID)
    xs.watch(path, token)
    assert xs.read_watch(timeout=10) is not None  # the registration event
    subprocess.run(["xl", "unpause", NAME], check=True)
    deadline, handled, accepted = time.monotonic() + 500, 0, 0
    while accepted < EXPECT and time.monotonic() < deadline:
        ev = xs.read_watch(timeout=5)
        if ev is None or domid_from_token(ev.token) != DOMID:
            continue
        adm = proto.poll(DOMID)
        entry = {{"outcome": adm.outcome.value}}
        if adm.refusal is not None:
            entry.update(reason=adm.refusal.reason, seq=adm.refusal.seq,
                         ack=adm.ack.encode() if adm.ack else None)
        if adm.outcome is Outcome.ACCEPTED:
            req, accepted = adm.request, accepted + 1
            plan = PLANS.get(req.phase, "captured")
            entry.update(seq=req.seq, phase=req.phase, phases=list(req.phases), plan=plan,
                         disks=len(req.disks), wait=req.wait)
            if plan.startswith("restored:"):
                proto.restored(DOMID, req.seq, int(plan.split(":")[1]))
            else:
                proto.answer(DOMID, req.seq, Verdict.parse(plan))
        report["events"].append(entry)
        handled += 1
        xs.write(f"{{lab}}/handled", str(handled))
    report["refusals"] = proto.gate.refusal_counts(DOMID)
    report["ack"] = xs.read_or(ack_path(DOMID), b"").decode()
    report["generation"] = xs.read_or(generation_path(DOMID), b"").decode()
    report["request"] = xs.read_or(path, b"").decode("ascii", "replace")
print(json.dumps(report))
"""


def respond(dom0_python, guest, plans: dict[str, str], expect: int,
            cases: list[bytes] = ()) -> dict:
    """Run the dom0 responder for ``guest`` (created paused) until it has accepted
    ``expect`` requests; it unpauses the guest once its watch is set."""
    code = RESPONDER.format(domid=guest.domid, name=guest.name, plans=plans, expect=expect,
                            cases=[c.hex() for c in cases])
    return dom0_python(code, timeout=600)


def agent_lines(guest, count: int) -> dict[str, tuple[str, int]]:
    """``{phase: (verdict, rc)}`` once the guest printed ``count`` ``XENPBR-AGENT:`` lines."""
    line = r"XENPBR-AGENT: (\S+) (\S+) rc=(\d+)"
    guest.wait_for_console(r"(?s)(?:XENPBR-AGENT: \S+ \S+ rc=\d+.*?){%d}" % count,
                           timeout=300)
    return {phase: (verdict, int(rc))
            for phase, verdict, rc in re.findall(line, guest.console())}


def test_agent_boundaries_on_real_xen(lab_domain, dom0_python) -> None:
    guest = lab_domain("agent", mode="agent", extra="lab.phases=kernel,services,app")
    guest.create(paused=True)
    domid = guest.domid
    report = respond(dom0_python, guest, {"kernel": "captured", "services": "restored:1",
                                          "app": "refused:hazard"}, expect=3)
    accepted = [e for e in report["events"] if e["outcome"] == "accepted"]
    assert [(e["seq"], e["phase"]) for e in accepted] == [(1, "kernel"), (2, "services"),
                                                          (3, "app")], report
    assert accepted[0]["phases"] == ["kernel", "services", "app"]
    assert accepted[0]["disks"] == 0 and accepted[0]["wait"] == 120  # initramfs guest
    assert report["refusals"] == {} and report["perms"] == f"n0 r{domid}"
    assert report["generation"] == "1" and report["ack"] == "3 refused:hazard"

    lines = agent_lines(guest, 3)
    assert lines == {"kernel": ("captured", 0), "services": ("restored:1", 0),
                     "app": ("refused:hazard", 3)}, guest.console()[-3000:]
    console = guest.console()  # the agent logs each step's output as "<step>: | <line>"
    assert console.count("| XENPBR-STEP: after-restore") == 1, console[-3000:]
    assert console.count("| XENPBR-STEP: after-last-phase") == 1, console[-3000:]
    assert console.index("| XENPBR-STEP: after-restore") < console.index(
        "XENPBR-AGENT: services restored:1")


def good(seq: int, phase: str = "kernel", **extra: object) -> bytes:
    doc = {"v": 1, "seq": seq, "phase": phase, "phases": ["kernel"], "identity": "lab",
           "wait": 60, "disks": [], "services": [], "hazards": [], **extra}
    return json.dumps(doc, separators=(",", ":")).encode()


#: (name, bytes the guest writes, what dom0 must make of it: reason + ack, or another outcome)
HOSTILE = [
    ("not json", b"hello world", ("bad-request:json", None)),
    ("raw NUL and controls", b"\x00\x01\x7f junk", ("bad-request:json", None)),
    ("not utf-8", b'{"v":1,"seq":1,"phase":"\xff\xfe"}', ("bad-request:encoding", None)),
    ("nesting bomb", b"[" * 500 + b"]" * 500, ("bad-request:json", None)),
    ("NaN", b'{"v":1,"seq":NaN}', ("bad-request:json", None)),
    ("a list", b"[1,2,3]", ("bad-request:not-object", None)),
    ("duplicate key", b'{"seq":6,"seq":7}', ("bad-request:duplicate-key", None)),
    ("unknown key", good(1, path="/etc/shadow"), ("bad-request:unknown-key",
                                                  "1 refused:bad-request:unknown-key")),
    ("phase ../../etc", good(2, phase="../../etc"), ("bad-request:phase",
                                                     "2 refused:bad-request:phase")),
    ("NUL in phase", good(3, phase="kernel\x00"), ("bad-request:phase",
                                                   "3 refused:bad-request:phase")),
    ("huge seq", good(10**300), ("bad-request:seq", None)),
    ("float seq", good(4.0), ("bad-request:seq", None)),  # type: ignore[arg-type]
    ("300 services", good(5, services=["s"] * 300), ("bad-request:services",
                                                     "5 refused:bad-request:services")),
    ("replayed seq", good(2), ("stale-seq", None)),
    ("undeclared phase", good(7, phase="app"), ("unknown-phase", "7 refused:unknown-phase")),
    ("same bytes again", good(7, phase="app"), "duplicate"),
    ("1900 bytes", b'{"v":1,' + b" " * 1892 + b"}", ("bad-request:json", None)),
    ("1901 bytes", b'{"v":1,' + b" " * 1893 + b"}", ("bad-request:size", None)),
    # xenstored's default node quota for a guest stops these before dom0 sees them
    ("2048 bytes", b'{"v":1,' + b" " * 2040 + b"}", "write-failed"),
    ("3000 bytes", b'{"v":1,' + b" " * 2992 + b"}", "write-failed"),
]


def test_hostile_guest_is_refused_and_dom0_keeps_serving(lab_domain, dom0_python) -> None:
    guest = lab_domain("hostile", mode="hostile", extra="lab.phases=kernel")
    guest.create(paused=True)
    report = respond(dom0_python, guest, {"kernel": "captured"}, expect=1,
                     cases=[data for _, data, _ in HOSTILE])
    written = dict(re.findall(r"XENPBR-HOSTILE: (\d+) (written|write-failed)",
                              guest.console()))
    print("guest writes:", written, "\ndom0 saw:", *report["events"], sep="\n  ")
    events = iter(report["events"])
    for n, (name, _, expected) in enumerate(HOSTILE):
        if expected == "write-failed":
            assert written.get(str(n)) == "write-failed", (name, guest.console()[-2000:])
            continue
        assert written.get(str(n)) == "written", (name, guest.console()[-2000:])
        event = next(events)
        got = ((event.get("reason"), event.get("ack")) if event["outcome"] == "refused"
               else event["outcome"])
        assert got == expected, (name, report)
    final = next(events)  # the agent's request, after all that
    assert final["outcome"] == "accepted" and final["seq"] == 8 and final["plan"] == "captured"
    refused = [e["reason"] for e in report["events"] if e["outcome"] == "refused"]
    assert report["refusals"] == {r: refused.count(r) for r in refused}
    assert agent_lines(guest, 1) == {"kernel": ("captured", 0)}
    assert re.search(r"XENPBR-HOSTILE: forge-ack rc=[1-9]", guest.console())
    assert report["ack"] == "8 captured"
