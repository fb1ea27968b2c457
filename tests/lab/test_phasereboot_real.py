"""Phase-based reboot end to end on real Xen: xenpbrd captures each boot phase of a guest
running the agent, the guest kernel crashes, xenpbrd restores the deepest image, and the
agent inside learns it was restored.
"""

from __future__ import annotations

import re
import time

import pytest

from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.xl import LabDomain

AGENT_LINE = r"XENPBR-AGENT: (\S+) (\S+) rc=(\d+)"


@pytest.fixture
def xenpbrd(xen_host):
    """xenpbrd running in dom0 for one test, stopped (and its log shown) afterwards."""
    xenpbrd_lab.start(xen_host)
    yield
    print("---- xenpbrd log ----\n" + xenpbrd_lab.stop(xen_host)[-6000:])


def agent_verdicts(guest: LabDomain, count: int, after: int = 0,
                   timeout: float = 300) -> list[tuple[str, str, int]]:
    guest.wait_for_console(r"(?s)(?:%s.*?){%d}" % (AGENT_LINE, count), after=after,
                           timeout=timeout)
    return [(p, v, int(rc)) for p, v, rc in re.findall(AGENT_LINE, guest.console()[after:])]


def test_crash_is_recovered_from_the_deepest_phase(xen_host, lab_domain, xenpbrd) -> None:
    guest = lab_domain("pbr", mode="agent", extra="lab.phases=kernel,services,app",
                       on_crash="phasereboot")
    guest.write_config()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)

    first_boot = agent_verdicts(guest, 3)
    assert [(p, v) for p, v, _ in first_boot] == [("kernel", "captured"),
                                                   ("services", "captured"),
                                                   ("app", "captured")], first_boot
    images = xenpbrd_lab.cli(xen_host, "images", guest.name)
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

    history = xenpbrd_lab.cli(xen_host, "history", guest.name)
    assert history[-1]["method"] == "phase:app" and history[-1]["outcome"] == "recovered"
    print(f"crash -> agent saw 'restored': {recovered_in:.2f} s (host clock); "
          f"xenpbrd breakdown: {history[-1]['since_crash']}")
