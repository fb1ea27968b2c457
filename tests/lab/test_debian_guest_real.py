"""A Debian 12 guest with systemd on a disk, in the Debian dom0 (issue 16, point 3, first
step): it boots to systemd's multi-user target and a login prompt, and the time that
takes under emulation is the baseline a Debian guest with xenpbr is measured against.

Marked ``long``: ``make test-debian`` runs it (a Debian build of about 70 s the first
time, a dom0 boot and a systemd guest boot under TCG).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpbr_lab.build import build
from xenpbr_lab.debian_dom0 import DebianXenHost, build_dom0
from xenpbr_lab.debian_guest import DOM0_INITRD, DebianGuest, build_guest
from xenpbr_lab.xl import LabDomain

pytestmark = [pytest.mark.lab, pytest.mark.debian, pytest.mark.long]


@pytest.fixture(scope="module")
def host_and_guest(session_artifacts: Path) -> Iterator[tuple[DebianXenHost, DebianGuest]]:
    images = build()
    guest = build_guest(images)
    host = DebianXenHost(images, build_dom0(images), session_artifacts / "debian-guest",
                         guest_disks=(guest.root_image,))
    try:
        host.start()
        host.put(DOM0_INITRD, guest.initrd.read_bytes())
        yield host, guest
    finally:
        host.collect_artifacts(session_artifacts / "debian-guest" / "evidence")
        host.kill()


@pytest.mark.timeout(3600)  # builds, a dom0 boot and a systemd guest boot under TCG
def test_a_debian_guest_boots_systemd_from_its_disk(host_and_guest) -> None:
    host, guest = host_and_guest
    domain = LabDomain(host, "deb1", memory_mib=512)
    domain.config.update(guest.xl_settings())
    start = time.monotonic()
    domain.create(timeout=300)
    domain.wait_for_console(r"login:", timeout=1800)
    seconds = time.monotonic() - start
    console = domain.console()
    assert "Reached target" in console and "Multi-User System" in console
    assert "Debian GNU/Linux 12" in console
    assert domain.entry() is not None
    print(f"Debian 12 guest (systemd, 512 MiB, disk root): xl create to login prompt "
          f"{seconds:.1f} s")
