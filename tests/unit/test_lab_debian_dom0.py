"""The Debian dom0 of the lab, without booting it: what is added to Debian's root, and
how QEMU is told to boot it (tests/lab/test_debian_dom0_real.py boots it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenpbr_lab.build import LabImages
from xenpbr_lab.debian_dom0 import (
    LAB_LABEL,
    MODULES,
    DebianDom0,
    DebianXenHost,
    _customize,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    tree = tmp_path / "root"
    for folder in ("etc/default", "etc/modules-load.d", "etc/systemd/system"):
        (tree / folder).mkdir(parents=True)
    (tree / "etc/default/xen").write_text("XENSTORED_ARGS=\n")
    return tree


def test_the_root_gets_the_lab_s_additions_and_keeps_debian_s(root: Path) -> None:
    _customize(root)
    fstab = (root / "etc/fstab").read_text()
    assert fstab.startswith("/dev/vda / ext4 ") and f"LABEL={LAB_LABEL} /lab " in fstab
    default = (root / "etc/default/xen").read_text()
    assert default.startswith("XENSTORED_ARGS=\n")  # Debian's settings stay
    assert 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' in default
    assert (root / "etc/modules-load.d/xenpbr-lab.conf").read_text().split() == list(MODULES)
    unit = (root / "etc/systemd/system/xenpbr-lab-ctl.service").read_text()
    assert "After=xen.service" in unit and "RequiresMountsFor=/lab" in unit
    enabled = root / "etc/systemd/system/multi-user.target.wants/xenpbr-lab-ctl.service"
    assert enabled.is_symlink()
    assert (root / "usr/lib/xenpbr-lab/ctl-server").stat().st_mode & 0o111


def test_qemu_boots_the_root_disk_with_its_initrd(tmp_path: Path) -> None:
    images = LabImages(tmp_path / "xen.elf", tmp_path / "vmlinuz", tmp_path / "System.map",
                       tmp_path / "dom0.cpio.gz", tmp_path / "guest.cpio.gz", "6.1.0-0", ())
    dom0 = DebianDom0(tmp_path / "root.ext4", tmp_path / "initrd.img", "6.1.0-0")
    host = DebianXenHost(images, dom0, tmp_path / "work")
    argv = host.qemu_argv()
    modules = argv[argv.index("-initrd") + 1]
    assert modules == f"{images.kernel} console=hvc0 root=/dev/vda rw quiet,{dom0.initrd}"
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [f"file={host.overlay},if=virtio,format=qcow2",
                      f"file={host.lab_image},if=virtio,format=raw"]
    assert str(dom0.root_image) not in " ".join(argv)  # the cache is never written


def test_guest_disks_reach_dom0_as_overlays_after_its_own_two(tmp_path: Path) -> None:
    images = LabImages(tmp_path / "xen.elf", tmp_path / "vmlinuz", tmp_path / "System.map",
                       tmp_path / "dom0.cpio.gz", tmp_path / "guest.cpio.gz", "6.1.0-0", ())
    dom0 = DebianDom0(tmp_path / "root.ext4", tmp_path / "initrd.img", "6.1.0-0")
    guest = tmp_path / "guest.ext4"
    host = DebianXenHost(images, dom0, tmp_path / "work", guest_disks=(guest,))
    argv = host.qemu_argv()
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[2:] == [f"file={host.guest_overlays[0]},if=virtio,format=qcow2"]
    assert str(guest) not in " ".join(argv)  # /dev/vdc in dom0, the image never written
