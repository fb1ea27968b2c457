"""xenpbr on a Debian 12 dom0 with systemd (issue 16, point 2), on real Xen.

The dom0 is Debian's own (mmdebstrap: systemd, Debian's Xen packages, Xen started by
Debian's /etc/init.d/xen), built and cached by :mod:`xenpbr_lab.debian_dom0`. The test
installs the ``xenpbr`` package built from this tree (``tools/build-deb.sh``) with dpkg;
systemd starts xenpbrd from the packaged unit. Then a protected busybox guest is captured
and recovered by that xenpbrd. The test marked ``long`` goes on past a dom0 reboot: dom0
is powered off and booted again on the same disk, Debian's xendomains creates the guest
again from ``/etc/xen/auto`` (a link to the config ``xenpbr create`` translated), and the
images taken before the reboot bring it back after its next crash.

Run: ``make test-debian`` (all of them; builds the packages and the Debian dom0 first);
``make test`` (and so CI) runs all but the reboot.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.test_phasereboot_real import published
from tests.lab.xen_real import agent_verdicts
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.build import build
from xenpbr_lab.debian_dom0 import DebianXenHost, build_dom0
from xenpbr_lab.debian_guest_host import build_packages
from xenpbr_lab.xl import LabDomain

# long: a second dom0 (Debian's, with systemd) boots for these, about 6 min of CI on a
# slow machine; make test-debian (and make test-long) run them. CI checks the package
# itself offline (tests/unit/test_debian_packaging.py) and xenpbrd on the lab's dom0.
pytestmark = [pytest.mark.lab, pytest.mark.debian, pytest.mark.long]
THREE = "kernel,services,app"




@pytest.fixture(scope="module")
def debian_host(session_artifacts: Path) -> Iterator[DebianXenHost]:
    images = build()
    host = DebianXenHost(images, build_dom0(images), session_artifacts / "debian-dom0")
    try:
        host.start()
        yield host
    finally:
        host.collect_artifacts(session_artifacts / "debian-dom0" / "evidence")
        host.kill()


@pytest.fixture(scope="module")
def installed(debian_host: DebianXenHost) -> DebianXenHost:
    deb, _ = build_packages(debian_host.workdir / "debs")
    debian_host.put(f"/tmp/{deb.name}", deb.read_bytes())
    result = debian_host.run(["dpkg", "-i", f"/tmp/{deb.name}"], timeout=600, check=False)
    assert result.rc == 0, result.stdout + result.stderr
    return debian_host


def unit(host: DebianXenHost, name: str = "xenpbrd") -> dict[str, str]:
    out = host.run(["systemctl", "show", name, "-p",
                    "ActiveState,SubState,Type,UnitFileState,NRestarts,ExecMainPID"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_active(host: DebianXenHost, timeout: float = 300) -> dict[str, str]:
    """The unit's properties once it is active (Type=notify: after its READY=1)."""
    host.run(f"i=0; while [ $i -lt {int(timeout)} ] && ! systemctl is-active -q xenpbrd; "
             "do sleep 1; i=$((i+1)); done", timeout=timeout + 60, check=False)
    return unit(host)


@pytest.mark.timeout(1800)  # mmdebstrap (cached after), a systemd boot under TCG
def test_dom0_boots_debian_xen_under_systemd(debian_host: DebianXenHost) -> None:
    xen = unit(debian_host, "xen")
    assert (xen["ActiveState"], xen["SubState"]) == ("active", "running"), xen
    assert debian_host.run(["cat", "/proc/xen/capabilities"]).stdout.strip() == "control_d"
    assert "Domain-0" in debian_host.run(["xl", "list"]).stdout
    print(f"Debian dom0 ready {debian_host.boot_seconds:.1f} s after QEMU started")


@pytest.mark.timeout(900)
def test_the_package_installs_and_systemd_starts_xenpbrd_ready(installed) -> None:
    props = wait_active(installed)
    assert props["Type"] == "notify" and props["UnitFileState"] == "enabled", props
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["NRestarts"] == "0", props
    assert installed.run(["xenpbrd", "--version"]).stdout.startswith("xenpbrd")


@pytest.mark.timeout(300)
def test_the_journal_has_xenpbrds_messages_with_their_priorities(installed) -> None:
    wait_active(installed)
    out = installed.run(["journalctl", "-u", "xenpbrd", "-o", "json", "--no-pager"]).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    own = [e for e in entries if e.get("_SYSTEMD_UNIT") == "xenpbrd.service"]
    serving = [e for e in own if "xenpbrd serving" in str(e.get("MESSAGE"))]
    assert serving, [e.get("MESSAGE") for e in own][:20]
    assert serving[0]["PRIORITY"] == "6"  # info, not the journal's default for stderr
    assert not any(str(e.get("MESSAGE", "")).startswith("<") for e in own)


def captured_and_recovered(host: DebianXenHost, name: str) -> tuple[LabDomain, str, dict]:
    """A guest protected by the packaged xenpbrd (``xenpbr create``): three phases
    captured, a kernel crash, back from the app image. Returns it, the xl config xenpbr
    translated for it and what xenpbrd published after the recovery."""
    wait_active(host)
    guest = LabDomain(host, name, mode="agent", extra=f"lab.phases={THREE}",
                      on_crash="phasereboot")
    guest.write_config()
    created = xenpbrd_lab.cli(host, "create", guest.config_path, timeout=300)
    first = agent_verdicts(guest, 3, timeout=900)
    assert [v for _, v, _ in first] == ["captured"] * 3, first
    offset = guest.console_size()
    host.run(["xl", "sysrq", guest.name, "c"])
    assert agent_verdicts(guest, 1, after=offset, timeout=900) == [("app", "restored:1", 0)]
    return guest, created["xl_config"], published(host, guest.name)


@pytest.mark.timeout(1800)  # three captures, a crash, a restore under TCG
def test_the_packaged_xenpbrd_recovers_a_crashed_guest_from_its_image(installed) -> None:
    guest, _, after = captured_and_recovered(installed, "dpbr")
    assert after["last-recovery/method"] == "phase:app", after
    history = xenpbrd_lab.cli(installed, "history", guest.name)
    assert [h["outcome"] for h in history] == ["recovered"], history
    installed.run(["xl", "destroy", guest.name])


@pytest.mark.timeout(1800)  # three captures, a crash, a dom0 reboot, a boot, a crash
def test_a_guest_is_recovered_and_its_images_survive_a_dom0_reboot(installed) -> None:
    host = installed
    guest, xl_config, before = captured_and_recovered(host, "dreb")
    # autostart at dom0 boot: Debian's xendomains creates what /etc/xen/auto names; xl
    # refuses on_crash = "phasereboot", so the link is to xenpbr's translated config
    host.run(f"mkdir -p /etc/xen/auto && ln -sf {xl_config} "
             f"/etc/xen/auto/{guest.name}.cfg")  # Debian ships no /etc/xen/auto
    host.run(["xl", "destroy", guest.name])
    host.run(["rm", "-f", guest.console_log])  # the next boot's lines only
    host.reboot()
    props = wait_active(host)
    assert props["ActiveState"] == "active", props
    after_boot = published(host, guest.name)
    assert after_boot["images/app/id"] == before["images/app/id"], after_boot
    assert after_boot["images/app/valid"] == "1", after_boot

    host.run(f"i=0; while [ $i -lt 600 ] && ! xl domid {guest.name}; do sleep 1; "
             "i=$((i+1)); done", timeout=700)  # created by xendomains at boot
    again = agent_verdicts(guest, 3, after=0, timeout=900)
    assert [v for _, v, _ in again] == ["skipped"] * 3, again  # images kept, none taken
    offset = guest.console_size()
    host.run(["xl", "sysrq", guest.name, "c"])
    (phase, verdict, rc), = agent_verdicts(guest, 1, after=offset, timeout=900)
    assert (phase, verdict.split(":")[0], rc) == ("app", "restored", 0)
    history = xenpbrd_lab.cli(host, "history", guest.name)
    assert history[-1]["outcome"] == "recovered", history[-1]
    assert before["images/app/id"] in json.dumps(history[-1]["marks"])
