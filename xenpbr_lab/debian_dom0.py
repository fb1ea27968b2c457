"""A Debian 12 dom0 for the lab: systemd, Debian's own Xen packages installed by dpkg.

The busybox dom0 (:mod:`xenpbr_lab.build`) starts Xen's daemons from a shell script; an
operator's dom0 starts them from Debian's ``/etc/init.d/xen`` under systemd, runs
``xenpbrd`` as a unit and logs to the journal. This module builds such a root with
``mmdebstrap`` (Debian's own packages, resolved and installed by apt and dpkg) into an
ext4 image, cached under the lab cache by its inputs, and boots it under the same Xen
and kernel as the busybox lab (:class:`DebianXenHost`). Each session boots a
copy-on-write overlay of the cached image, so a session's changes (an installed .deb,
images in ``/var/lib/xenpbr``) survive a dom0 reboot within the session and never reach
the cache.

Only what the lab needs is added to Debian: the control server the host drives dom0
through (``xenpbr-lab-ctl.service``, started after ``xen.service``, its Python from the
``/lab`` disk), guest console logs
(``XENCONSOLED_ARGS``), the Xen driver modules, and a second, read-only disk with the
lab's guest kernel and images mounted on ``/lab`` (with the guests' xl configs).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .build import PROJECT_ROOT, LabImages, lab_files
from .errors import LabError, MissingHostTool
from .host import XenHost
from .paths import cache_lock, cache_root, digest

log = logging.getLogger(__name__)

SUITE = "bookworm"
#: Debian's packages of the dom0 (plus the lab's kernel package, the same as the busybox
#: lab boots, so that its modules are in the root). xfsprogs and the PostgreSQL client are
#: for the Debian guest's tests: its disks on XFS (reflink snapshots) and queries to its
#: server over the guest network.
PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "xen-utils-4.17",
            "xenstore-utils", "python3", "python3-construct", "e2fsprogs", "procps",
            "iproute2", "util-linux", "xfsprogs", "postgresql-client-15")
ROOT_SIZE = "4G"
LAB_LABEL = "xenpbr-lab"
#: Loaded at boot (Debian's init script loads xenfs, evtchn and gntdev itself).
MODULES = ("xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs",
           "xen-blkback", "xen-netback")

CTL_UNIT = """\
[Unit]
Description=xenpbr lab control server (the lab host drives dom0 through it)
After=xen.service local-fs.target
Wants=xen.service
RequiresMountsFor=/lab

[Service]
ExecStart=/usr/lib/xenpbr-lab/ctl-server
Environment=PYTHONPATH=/lab/python PYTHONDONTWRITEBYTECODE=1

[Install]
WantedBy=multi-user.target
"""

CTL_SCRIPT = """\
#!/bin/sh
# Serve the lab's control channel on the virtio port QEMU names xenpbr.ctl.
for n in /sys/class/virtio-ports/*/name; do
    if [ "$(cat "$n" 2>/dev/null)" = "xenpbr.ctl" ]; then
        exec python3 -m xenpbr_lab.ctl_server "/dev/$(basename "$(dirname "$n")")"
    fi
done
echo "no virtio port named xenpbr.ctl" >&2
exit 1
"""


@dataclass(frozen=True)
class DebianDom0:
    """A built Debian dom0: its root image and the initrd that mounts it."""

    root_image: Path
    initrd: Path
    kernel_version: str


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise MissingHostTool(f"{tool} not found: run tools/install-host-deps.sh")


def _customize(root: Path) -> None:
    """The lab's additions to the Debian root (run on the host, on the unpacked tree)."""
    (root / "etc/hostname").write_text("xenpbr-dom0\n")
    (root / "etc/fstab").write_text(
        "/dev/vda / ext4 rw,errors=remount-ro 0 1\n"
        f"LABEL={LAB_LABEL} /lab ext4 rw,nofail 0 2\n")
    (root / "lab").mkdir(exist_ok=True)
    (root / "etc/modules-load.d/xenpbr-lab.conf").write_text("\n".join(MODULES) + "\n")
    (root / "var/log/xen/console").mkdir(parents=True, exist_ok=True)
    with open(root / "etc/default/xen", "a") as default:
        default.write('\n# the lab reads guest consoles from these logs\n'
                      'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"\n')
    lib = root / "usr/lib/xenpbr-lab"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "ctl-server").write_text(CTL_SCRIPT)
    (lib / "ctl-server").chmod(0o755)
    unit = root / "etc/systemd/system/xenpbr-lab-ctl.service"
    unit.write_text(CTL_UNIT)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")


def _root_login_without_password(root: Path) -> None:
    """So the serial console is usable when a test leaves dom0 broken (lab only)."""
    subprocess.run(["chroot", str(root), "passwd", "-d", "root"], check=True,
                   capture_output=True)


def mmdebstrap(root: Path, packages: tuple[str, ...]) -> None:
    """A Debian root at ``root``: minbase plus ``packages``, installed by apt and dpkg."""
    require("mmdebstrap")
    cmd = ["mmdebstrap", "--variant=minbase", "--mode=root",
           "--include=" + ",".join(packages), SUITE, str(root)]
    log.info("building a Debian root: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"mmdebstrap failed: {proc.stderr.strip()[-2000:]}")


def ext4(tree: Path, image: Path, size: str, label: str) -> None:
    require("mke2fs")
    proc = subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-d", str(tree),
                           str(image), size], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"mke2fs of {image.name} failed: {proc.stderr.strip()[-1500:]}")


def build_root_image(folder: Path, packages: tuple[str, ...],
                     customize: Callable[[Path], None], kernel_version: str, size: str,
                     label: str, cache: Path) -> tuple[Path, Path]:
    """A Debian root built once into ``folder`` (under the cache lock): ``packages`` by
    mmdebstrap, then ``customize``, then kept as an ext4 image and Debian's initrd for
    ``kernel_version``; their paths."""
    image, initrd = folder / "root.ext4", folder / "initrd.img"
    with cache_lock(cache):
        if (folder / ".complete").exists():
            return image, initrd
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            root = Path(tmp) / "root"
            mmdebstrap(root, packages)
            customize(root)
            shutil.copy2(root / f"boot/initrd.img-{kernel_version}", initrd)
            ext4(root, Path(f"{image}.tmp"), size, label)
            os.replace(f"{image}.tmp", image)
        (folder / ".complete").touch()
    return image, initrd


def build_dom0(images: LabImages, cache: Path | None = None) -> DebianDom0:
    """Build (or reuse) the Debian dom0 for the lab's kernel."""
    cache = cache or cache_root()
    kernel_package = f"linux-image-{images.kernel_version}"
    key = digest(SUITE, " ".join(PACKAGES), kernel_package, ROOT_SIZE, "\n".join(MODULES),
                 CTL_UNIT, CTL_SCRIPT, inspect.getsource(_customize))

    def customize(root: Path) -> None:
        _customize(root)
        _root_login_without_password(root)
    image, initrd = build_root_image(cache / "debian-dom0" / key, (*PACKAGES, kernel_package),
                                     customize, images.kernel_version, ROOT_SIZE,
                                     "xenpbr-dom0", cache)
    return DebianDom0(image, initrd, images.kernel_version)


def lab_disk(images: LabImages, dest: Path) -> Path:
    """The disk mounted on ``/lab``: what the busybox dom0 has there (the guest kernel,
    images and hotplug script), ``domains/`` for xl configs and ``python/xenpbr_lab`` for
    the control server. Built per session: the guest images change with the source."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        tree = Path(tmp)
        shutil.copy2(images.kernel, tree / "vmlinuz")
        lab_files(images.guest_initrd, tree)
        (tree / "domains").mkdir()  # the guests' xl configs (xenpbr_lab.xl.DOMAIN_DIR)
        # the lab's dom0 side (control server, console watcher), this tree's version
        shutil.copytree(PROJECT_ROOT / "xenpbr_lab", tree / "python/xenpbr_lab",
                        ignore=shutil.ignore_patterns("__pycache__"))
        size = sum(p.stat().st_size for p in tree.iterdir()) // (1 << 20) + 64
        ext4(tree, dest, f"{size}M", LAB_LABEL)
    return dest


class DebianXenHost(XenHost):
    """The lab's Xen with the Debian dom0 booted from a copy-on-write overlay of its root
    image (``overlay``: kept across :meth:`start` calls, so a dom0 reboot is a restart of
    QEMU on the same overlay)."""

    def __init__(self, images: LabImages, dom0: DebianDom0, workdir: Path,
                 guest_disks: tuple[Path, ...] = (), **kwargs: int) -> None:
        super().__init__(images, workdir, **kwargs)
        self.dom0 = dom0
        self.overlay = workdir / "dom0-root.qcow2"
        self.lab_image = workdir / "lab.ext4"
        #: Raw images handed to guests: dom0 sees overlay ``i`` as ``/dev/vd{c+i}``.
        self.guest_disks = guest_disks
        self.guest_overlays = tuple(workdir / f"guest-disk{i}.qcow2"
                                    for i in range(len(guest_disks)))

    def prepare_disks(self) -> None:
        """The session's root overlay and /lab disk (once per host object)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for base, overlay in ((self.dom0.root_image, self.overlay),
                              *zip(self.guest_disks, self.guest_overlays)):
            if not overlay.exists():
                require("qemu-img")
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                                "-b", str(base), str(overlay)], check=True)
        if not self.lab_image.exists():
            lab_disk(self.images, self.lab_image)

    def qemu_argv(self) -> list[str]:
        argv = super().qemu_argv()
        modules = (f"{self.images.kernel} console=hvc0 root=/dev/vda rw quiet,"
                   f"{self.dom0.initrd}")
        argv[argv.index("-initrd") + 1] = modules
        return [*argv,
                "-drive", f"file={self.overlay},if=virtio,format=qcow2",
                "-drive", f"file={self.lab_image},if=virtio,format=raw",
                *(arg for overlay in self.guest_overlays
                  for arg in ("-drive", f"file={overlay},if=virtio,format=qcow2"))]

    def start(self, ready_timeout: float = 900.0) -> "DebianXenHost":
        """Boot (systemd under emulation takes minutes: the wait detects a hang)."""
        self.prepare_disks()
        super().start(ready_timeout=ready_timeout)
        return self

    def reboot(self, timeout: float = 900.0) -> "DebianXenHost":
        """Power dom0 off the way an operator does (``systemctl poweroff``: units stop,
        file systems unmount; QEMU runs with ``-no-reboot`` and exits), then boot QEMU
        again on the same overlay."""
        try:
            self.run("systemctl poweroff", check=False, timeout=30)
        except LabError as exc:  # the channel may go before the answer
            log.info("dom0 poweroff: %s", exc)
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabError(f"dom0 did not power off within {timeout:.0f} s (serial log "
                           f"{self.serial_log})") from None
        self.kill()
        self._killed = False
        self.ctl_socket = Path(tempfile.mkdtemp(prefix="xenpbr-lab-")) / "ctl.sock"
        return self.start(ready_timeout=timeout)
