"""Resurrection end to end on real Xen: a key-value application in the guest registers a
region and writes while the guest kernel is crashed; xenpbrd extracts the region from the
crashed memory, restores the app phase's image (taken before the application ever ran),
delivers the records before the ack, the agent hands them over, and the restarted
application finds the latest acknowledged value of every key.

The phase-based reboot alone would bring the guest back with none of those writes: the
image predates them. ``xenpbr-lab resurrect`` repeats this many times beside the other
recovery methods and writes the report; this test is its representative single cycle.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.lab.test_phasereboot_real import protected_guest, published, wait_for_history
from tests.lab.xen_real import agent_verdicts
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.errors import LabTimeout
from xenpbr_lab.resurrect_app import APP
from xenpbr_lab.resurrection_proof import lost_keys  # shared with make resurrect

KEYS = 30
# not anchored at a line start: the guest's shell prompt on hvc0 may precede a line
ACK = re.compile(r"ACK (\d+) (k\d{6}) ([0-9a-f]{16})\b")
LOADED = re.compile(r"LOADED (k\d{6}) ([0-9a-f]{16})\b")


def acked_writes(console: str) -> list[tuple[str, str]]:
    """(key, digest) of every write the application acknowledged, in order."""
    return [(key, dig) for _, key, dig in ACK.findall(console)]


def crash(xen_host, guest, offset: int, attempts: int = 3) -> None:
    """``xl sysrq c`` until the guest kernel panics. Seen once in the lab while the
    application wrote: the guest consumed ``control/sysrq`` and went on running, with no
    "sysrq: Trigger a crash" on its console; a second key crashed it."""
    for attempt in range(1, attempts + 1):
        xen_host.run(["xl", "sysrq", guest.name, "c"])
        try:
            guest.wait_for_console(r"Kernel panic|sysrq: Trigger a crash", after=offset,
                                   timeout=120)
            return
        except LabTimeout:
            print(f"sysrq c #{attempt}: no panic within 120 s, sending it again")
    raise AssertionError(f"{guest.name} did not crash after {attempts} sysrq c")


@pytest.mark.timeout(1200)  # three boundaries, a crash, a restore under TCG
def test_acknowledged_writes_survive_the_kernel_crash(xen_host, lab_domain, xenpbrd) -> None:
    guest = protected_guest(xen_host, lab_domain, "res", mode="resurrect",
                            extra=f"lab.keys={KEYS} lab.rate=20", xenpbr_resurrect=1)
    guest.wait_for_console(r"\nACK 60 ", timeout=300)  # the 60th write (seqs from 1)
    offset = guest.console_size()
    crash(xen_host, guest, offset)
    (phase, verdict, rc), = agent_verdicts(guest, 1, after=offset, timeout=600)
    assert (phase, verdict, rc) == ("app", "restored:1", 0)
    guest.wait_for_console(r"LOADED-COUNT \d+", after=offset, timeout=300)

    console = guest.console()
    acked = acked_writes(console[:offset])
    after = console[offset:]
    loaded = dict(LOADED.findall(after))
    count = int(re.search(r"LOADED-COUNT (\d+)", after).group(1))
    assert count == len(loaded) == len({k for k, _ in acked}) == KEYS, (count, len(loaded))
    assert lost_keys(acked, loaded, KEYS) == []
    assert "XENPBR-RESURRECTED: kvdemo" in after  # the application's procedure ran

    history = wait_for_history(xen_host, guest.name, lambda h: bool(h) and
                               "extracted" in h[-1]["since_crash"])
    last = history[-1]
    assert last["method"] == "phase:app" and last["outcome"] == "recovered"
    (app,) = last["resurrection"]
    assert app["app"] == APP and app["records"] == KEYS and not app["rejected"], app
    marks = last["since_crash"]
    assert marks["crash_seen"] <= marks["extracted"] <= marks["destroyed"], marks
    keys = published(xen_host, guest.name)
    assert keys[f"last-recovery/resurrection/{APP}"].startswith(f"regions=1 records={KEYS} ")

    # the guest confirmed: dom0 no longer holds the data
    deadline = time.monotonic() + 120
    while xenpbrd_lab.cli(xen_host, "resurrected", guest.name) and time.monotonic() < deadline:
        time.sleep(1)
    assert xenpbrd_lab.cli(xen_host, "resurrected", guest.name) == []
    print(f"resurrection: {len(acked)} writes acknowledged before the crash over {KEYS} "
          f"keys, {count} keys resurrected, 0 lost; extraction {app['seconds']:.3f} s, "
          f"{app['bytes']} bytes read; timeline {marks}")
