"""The xenstore client against the real xenstored, from dom0 and from inside a guest."""

from __future__ import annotations

import json
from pathlib import Path

CONTRACT = Path(__file__).parents[1] / "unit" / "xenstore_contract.py"
BENCH = "/usr/lib/python3/dist-packages/xenpbr_lab/scripts/xenstore_bench.py"


def test_client_contract_holds_against_real_xenstored(xen_host) -> None:
    xen_host.put("/tmp/xenstore_contract.py", CONTRACT.read_bytes())
    result = xen_host.run(["python3", BENCH, "--json", "--iterations", "20", "--contract",
                           "--contract-file", "/tmp/xenstore_contract.py",
                           "--candidates", "ctypes"], timeout=600, check=False)
    report = json.loads(result.stdout)
    rows = report["contract"]
    failures = [(r["check"], r["error"]) for r in rows if not r["passed"]]
    assert len(rows) > 10 and not failures, failures


def test_guest_sees_only_its_own_tree(xen_host, lab_domain) -> None:
    guest = lab_domain("xsprobe", mode="probe")
    guest.create(paused=True)
    domid = guest.domid
    control = f"/local/domain/{domid}/control/xenpbr"
    xen_host.run(f"xenstore-write {control}/note from-dom0 && "
                 f"xenstore-chmod -r {control} n0 r{domid}")
    xen_host.run(["xl", "unpause", guest.name])
    line = guest.wait_for_console(r"XENPBR-PROBE: (.*)", timeout=120).group(1)
    probe = json.loads(line)
    assert "error" not in probe, probe
    assert probe["domid"] == domid and probe["home"] == f"/local/domain/{domid}"
    assert probe["own_data_roundtrip"] is True
    assert probe["write_control"] == "denied"
    assert probe["write_dom0_tree"] == "denied"
    assert probe["dom0_note"] == "from-dom0"
    assert probe["watch_events"] == ["tok", "tok"]  # on registration, then on the write
    # What the guest wrote is visible to dom0 under the guest's own data/.
    seen = xen_host.run(["xenstore-read", f"/local/domain/{domid}/data/xenpbr/probe"]).stdout
    assert seen.strip() == "x"
