"""The guest agent's config on real Xen (issue 12, point 3): a guest whose agent config
misspells a key still boots fully, but no image is taken of it; ``xenpbr-agent check``
runs inside the guest.

* ``lab.agentconf=typo``: the guest's ``[agent]`` has ``step_timout = 30``. With xenpbrd
  serving and the guest created by ``xenpbr create``, every ``xenpbr-agent phase`` prints
  ``not-marked`` and exits 2, the ``[after-last-phase]`` start command still runs (its
  output is on the console), and dom0 got no request and holds no image.
* ``lab.agentconf=good``: ``xenpbr-agent check`` in the guest says the config is valid,
  with no step timeout.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest

from tests.lab.xen_real import agent_verdicts
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.host import XenHost
from xenpbr_lab.xl import LabDomain

PHASES = ("kernel", "services", "app")
TYPO = "unknown key 'step_timout' in [agent] (did you mean 'step_timeout'?)"


def _image_rows(listing: Any) -> list[Any]:
    """The rows of ``xenpbr images --json`` (a list, or an object holding one)."""
    if isinstance(listing, dict):
        return list(listing.get("images") or [])
    return list(listing)


def check_lines(console: str) -> list[str]:
    """What ``xenpbr-agent check`` printed in the guest (its lines, prefix removed)."""
    return [line.split("XENPBR-CHECK: ", 1)[1].rstrip("\r")
            for line in console.splitlines() if "XENPBR-CHECK: " in line]


@pytest.mark.long  # 1.2 min: make test-long (the agent's config checks: unit tests)
@pytest.mark.timeout(600)
def test_misspelled_key_boots_the_guest_fully_and_takes_no_image(
        xen_host: XenHost, lab_domain: Callable[..., LabDomain], xenpbrd: None) -> None:
    guest = lab_domain("typo", mode="agent", on_crash="phasereboot",
                       extra=f"lab.phases={','.join(PHASES)} lab.agentconf=typo")
    guest.write_config()
    start = time.monotonic()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    verdicts = agent_verdicts(guest, len(PHASES))
    booted_in = time.monotonic() - start
    assert verdicts == [(p, "not-marked", 2) for p in PHASES], verdicts

    console = guest.console()
    assert TYPO in console
    # the deferred service ran once (at the last phase only), and nothing post-restore
    assert console.count("| XENPBR-STEP: after-last-phase") == 1, console[-3000:]
    assert "XENPBR-STEP: after-restore" not in console
    assert "phase app: still running [after-last-phase] start" in console
    assert "boundary kernel is not marked" in console
    checked = check_lines(console)
    assert checked[-1] == "rc=2" and any(TYPO in line for line in checked), checked

    # dom0: managed the domain, but never saw a request and holds no image
    request = xen_host.run(["xenstore-read",
                            f"/local/domain/{guest.domid}/data/xenpbr/request"], check=False)
    assert request.rc != 0, request.stdout
    assert _image_rows(xenpbrd_lab.cli(xen_host, "images", guest.name)) == []
    print(f"guest with a misspelled agent key up (after-last-phase ran) in "
          f"{booted_in:.1f} s after xenpbr create")


@pytest.mark.timeout(300)
def test_agent_check_in_the_guest_accepts_a_valid_config(
        lab_domain: Callable[..., LabDomain]) -> None:
    guest = lab_domain("chk", mode="agent", extra="lab.phases=kernel,app lab.agentconf=good")
    guest.create()
    guest.wait_for_console(r"XENPBR-CHECK: rc=\d+", timeout=240)
    checked = check_lines(guest.console())
    assert checked[-1] == "rc=0", checked
    assert checked[0].endswith(": valid"), checked
    assert "step_timeout: none (steps run as long as they need)" in checked
    assert "  1. kernel" in checked and "  2. app" in checked
    assert "  start: echo XENPBR-STEP: after-last-phase" in checked
