"""First proofs on real Xen: the hypervisor version, a crash, a checkpoint round trip."""

from __future__ import annotations

import re

import pytest

from xenpbr_lab.errors import CommandFailed
from xenpbr_lab.host import XenHost


def test_xl_info_reports_xen_4_17(xen_host: XenHost) -> None:
    info = dict(re.findall(r"^(\w+)\s*:\s*(.*)$", xen_host.run(["xl", "info"]).stdout, re.M))
    assert (info["xen_major"], info["xen_minor"]) == ("4", "17")
    assert "pv" in info["virt_caps"].split()


def test_dom0_is_domain_zero_and_running(xen_host: XenHost) -> None:
    out = xen_host.run(["xl", "list", "0"]).stdout
    assert re.search(r"^Domain-0\s+0\s+\d+\s+1\s+r-----", out, re.M), out


def test_failing_dom0_command_names_the_command(xen_host: XenHost) -> None:
    with pytest.raises(CommandFailed, match=r"exit code 3: .*exit 3") as info:
        xen_host.run("echo oops >&2; exit 3")
    assert info.value.rc == 3 and "oops" in info.value.stderr


def test_guest_crash_is_seen_as_crashed(xen_host: XenHost, lab_domain) -> None:
    guest = lab_domain("crash", mode="crash", on_crash="preserve", extra="lab.marker=m42")
    guest.create()
    guest.wait_for_console(r"XENPBR-GUEST: up .* marker=m42")
    guest.wait_for_console(r"XENPBR-GUEST: crashing now")
    entry = guest.wait_for_state(lambda e: e.crashed, "crashed", timeout=60)
    assert entry.state == "---sc-", entry
    assert entry.memory_mib == 128  # on_crash=preserve keeps the memory


def test_checkpoint_and_restore_keeps_the_guest_counting(xen_host: XenHost,
                                                         lab_domain) -> None:
    guest = lab_domain("count", mode="count")
    guest.create()
    guest.wait_for_console(r"count=3 ")
    image = f"/tmp/{guest.name}.chk"
    guest.save_checkpoint(image)
    saved = int(re.findall(r"count=(\d+)", guest.console())[-1])
    assert guest.entry() is not None and "p" not in guest.entry().state  # -c: still runs
    offset = len(guest.console())
    guest.destroy()
    assert guest.entry() is None
    guest.restore(image)
    first = int(guest.wait_for_console(r"count=(\d+)", after=offset).group(1))
    # A restored guest goes on from where the image was taken; a rebooted one restarts at 1.
    assert first > 1 and first >= saved - 2
    later = int(guest.wait_for_console(rf"count={first + 2} ", after=offset).group(0)
                .split("=")[1])
    assert later == first + 2
    xen_host.run(["rm", "-f", image])
