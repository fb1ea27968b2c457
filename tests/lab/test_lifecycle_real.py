"""A managed domain's lifecycle on real Xen (issue 12, points 2, 3 and 6): ``xenpbr check``
(typo keys, xl's own dry run), ``xenpbr create`` that registers nothing when xl fails and
refuses a second create without ``--update``, ``xenpbr unregister``, and xenpbrd leaving
alone a plain ``xl create`` domain that reuses a registered name under another UUID.

Only one guest boots (the agent guest whose kernel phase gives an image to drop); the
others are created paused or never created, to keep the file short under TCG.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest

from tests.lab.test_phasereboot_real import published
from tests.lab.xen_real import agent_verdicts
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.channel import RunResult
from xenpbr_lab.host import XenHost
from xenpbr_lab.xl import DOMAIN_DIR, render_config


def xenpbr(host: XenHost, *args: str) -> RunResult:
    """``xenpbr ARGS`` in dom0 against xenpbrd's state, its exit status kept."""
    return host.run(["env", f"XENPBR_STATE_DIR={xenpbrd_lab.STATE}", "python3", "-m",
                     "xenpbr.cli", *args], check=False, timeout=120)


def wait_until(what: str, done, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what} within {timeout:.0f} s")
        time.sleep(0.5)


@pytest.mark.timeout(300)
def test_check_catches_a_typo_and_a_failed_create_registers_nothing(
        xen_host, lab_domain, xenpbrd) -> None:
    typo = lab_domain("chk", on_crash="phasereboot", xenpbr_disk=["xvda=snapshot"])
    typo.write_config()
    result = xenpbr(xen_host, "check", typo.config_path)
    assert result.rc == 1 and "did you mean xenpbr_disks?" in result.stdout, result

    good = lab_domain("chk", on_crash="phasereboot", on_watchdog="phasereboot")
    good.write_config()
    result = xenpbr(xen_host, "check", good.config_path, "--json")
    report = json.loads(result.stdout)
    assert result.rc == 0 and report["xl_dry_run_ok"], (result, report)
    assert "xl -N create: ok" in xenpbr(xen_host, "check", good.config_path).stdout

    broken = lab_domain("chk", on_crash="phasereboot", kernel="/lab/no-such-vmlinuz")
    broken.write_config()
    result = xenpbr(xen_host, "create", broken.config_path)
    assert result.rc == 1 and "xl exit status" in result.stderr, result
    assert "nothing was registered" in result.stderr and "libxl" in result.stderr, result
    assert xenpbrd_lab.cli(xen_host, "status") == []
    assert broken.entry() is None


def _uuid_of(host: XenHost, domid: int) -> str:
    """The domain's UUID as libxl recorded it (``/local/domain/D/vm`` is ``/vm/UUID``)."""
    return host.run(["xenstore-read", f"/local/domain/{domid}/vm"]).stdout.strip()[4:]


@pytest.mark.timeout(900)  # one agent boot under TCG, the rest paused
def test_create_update_unregister_and_a_stranger_reusing_the_name(
        xen_host, lab_domain, xenpbrd, dom0_python) -> None:
    guest = lab_domain("life", mode="agent", extra="lab.phases=kernel",
                       on_crash="phasereboot")
    guest.write_config()
    created = xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    assert _uuid_of(xen_host, guest.domid) == created["uuid"]
    assert agent_verdicts(guest, 1) == [("kernel", "captured", 0)]

    again = xenpbr(xen_host, "create", guest.config_path)
    assert again.rc == 1 and "already registered" in again.stderr, again

    # a stranger: the same name, created by plain xl (another UUID), crashed at once
    guest.destroy()
    plain = f"{DOMAIN_DIR}/{guest.name}-plain.cfg"
    xen_host.put(plain, render_config({**guest.config, "on_crash": "preserve"}).encode())
    xen_host.run(["xl", "create", "-p", plain])
    stranger = guest.domid
    xenpbrd_lab.wait_for_log(xen_host, f"{guest.name} \\(domid {stranger}\\): not adopted",
                             timeout=60)
    dom0_python(f"""
        from xenpbr.hypervisor.base import ShutdownReason
        from xenpbr.hypervisor.libxc import LibxcHypervisor
        LibxcHypervisor().shutdown({stranger}, ShutdownReason.CRASH)
        print("null")
    """)
    time.sleep(5)  # xenpbrd would have destroyed and restored it by now
    assert guest.entry() is not None and guest.entry().crashed and guest.domid == stranger
    assert xenpbrd_lab.cli(xen_host, "history", guest.name) == []
    assert "recovered via" not in xenpbrd_lab.log_text(xen_host)
    guest.destroy()

    # --update is the explicit way to create a registered name again: same UUID
    updated = xenpbrd_lab.cli(xen_host, "create", "--update", "-p", guest.config_path)
    assert updated["updated"] and updated["uuid"] == created["uuid"]
    wait_until("adopted", lambda: published(xen_host, guest.name).get("domid")
               == str(guest.domid))
    assert published(xen_host, guest.name)["images/kernel/valid"] == "1"

    gone = xenpbrd_lab.cli(xen_host, "unregister", guest.name)
    assert gone["images_dropped"] == 1 and gone["domid"] == guest.domid, gone
    left = xen_host.run(f"find {xenpbrd_lab.STATE} -path '*{shlex.quote(guest.name)}*' "
                        "-not -path '*/locks/*'").stdout.split()
    assert left == [], left
    assert xen_host.run(["xenstore-ls", f"/xenpbr/domains/{guest.name}"], check=False).rc != 0
    assert xenpbrd_lab.cli(xen_host, "status") == []
    assert guest.entry() is not None  # not destroyed: a plain xl domain now
