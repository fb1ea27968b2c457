"""A Xen host booted in QEMU: start it, drive dom0, collect evidence, stop it.

Modelled on Firecracker's test ``Microvm``: the constructor only records settings;
lifecycle verbs are explicit (:meth:`XenHost.start`, :meth:`XenHost.kill`); ``kill`` is
idempotent and stops only the QEMU process this object started, by its pid. Every wait
is bounded and a failure names what failed and where its log is.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .build import LabImages
from .channel import ControlChannel, RunResult
from .errors import ChannelError, Dom0NotReady, LabError, LabTimeout, MissingHostTool, QemuDied

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
_FATAL = re.compile(r"Panic on CPU|Kernel panic - not syncing|\(XEN\) \*\*\*\*\*+")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL QEMU if the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def kvm_usable() -> bool:
    """KVM only if explicitly allowed: on these machines /dev/kvm answers but guests hang."""
    return os.environ.get("XENPBR_LAB_KVM") == "1" and os.access("/dev/kvm", os.R_OK | os.W_OK)


class XenHost:
    """Xen 4.17 + a PV dom0 running under QEMU, driven over the control channel."""

    def __init__(self, images: LabImages, workdir: Path, memory_mib: int = 4096,
                 dom0_memory_mib: int = 2048, cpus: int = 2, dom0_vcpus: int = 1) -> None:
        if not 1 <= dom0_vcpus <= cpus:
            raise ValueError(f"dom0_vcpus must be 1 to {cpus} (the machine's CPUs)")
        self.images = images
        self.dom0_vcpus = dom0_vcpus
        self.workdir = workdir
        self.memory_mib = memory_mib
        self.dom0_memory_mib = dom0_memory_mib
        self.cpus = cpus
        self.serial_log = workdir / "serial.log"
        self.qemu_log = workdir / "qemu.log"
        # Unix socket paths are limited to 108 bytes: keep it short, outside workdir.
        self.ctl_socket = Path(tempfile.mkdtemp(prefix="xenpbr-lab-")) / "ctl.sock"
        self.proc: subprocess.Popen | None = None
        self.channel: ControlChannel | None = None
        self.boot_seconds: float | None = None
        self._killed = False

    # -- lifecycle -------------------------------------------------------------------

    def qemu_argv(self) -> list[str]:
        """The QEMU command line (the facts in shared/notes/xen-lab-facts.md)."""
        # scrub-domheap: Xen zeroes every page it frees, so xenpbrd's hot streams may
        # leave a guest's zero pages to Xen (docs/images.md, "Zero pages left to Xen")
        xen_args = (f"console=com1 com1=115200,8n1 dom0_mem={self.dom0_memory_mib}M,"
                    f"max:{self.dom0_memory_mib}M dom0_max_vcpus={self.dom0_vcpus} "
                    "console_timestamps=boot scrub-domheap "
                    "guest_loglvl=all")
        modules = f"{self.images.kernel} console=hvc0 quiet,{self.images.dom0_initrd}"
        accel = ["-accel", "kvm", "-cpu", "host"] if kvm_usable() else \
            ["-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm"]
        return [QEMU, *accel, "-smp", str(self.cpus), "-m", str(self.memory_mib),
                "-nodefaults", "-display", "none", "-vga", "none", "-no-reboot",
                "-serial", f"file:{self.serial_log}",
                "-kernel", str(self.images.xen), "-append", xen_args, "-initrd", modules,
                "-device", "virtio-serial-pci,id=vser0",
                "-chardev", f"socket,id=ctl,path={self.ctl_socket},server=on,wait=off",
                "-device", "virtserialport,bus=vser0.0,chardev=ctl,name=xenpbr.ctl"]

    def start(self, ready_timeout: float = 300.0) -> "XenHost":
        """Boot QEMU and wait until dom0's control server answers."""
        if shutil.which(QEMU) is None:
            raise MissingHostTool(f"{QEMU} not found: run `make deps` (apt-get install "
                                  "qemu-system-x86)")
        if any("," in str(p) for p in (self.images.kernel, self.images.dom0_initrd)):
            raise LabError("QEMU splits -initrd on ',': the lab cache path must not contain "
                           f"one ({self.images.dom0_initrd})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ctl_socket.unlink(missing_ok=True)
        argv = self.qemu_argv()
        log.info("starting QEMU: %s", " ".join(argv))
        start = time.monotonic()
        with open(self.qemu_log, "wb") as qlog:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog,
                                         stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                         # its own session: a Ctrl-C or a signal to
                                         # our process group must not kill the lab
                                         start_new_session=True)
        try:
            self._wait_for_socket(start + 30)
            self.channel = ControlChannel.connect_unix(self.ctl_socket)
            self._wait_for_dom0(start + ready_timeout)
        except BaseException:
            self.kill()
            raise
        self.boot_seconds = time.monotonic() - start
        log.info("dom0 ready %.1f s after QEMU start", self.boot_seconds)
        return self

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise QemuDied(f"QEMU exited with status {self.proc.returncode} "
                           f"(serial console: {self.serial_log})", self.qemu_log)
        text = self.serial_text()
        match = _FATAL.search(text)
        if match:
            tail = "\n".join(text[match.start():].splitlines()[:12])
            raise Dom0NotReady(f"Xen or dom0 panicked:\n{tail}", self.serial_log)

    def _wait_for_socket(self, deadline: float) -> None:
        while not self.ctl_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise QemuDied("QEMU never created its control socket", self.qemu_log)
            time.sleep(0.05)

    def _wait_for_dom0(self, deadline: float) -> None:
        assert self.channel is not None
        while True:
            self._check_alive()
            try:
                self.channel.ping(timeout=3.0)
                return
            except LabTimeout:
                pass
            if time.monotonic() > deadline:
                raise Dom0NotReady("dom0 never answered on the control channel; the "
                                   "dom0 console is in the serial log", self.serial_log)

    def kill(self) -> None:
        """Stop the QEMU process we started (idempotent, bounded)."""
        if self._killed:
            return
        self._killed = True
        if self.channel is not None:
            self.channel.close()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        log.info("QEMU pid %d stopped", self.proc.pid)
        shutil.rmtree(self.ctl_socket.parent, ignore_errors=True)

    def __enter__(self) -> "XenHost":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # -- dom0 --------------------------------------------------------------------------

    def _ch(self) -> ControlChannel:
        if self.channel is None or self._killed:
            raise ChannelError("the Xen host is not running")
        return self.channel

    def run(self, argv: str | list[str], timeout: float = 120.0, check: bool = True,
            stdin: bytes = b"") -> RunResult:
        """Run a command in dom0; raise :class:`CommandFailed` on failure if ``check``."""
        return self._ch().run(argv, timeout=timeout, check=check, stdin=stdin)

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file into dom0."""
        self._ch().put(path, data, mode)

    def get(self, path: str) -> bytes:
        """Read a file from dom0."""
        return self._ch().get(path)

    def uptime(self) -> float:
        """Dom0 uptime in seconds."""
        return self._ch().ping()

    # -- evidence ----------------------------------------------------------------------

    def serial_text(self) -> str:
        """Xen's and dom0's console output so far."""
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def collect_artifacts(self, dest: Path) -> Path:
        """Copy the serial log, QEMU log, and (if dom0 answers) Xen's dmesg, dom0's logs
        and the guest consoles into ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for src in (self.serial_log, self.qemu_log):
            if src.exists():
                shutil.copy2(src, dest / src.name)
        if self.channel is None or self._killed:
            return dest
        probes = {"xl-dmesg.txt": "xl dmesg", "dom0-dmesg.txt": "dmesg",
                  "xl-list.txt": "xl list -v", "xenstore.txt": "xenstore-ls -f",
                  "ctl-server.log": "cat /var/log/ctl-server.log",
                  "guest-consoles.txt": "tail -n +1 /var/log/xen/console/* 2>&1",
                  "xen-logs.txt": "tail -n +1 /var/log/xen/*.log 2>&1"}
        for name, cmd in probes.items():
            try:
                result = self.run(cmd, timeout=30, check=False)
                (dest / name).write_text(result.stdout + result.stderr)
            except LabError as exc:
                (dest / name).write_text(f"could not collect: {exc}\n")
        return dest
