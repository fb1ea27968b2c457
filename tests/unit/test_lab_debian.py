"""Package resolution errors say what to run."""

from __future__ import annotations

import subprocess

import pytest

from xenpbr_lab import debian
from xenpbr_lab.errors import PackageError

SHOW = """Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: amd64
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb

Package: libffi8
Version: 3.4.4-1
Architecture: amd64
"""


def fake_run(stdout: str, rc: int = 0):
    def run(argv, **kwargs):
        return subprocess.CompletedProcess(argv, rc, stdout, "E: boom")
    return run


def test_resolve_names_files_the_way_apt_get_download_does(monkeypatch) -> None:
    monkeypatch.setattr(debian.subprocess, "run", fake_run(SHOW))
    busybox, ffi = debian.resolve(["busybox-static", "libffi8"])
    assert busybox.filename == "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
    assert ffi.version == "3.4.4-1"


def test_unknown_package_says_to_update(monkeypatch) -> None:
    monkeypatch.setattr(debian.subprocess, "run", fake_run(SHOW))
    with pytest.raises(PackageError, match="apt-get update.*"):
        debian.resolve(["busybox-static", "xen-hypervisor-4.17-amd64"])


def test_newest_kernel_is_picked_numerically(monkeypatch) -> None:
    names = "linux-image-6.1.0-9-amd64\nlinux-image-6.1.0-56-amd64\nlinux-image-6.1.0-56-rt-amd64\n"
    monkeypatch.setattr(debian.subprocess, "run", fake_run(names))
    assert debian.newest_kernel_package() == "linux-image-6.1.0-56-amd64"


def test_apt_failure_is_reported(monkeypatch) -> None:
    monkeypatch.setattr(debian.subprocess, "run", fake_run("", rc=100))
    with pytest.raises(PackageError, match="boom"):
        debian.resolve(["x"])
