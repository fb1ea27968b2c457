"""The lab harness fails clearly and leaves nothing running.

A stand-in ``qemu-system-x86_64`` on PATH plays the failure: it dies at once, or it
serves the control socket but dom0 never answers, or it panics on the console.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from xenpbr_lab.build import LabImages
from xenpbr_lab.errors import DiskSpaceError, Dom0NotReady, MissingHostTool, QemuDied
from xenpbr_lab.host import XenHost
from xenpbr_lab.paths import digest, ensure_free_space

SILENT_QEMU = f"""#!{sys.executable}
import socket, sys, time, os
args = sys.argv
chardev = [a for a in args if a.startswith("socket,id=ctl")][0]
path = dict(kv.split("=", 1) for kv in chardev.split(",")[1:])["path"]
serial = [a for a in args if a.startswith("file:")][0][5:]
s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(1)
open(serial, "w").write(os.environ.get("FAKE_CONSOLE", "(XEN) booting\\n"))
open(os.environ["FAKE_PIDFILE"], "w").write(str(os.getpid()))
conn, _ = s.accept()
time.sleep(3600)
"""


@pytest.fixture
def images(tmp_path: Path) -> LabImages:
    for name in ("xen.elf", "vmlinuz", "System.map", "dom0.cpio.gz", "guest.cpio.gz"):
        (tmp_path / name).write_bytes(b"")
    return LabImages(tmp_path / "xen.elf", tmp_path / "vmlinuz", tmp_path / "System.map",
                     tmp_path / "dom0.cpio.gz", tmp_path / "guest.cpio.gz", "6.1.0-0", ())


def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "qemu-system-x86_64"
    exe.write_text(script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_missing_qemu_says_how_to_install(images, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingHostTool, match="apt-get install qemu-system-x86"):
        XenHost(images, tmp_path / "run").start()


def test_qemu_that_dies_is_reported_with_its_log(images, tmp_path, monkeypatch) -> None:
    fake_qemu(tmp_path, monkeypatch, "#!/bin/sh\necho 'qemu: could not load kernel' >&2\n"
                                     "exit 1\n")
    host = XenHost(images, tmp_path / "run")
    with pytest.raises(QemuDied, match=r"exited with status 1.*log: .*qemu\.log") as info:
        host.start(ready_timeout=20)
    assert "could not load kernel" in info.value.log.read_text()


def test_dom0_that_never_answers_times_out_and_qemu_is_stopped(images, tmp_path,
                                                                monkeypatch) -> None:
    pidfile = tmp_path / "pid"
    monkeypatch.setenv("FAKE_PIDFILE", str(pidfile))
    fake_qemu(tmp_path, monkeypatch, SILENT_QEMU)
    host = XenHost(images, tmp_path / "run")
    with pytest.raises(Dom0NotReady, match=r"never answered.*serial\.log"):
        host.start(ready_timeout=4)
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(pid), "the QEMU we started must be stopped after a failed boot"


def test_panic_on_the_console_fails_fast(images, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_PIDFILE", str(tmp_path / "pid"))
    monkeypatch.setenv("FAKE_CONSOLE", "(XEN) ****************\n(XEN) Panic on CPU 0:\n"
                                       "(XEN) Could not set up DOM0 guest OS\n")
    fake_qemu(tmp_path, monkeypatch, SILENT_QEMU)
    start = time.monotonic()
    with pytest.raises(Dom0NotReady, match="Could not set up DOM0"):
        XenHost(images, tmp_path / "run").start(ready_timeout=60)
    assert time.monotonic() - start < 30


def test_kill_is_idempotent(images, tmp_path) -> None:
    host = XenHost(images, tmp_path / "run")
    host.kill()
    host.kill()


def test_not_enough_disk_names_the_folder(tmp_path) -> None:
    with pytest.raises(DiskSpaceError, match=str(tmp_path)):
        ensure_free_space(tmp_path, need=2**62)


def test_digest_separates_its_parts() -> None:
    assert digest("ab", "c") != digest("a", "bc")


def test_dom0_gets_the_vcpus_asked_for_and_no_more_than_the_machine(images,
                                                                    tmp_path) -> None:
    def xen_args(host: XenHost) -> str:
        argv = host.qemu_argv()
        return argv[argv.index("-append") + 1]
    assert "dom0_max_vcpus=1 " in xen_args(XenHost(images, tmp_path))
    assert "dom0_max_vcpus=2 " in xen_args(XenHost(images, tmp_path, dom0_vcpus=2))
    with pytest.raises(ValueError, match="dom0_vcpus must be 1 to 2"):
        XenHost(images, tmp_path, dom0_vcpus=3)
