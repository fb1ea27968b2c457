"""Phase-based reboot end to end on real Xen: xenpbrd captures each boot phase of a guest
running the agent, the guest kernel crashes, xenpbrd restores the deepest image, and the
agent inside learns it was restored.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from xenpbr_lab.xl import LabDomain, render_config

STATE = "/var/lib/xenpbr"
DAEMON = (f"XENPBR_STATE_DIR={STATE} setsid python3 -m xenpbr.daemon "
          f"> /var/log/xenpbrd.log 2>&1 < /dev/null & echo $! > /run/xenpbrd.pid")
READY = ("for i in $(seq 100); do grep -q 'xenpbrd serving' /var/log/xenpbrd.log && exit 0; "
         "sleep 0.2; done; cat /var/log/xenpbrd.log; exit 1")
CLI = ["env", f"XENPBR_STATE_DIR={STATE}", "python3", "-m", "xenpbr.cli"]
AGENT_LINE = r"XENPBR-AGENT: (\S+) (\S+) rc=(\d+)"


@pytest.fixture
def xenpbrd(xen_host):
    """xenpbrd running in dom0 for one test, stopped (and its log shown) afterwards."""
    xen_host.run(f"rm -rf {STATE} && mkdir -p {STATE} && {DAEMON}")
    xen_host.run(READY, timeout=60)
    yield
    log = xen_host.run("kill $(cat /run/xenpbrd.pid); sleep 0.5; cat /var/log/xenpbrd.log",
                       check=False).stdout
    print("---- xenpbrd log ----\n" + log[-6000:])


def agent_verdicts(guest: LabDomain, count: int, after: int = 0,
                   timeout: float = 300) -> list[tuple[str, str, int]]:
    guest.wait_for_console(r"(?s)(?:%s.*?){%d}" % (AGENT_LINE, count), after=after,
                           timeout=timeout)
    return [(p, v, int(rc)) for p, v, rc in re.findall(AGENT_LINE, guest.console()[after:])]


def test_crash_is_recovered_from_the_deepest_phase(xen_host, lab_domain, xenpbrd) -> None:
    guest = lab_domain("pbr", mode="agent", extra="lab.phases=kernel,services,app",
                       on_crash="phasereboot")
    xen_host.put(guest.config_path, render_config(guest.config).encode())
    xen_host.run(["rm", "-f", guest.console_log])
    xen_host.run([*CLI, "create", guest.config_path], timeout=120)

    first_boot = agent_verdicts(guest, 3)
    assert [(p, v) for p, v, _ in first_boot] == [("kernel", "captured"),
                                                   ("services", "captured"),
                                                   ("app", "captured")], first_boot
    images = json.loads(xen_host.run([*CLI, "images", guest.name, "--json"]).stdout)
    assert [row["phase"] for row in images if row["valid"]] == ["kernel", "services", "app"]

    old_domid = guest.domid
    offset = guest.console_size()
    start = time.monotonic()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    (phase, verdict, rc), = agent_verdicts(guest, 1, after=offset)
    recovered_in = time.monotonic() - start
    assert (phase, verdict, rc) == ("app", "restored:1", 0)
    assert guest.domid != old_domid
    assert "XENPBR-STEP: after-restore" in guest.console()[offset:]

    history = json.loads(xen_host.run([*CLI, "history", guest.name, "--json"]).stdout)
    assert history[-1]["method"] == "phase:app" and history[-1]["outcome"] == "recovered"
    print(f"crash -> agent saw 'restored': {recovered_in:.2f} s (host clock); "
          f"xenpbrd breakdown: {history[-1]['since_crash']}")
