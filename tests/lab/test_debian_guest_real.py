"""A Debian 12 guest with systemd, PostgreSQL and auditd, protected by xenpbr on the
Debian dom0 (issue 16, point 3), on real Xen.

The guest (:mod:`xenpbr_lab.debian_guest`) boots from its own disk, a file on an XFS file
system in dom0 where xenpbr's store also lives (so its disk snapshots are reflinks), with
a second, persistent disk for auditd's log and a network link to dom0. In order:

1. without xenpbr: the guest boots, PostgreSQL warms up and answers dom0's query (the
   boot time an operator has today);
2. the xenpbr-agent package from this tree is installed into the guest, the three phases
   marked by the packaged ``xenpbr-phase@`` units: each is captured, the server answers
   the same, auditd starts after the last phase on its persistent disk;
3. ``xl sysrq c``, then a crash from inside the guest: each time the guest comes back from
   the application image, the server answers the same query with the same result and
   auditd runs again;
4. auditd started inside a phase (with its persistent log disk mounted): the capture is
   refused (``persistent-disk-rw``, dom0 names the disk and its mount point, the agent
   names auditd), and the guest still boots fully.

Step 2 failed while the agent froze the root for each boundary (writers blocked on it
kept the guest from suspending); dom0 now snapshots the root disk while xl holds the
guest paused after its save (docs/consistency.md, "The pause window").

Marked ``long``: ``make test-debian`` runs it (Debian builds the first time, a dom0 boot,
systemd guest boots and 512 MiB captures under TCG).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xenpbr_lab.build import build
from xenpbr_lab.debian_dom0 import DebianXenHost, build_dom0
from xenpbr_lab.debian_guest import DOM0_INITRD, build_guest
from xenpbr_lab.debian_guest_host import (
    AUDITD,
    BOOTED,
    CRASH_GUARD,
    POLICIES,
    VERDICT,
    WAIT,
    WARM,
    blank_disk,
    build_packages,
    edit_guest_disk,
    debian_domain,
    install_agent,
    prepare_dom0,
    query,
    verdicts,
    xenpbr,
)
from xenpbr_lab.xl import LabDomain

pytestmark = [pytest.mark.lab, pytest.mark.debian, pytest.mark.long]

figures: dict[str, Any] = {}


@pytest.fixture(scope="module")
def host(session_artifacts: Path) -> Iterator[DebianXenHost]:
    images = build()
    guest = build_guest(images)
    work = session_artifacts / "debian-guest"
    host = DebianXenHost(images, build_dom0(images), work,
                         guest_disks=(guest.root_image, blank_disk(work / "srv-xfs.raw")))
    try:
        host.start()
        host.put(DOM0_INITRD, guest.initrd.read_bytes())
        figures["packages"] = build_packages(work / "debs")
        prepare_dom0(host, figures["packages"][0])
        yield host
    finally:
        host.collect_artifacts(work / "evidence")
        host.kill()


@pytest.mark.timeout(5 * WAIT)
def test_without_xenpbr_the_guest_boots_and_postgres_answers(host) -> None:
    domain = debian_domain(host, "deb0")
    start = time.monotonic()
    domain.create(timeout=WAIT)
    warm = domain.wait_for_console(WARM, timeout=WAIT)
    figures["boot_without_s"] = time.monotonic() - start
    booted = domain.wait_for_console(BOOTED, timeout=WAIT).groups()
    assert booted == ("running", "", ""), booted  # multi-user reached, no unit failed
    console = domain.console()
    assert "Debian GNU/Linux 12 debian-guest hvc0" in console  # getty's banner
    assert not VERDICT.search(console)  # no agent in this guest yet
    figures["answer"] = query(host)
    assert figures["answer"] == warm.group(2)  # dom0 reads what the guest computed
    host.run(["xl", "shutdown", "-w", domain.name], timeout=WAIT)
    print(f"Debian guest without xenpbr: xl create -> PostgreSQL warm "
          f"{figures['boot_without_s']:.1f} s (warm-up {warm.group(1)} s)")


@pytest.fixture(scope="module")
def agent_installed(host) -> DebianXenHost:
    """The agent package and its setup installed into the guest's disk."""
    install_agent(host, figures["packages"][1])
    return host


@pytest.fixture(scope="module")
def protected(host, agent_installed) -> LabDomain:
    """The guest with the agent, created by xenpbr, its three phases captured."""
    domain = debian_domain(host, "deb", on_crash="phasereboot", xenpbr_disks=POLICIES,
                           **CRASH_GUARD)
    domain.write_config()
    start = time.monotonic()
    xenpbr(host, "create", domain.config_path)
    got = verdicts(domain, 3)
    domain.wait_for_console(WARM, timeout=WAIT)
    figures["boot_with_s"] = time.monotonic() - start
    figures["first_boot"] = got
    figures["booted"] = domain.wait_for_console(BOOTED, timeout=WAIT).groups()
    return domain


@pytest.mark.timeout(5 * WAIT)
def test_three_packaged_phases_are_captured_and_postgres_answers_the_same(
        host, protected: LabDomain) -> None:
    assert figures["first_boot"] == [("kernel", "captured"), ("services", "captured"),
                                     ("app", "captured")]
    assert figures["booted"] == ("running", "", "")  # every unit started, none failed
    assert query(host) == figures["answer"]
    state, pid, log, disk = protected.wait_for_console(AUDITD, timeout=WAIT).groups()
    assert (state, disk) == ("active", "/dev/xvdb") and pid, (state, pid, log, disk)
    images = xenpbr(host, "images", protected.name)
    assert [row["phase"] for row in images if row["valid"]] == ["kernel", "services", "app"]
    # the root disk's snapshots are reflinks: the store is on the disk's XFS
    assert all(row["disk_mechanisms"] == {"xvda": "reflink"} for row in images), images
    paused = ", ".join(f"{row['phase']} {row['paused_s']:.1f} s" for row in images)
    print(f"Debian guest with xenpbr (first boot, 3 captures, paused {paused}): xenpbr "
          f"create -> PostgreSQL warm {figures['boot_with_s']:.1f} s; without xenpbr "
          f"{figures.get('boot_without_s', 0):.1f} s")


def _crash_and_check(host: DebianXenHost, guest: LabDomain, crash: str,
                     generation: int) -> float:
    offset = guest.console_size()
    start = time.monotonic()
    if crash == "sysrq":
        host.run(["xl", "sysrq", guest.name, "c"])
    else:  # from inside: the guest's own kernel panics
        host.run(["xenstore-write", f"/local/domain/{guest.domid}/data/lab-crash", "now"])
    assert verdicts(guest, 1, after=offset) == [("app", f"restored:{generation}")]
    answer = query(host)
    seconds = time.monotonic() - start
    assert answer == figures["answer"]
    state, pid, _, disk = guest.wait_for_console(AUDITD, after=offset, timeout=WAIT).groups()
    assert (state, disk) == ("active", "/dev/xvdb") and pid
    last = xenpbr(host, "history", guest.name)[-1]
    assert last["outcome"] == "recovered", last
    return seconds


@pytest.mark.timeout(5 * WAIT)
def test_a_crash_comes_back_from_the_app_image_and_answers_the_same(
        host, protected: LabDomain) -> None:
    seconds = _crash_and_check(host, protected, "sysrq", 1)
    print(f"xl sysrq c -> PostgreSQL answers again: {seconds:.1f} s")


@pytest.mark.timeout(5 * WAIT)
def test_a_crash_from_inside_the_guest_comes_back_the_same(host, protected) -> None:
    seconds = _crash_and_check(host, protected, "inside", 2)
    print(f"echo c > /proc/sysrq-trigger -> PostgreSQL answers again: {seconds:.1f} s")


@pytest.mark.timeout(5 * WAIT)
def test_auditd_inside_a_phase_is_refused_by_name_and_the_guest_still_boots(
        host, protected: LabDomain) -> None:
    host.run(["xl", "destroy", protected.name])
    xenpbr(host, "unregister", protected.name)
    guest = debian_domain(host, "debaudit", cmdline="lab.auditd=phase",
                          on_crash="phasereboot", xenpbr_disks=POLICIES)
    guest.write_config()
    since = host.run(["date", "+%s"]).stdout.strip()
    xenpbr(host, "create", guest.config_path)
    got = verdicts(guest, 3)
    assert got == [("kernel", "captured"), ("services", "refused:persistent-disk-rw"),
                   ("app", "refused:persistent-disk-rw")], got
    guest.wait_for_console(WARM, timeout=WAIT)  # the boot went on
    assert query(host) == figures["answer"]
    journal = host.run(["journalctl", "-u", "xenpbrd", "--no-pager", f"--since=@{since}"]
                       ).stdout
    refusals = [line for line in journal.splitlines() if "persistent-disk-rw" in line]
    assert any("persistent disk xvdb is mounted read-write on /var/log/audit" in line
               for line in refusals), refusals or journal[-3000:]
    # auditd appends (no hazard), but it is what keeps the disk mounted: the agent says so
    assert "writing to xvdb now: pid " in guest.console()
    assert "(auditd) /var/log/audit/audit.log; start it after the last phase" in \
        guest.console(), guest.console()[-3000:]
    images = xenpbr(host, "images", guest.name)
    assert {row["phase"] for row in images if row["valid"]} == {"kernel"}
    host.run(["xl", "destroy", guest.name])
    xenpbr(host, "unregister", guest.name)


def _boots_fully_without_images(host: DebianXenHost, name: str,
                                failed: tuple[str, ...] = ("app", "kernel", "services")
                                ) -> tuple[float, str]:
    """Create ``name`` with xenpbr: no boundary is marked, yet PostgreSQL warms up and the
    deferred work (the audit disk, auditd) runs, unless no agent is there to run it; the
    phase units that ``failed`` (exit 2: they point at the problem); what ``xenpbr
    status`` says about the guest."""
    guest = debian_domain(host, name, on_crash="phasereboot", xenpbr_disks=POLICIES)
    guest.write_config()
    start = time.monotonic()
    xenpbr(host, "create", guest.config_path)
    warm = guest.wait_for_console(WARM, timeout=WAIT)
    seconds = time.monotonic() - start
    state, units, jobs = guest.wait_for_console(BOOTED, timeout=WAIT).groups()
    assert (state, sorted(units.split()), jobs) == (
        "degraded" if failed else "running",
        [f"xenpbr-phase@{p}.service" for p in failed], ""), (state, units, jobs)
    assert [v for _, v in VERDICT.findall(guest.console())] == ["not-marked"] * len(failed)
    if failed:  # auditd started (forking: it may still be "activating") on its disk
        state, pid, _, disk = guest.wait_for_console(AUDITD, timeout=WAIT).groups()
        assert state in ("active", "activating") and disk == "/dev/xvdb" and pid
    assert query(host) == warm.group(2)
    (row,) = [r for r in xenpbr(host, "status") if r["name"] == name]
    assert row["images"]["valid"] == 0
    host.run(["xl", "shutdown", "-w", name], timeout=WAIT)
    xenpbr(host, "unregister", name)
    return seconds, row["no_image_why"]


@pytest.mark.timeout(5 * WAIT)
def test_a_broken_agent_config_boots_fully_and_dom0_says_why(host, agent_installed) -> None:
    host.run("xl destroy deb; xl destroy debaudit", check=False)  # the disk is theirs too
    edit_guest_disk(host, "cp $G/etc/xenpbr/agent.conf /tmp/agent.conf.good\n"
                          "sed -i 's/^ack_timeout/ack_timout/' $G/etc/xenpbr/agent.conf")
    try:
        seconds, why = _boots_fully_without_images(host, "debbadconf")
    finally:
        edit_guest_disk(host, "cp /tmp/agent.conf.good $G/etc/xenpbr/agent.conf")
    assert why.startswith("its agent config does not validate (phase app: "), why
    assert "ack_timout" in why and "did you mean" in why, why
    print(f"broken agent config: create -> PostgreSQL warm {seconds:.1f} s; status: {why}")


@pytest.mark.timeout(5 * WAIT)
def test_a_guest_without_python_boots_fully_and_dom0_says_why(host, agent_installed) -> None:
    host.run("xl destroy deb; xl destroy debaudit", check=False)
    edit_guest_disk(host, "mv $G/usr/bin/python3.11 $G/usr/bin/python3.11.off")
    try:
        seconds, why = _boots_fully_without_images(host, "debnopy")
    finally:
        edit_guest_disk(host, "mv $G/usr/bin/python3.11.off $G/usr/bin/python3.11")
    assert why.startswith("Python cannot run the agent (phase app: "), why
    print(f"no Python in the guest: create -> PostgreSQL warm {seconds:.1f} s; status: {why}")


@pytest.mark.timeout(5 * WAIT)
def test_a_guest_without_the_agent_boots_and_dom0_says_why(host, agent_installed) -> None:
    host.run("xl destroy deb; xl destroy debaudit", check=False)
    edit_guest_disk(host, "chroot $G dpkg -r xenpbr-agent")
    try:
        seconds, why = _boots_fully_without_images(host, "debnoagent", failed=())
    finally:
        install_agent(host, figures["packages"][1])
    assert why.startswith("no agent has spoken in this boot"), why
    print(f"no agent in the guest: create -> PostgreSQL warm {seconds:.1f} s; status: {why}")
