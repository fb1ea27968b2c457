"""A Debian 12 guest with systemd for the lab (issue 16, point 3: the first step).

The busybox guests boot from an initramfs in seconds; an operator's guest is a Debian or
Ubuntu system on a disk, booted by systemd. This module builds one with ``mmdebstrap``
(systemd, Python, libxenstore4, and the lab's kernel package so that Debian's own initrd
carries ``xen-blkfront`` for the root disk), writes it as an ext4 image cached by its
inputs, and describes how a lab guest boots it: the lab's kernel, the guest's initrd
(put into dom0), ``root=/dev/xvda`` on a disk :class:`~xenpbr_lab.debian_dom0.DebianXenHost`
hands dom0 as ``/dev/vdc`` (a per-session overlay: the cached image is never written).

Not yet here: the xenpbr-agent package and its units inside the guest, a real server's
warm-up, auditd (tests/lab/test_debian_guest_real.py times the plain boot for now).
"""

from __future__ import annotations

import inspect
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .build import LabImages
from .debian_dom0 import SUITE, build_root_image
from .paths import cache_root, digest

PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "python3", "libxenstore4",
            "xenstore-utils", "iproute2", "procps")
DISK_SIZE = "2G"
#: Where a session's guest initrd is put in dom0, and the device dom0 sees the disk as.
DOM0_INITRD = "/lab/debian-guest-initrd.img"
DOM0_DISK = "/dev/vdc"


@dataclass(frozen=True)
class DebianGuest:
    """A built Debian guest: its root disk image and its initrd."""

    root_image: Path
    initrd: Path

    @staticmethod
    def xl_settings(dom0_disk: str = DOM0_DISK) -> dict[str, object]:
        """What a :class:`~xenpbr_lab.xl.LabDomain` config needs to boot this guest."""
        return {"ramdisk": DOM0_INITRD, "extra": "console=hvc0 root=/dev/xvda rw",
                "disk": [f"phy:{dom0_disk},xvda,w"]}


def _customize(root: Path) -> None:
    """The lab's few additions: the root disk in fstab, a name, a root without password
    (the console is the lab's only way in when a boot goes wrong)."""
    (root / "etc/fstab").write_text("/dev/xvda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("debian-guest\n")
    subprocess.run(["chroot", str(root), "passwd", "-d", "root"], check=True,
                   capture_output=True)


def build_guest(images: LabImages, cache: Path | None = None) -> DebianGuest:
    """Build (or reuse) the Debian guest for the lab's kernel."""
    cache = cache or cache_root()
    kernel_package = f"linux-image-{images.kernel_version}"
    key = digest(SUITE, " ".join(PACKAGES), kernel_package, DISK_SIZE,
                 inspect.getsource(_customize))
    image, initrd = build_root_image(cache / "debian-guest" / key, (*PACKAGES, kernel_package),
                                     _customize, images.kernel_version, DISK_SIZE,
                                     "debian-guest", cache)
    return DebianGuest(image, initrd)
