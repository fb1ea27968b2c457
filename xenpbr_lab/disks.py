"""Guest disks for the lab, made inside dom0: an ext4 root disk and an ext4 data disk.

Runs in dom0 (``python3 -m xenpbr_lab.disks root|data OUT``): the guest's root file
system is the guest initramfs unpacked (:func:`xenpbr_lab.cpio.extract`) plus a marker
``/.lab-disk-root`` that tells ``guest-init.sh`` it already runs from the disk, turned
into an ext4 image by ``mke2fs -t ext4 -d``. Disks are sparse files on dom0's tmpfs; the root
template is made once per dom0 boot and copied (sparse) for each guest.

The host side (:func:`make_disks`) asks dom0 to do this and returns xl disk specs that
use the lab's hotplug script (``/lab/block-lab``: Xen's own needs bash).
"""

from __future__ import annotations

import argparse
import gzip
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xenpbr import disksnap

from .cpio import extract

if TYPE_CHECKING:
    from .host import XenHost

DISK_DIR = "/var/lib/xenpbr-lab/disks"
GUEST_INITRD = "/lab/guest.cpio.gz"
ROOT_TEMPLATE = f"{DISK_DIR}/.root-template.img"
ROOT_MARKER = ".lab-disk-root"
HOTPLUG = "/lab/block-lab"


def _mkfs(image: Path, size_mib: int, label: str, content: Path | None = None) -> None:
    image.parent.mkdir(parents=True, exist_ok=True)
    image.unlink(missing_ok=True)
    cmd = ["mke2fs", "-t", "ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0",
           *(["-d", str(content)] if content else []),
           str(image), f"{size_mib}M"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr}")


def make_root(out: Path, size_mib: int, initrd: str = GUEST_INITRD) -> None:
    """An ext4 image holding the guest initramfs's files (the template is reused)."""
    template = Path(ROOT_TEMPLATE)
    if not template.exists():
        with tempfile.TemporaryDirectory(dir=template.parent if template.parent.exists()
                                         else None) as tmp, gzip.open(initrd) as src:
            tree = Path(tmp)
            extract(src, tree)  # type: ignore[arg-type]
            for d in ("proc", "sys", "dev", "run", "tmp", "newroot", "data"):
                (tree / d).mkdir(exist_ok=True)
            (tree / ROOT_MARKER).write_text("the guest runs from its ext4 root disk\n")
            _mkfs(Path(f"{template}.tmp"), size_mib, "lab-root", tree)
            Path(f"{template}.tmp").rename(template)
    disksnap.snapshot(str(template), out)  # a sparse copy (busybox cp cannot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenpbr_lab.disks")
    parser.add_argument("kind", choices=("root", "data"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--size-mib", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.monotonic()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "root":
        make_root(args.out, args.size_mib or 128)
    else:
        _mkfs(args.out, args.size_mib or 32, "lab-data")
    print(f"{args.kind} disk {args.out} made in {time.monotonic() - start:.2f} s")
    return 0


# -- host side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabDisks:
    """A guest's two disks in dom0 and the xl ``disk`` specs naming them."""

    root: str
    data: str

    @property
    def specs(self) -> list[str]:
        return [f"{self.root},raw,xvda,w,backendtype=phy,script={HOTPLUG}",
                f"{self.data},raw,xvdb,w,backendtype=phy,script={HOTPLUG}"]


def make_disks(host: XenHost, name: str, root_mib: int = 128, data_mib: int = 32) -> LabDisks:
    """A fresh root disk and an empty data disk for guest ``name``, in dom0."""
    disks = LabDisks(f"{DISK_DIR}/{name}-root.img", f"{DISK_DIR}/{name}-data.img")
    for kind, path, size in (("root", disks.root, root_mib), ("data", disks.data, data_mib)):
        host.run(["python3", "-m", "xenpbr_lab.disks", kind, path, "--size-mib", str(size)],
                 timeout=300)
    return disks


def fsck(host: XenHost, image: str) -> tuple[bool, str]:
    """``e2fsck -n -f`` of a disk image in dom0: (clean, what it said)."""
    result = host.run(["e2fsck", "-n", "-f", image], check=False, timeout=300)
    return result.rc == 0, (result.stdout + result.stderr).strip()


def read_file(host: XenHost, image: str, path: str) -> str:
    """A file's contents from an ext4 image in dom0 (debugfs: nothing is mounted)."""
    result = host.run(["debugfs", "-R", f"cat {path}", image], check=False, timeout=300)
    return result.stdout


if __name__ == "__main__":
    sys.exit(main())
