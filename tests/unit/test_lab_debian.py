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


HYPERVISORS = "".join(f"""Package: xen-hypervisor-4.17-amd64
Version: {v}
Architecture: amd64

""" for v in ("4.17.5+72-g01140da4e8-1", "4.17.10-0+deb12u1", "4.17.7+13-g2445b30a44-0+deb12u1"))


def test_versions_are_ordered_by_dpkg_not_as_strings(monkeypatch) -> None:
    real_run = subprocess.run
    monkeypatch.setattr(debian.subprocess, "run", lambda argv, **kw: (
        real_run(argv, **kw) if argv[0] == "dpkg" else fake_run(HYPERVISORS)(argv)))
    assert [p.version for p in debian.versions("xen-hypervisor-4.17-amd64")] == [
        "4.17.10-0+deb12u1", "4.17.7+13-g2445b30a44-0+deb12u1", "4.17.5+72-g01140da4e8-1"]


def _hypervisors(monkeypatch, tmp_path, configs: dict[str, str]) -> None:
    """Fake apt: each version's unpacked config is configs[version]."""
    packages = [debian.DebPackage("xen-hypervisor-4.17-amd64", v, f"{v}.deb") for v in configs]
    monkeypatch.setattr(debian, "versions", lambda name: packages)
    monkeypatch.setattr(debian, "download", lambda pkgs, d: [d / p.filename for p in pkgs])

    def unpack(debs, sysroots):
        root = tmp_path / debs[0].name
        (root / "boot").mkdir(parents=True, exist_ok=True)
        (root / "boot/xen-4.17-amd64.config").write_text(configs[debs[0].name[:-4]])
        return root
    monkeypatch.setattr(debian, "unpack", unpack)


def test_the_newest_hypervisor_with_shadow_paging_is_chosen(monkeypatch, tmp_path) -> None:
    _hypervisors(monkeypatch, tmp_path, {"4.17.7": "# CONFIG_SHADOW_PAGING is not set\n",
                                         "4.17.5": "CONFIG_PV=y\nCONFIG_SHADOW_PAGING=y\n",
                                         "4.17.3": "CONFIG_SHADOW_PAGING=y\n"})
    xen, version = debian.hypervisor_with_shadow_paging(tmp_path, tmp_path)
    assert version == "4.17.5" and xen == tmp_path / "4.17.5.deb/boot/xen-4.17-amd64.gz"


def test_no_hypervisor_with_shadow_paging_is_an_error_saying_why(monkeypatch, tmp_path) -> None:
    _hypervisors(monkeypatch, tmp_path, {"4.17.7": "# CONFIG_SHADOW_PAGING is not set\n"})
    with pytest.raises(PackageError, match="CONFIG_SHADOW_PAGING=y.*live capture"):
        debian.hypervisor_with_shadow_paging(tmp_path, tmp_path)
