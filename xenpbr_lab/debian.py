"""Fetch and unpack the Debian packages the lab is built from.

Packages are resolved with ``apt-cache`` (so the versions are whatever the configured
Debian 12 mirrors serve today), downloaded with ``apt-get download`` into the cache and
unpacked with ``dpkg -x`` into one merged sysroot keyed by the exact set of .deb files.
Nothing is installed on the host.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import MissingHostTool, PackageError
from .paths import digest

log = logging.getLogger(__name__)

#: Xen 4.17 hypervisor, toolstack and the libraries xl, xenstored and libxc need.
XEN_PACKAGES = (
    "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "libxenmisc4.17",
    "libxenstore4", "libxencall1", "libxendevicemodel1", "libxenevtchn1",
    "libxenforeignmemory1", "libxengnttab1", "libxenhypfs1", "libxentoolcore1",
    "libxentoollog1", "xenstore-utils", "libyajl2",
)
#: Userland for the images: busybox, Debian's Python 3.11 and the libraries it loads.
USERLAND_PACKAGES = (
    "busybox-static", "python3.11-minimal", "libpython3.11-minimal",
    "libpython3.11-stdlib", "libffi8", "libgcc-s1", "e2fsprogs", "libext2fs2",
    "libcom-err2", "libss2", "libblkid1", "libuuid1",
)
KERNEL_PATTERN = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")


@dataclass(frozen=True)
class DebPackage:
    """One resolved package: its name, version and pool file name."""

    name: str
    version: str
    filename: str


def _run(argv: list[str], what: str) -> str:
    if shutil.which(argv[0]) is None:
        raise MissingHostTool(f"{argv[0]} not found: the lab needs a Debian 12 host ({what})")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise PackageError(f"{what} failed ({' '.join(argv)}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


def newest_kernel_package() -> str:
    """The newest ``linux-image-6.1.0-N-amd64`` the mirrors serve (ABI numbers move)."""
    out = _run(["apt-cache", "pkgnames", "linux-image-6.1.0-"], "listing kernel packages")
    found = [(int(m.group(1)), n) for n in out.split() if (m := KERNEL_PATTERN.match(n))]
    if not found:
        raise PackageError(
            "no linux-image-6.1.0-*-amd64 package is known to apt: run `apt-get update` "
            "(make deps does) on a Debian 12 host"
        )
    return max(found)[1]


def resolve(names: list[str]) -> list[DebPackage]:
    """Candidate version and pool file of each package, via ``apt-cache show``."""
    out = _run(["apt-cache", "show", "--no-all-versions", *names], "resolving packages")
    found: dict[str, DebPackage] = {}
    for stanza in out.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if "Package" in fields and fields["Package"] not in found:
            # apt-get download names files name_version_arch.deb with ':' as %3a.
            name, version = fields["Package"], fields["Version"]
            filename = f"{name}_{version.replace(':', '%3a')}_{fields['Architecture']}.deb"
            found[name] = DebPackage(name, version, filename)
    missing = [n for n in names if n not in found]
    if missing:
        raise PackageError(
            f"apt does not know {', '.join(missing)}: run `apt-get update` (make deps) "
            "and check /etc/apt/sources.list has Debian 12 (bookworm) main"
        )
    return [found[n] for n in names]


def download(packages: list[DebPackage], debs_dir: Path) -> list[Path]:
    """Download the packages not yet cached; return the .deb paths in order."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    wanted = [p for p in packages if not (debs_dir / p.filename).exists()]
    if wanted:
        log.info("downloading %d Debian packages into %s", len(wanted), debs_dir)
        with tempfile.TemporaryDirectory(dir=debs_dir) as tmp:
            specs = [f"{p.name}={p.version}" for p in wanted]
            proc = subprocess.run(["apt-get", "download", *specs], cwd=tmp, capture_output=True,
                                  text=True, timeout=900, check=False)
            if proc.returncode != 0:
                raise PackageError(f"apt-get download failed: {proc.stderr.strip()[-800:]}")
            for deb in Path(tmp).glob("*.deb"):
                deb.rename(debs_dir / deb.name)
    paths = [debs_dir / p.filename for p in packages]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise PackageError(f"apt-get download did not produce {', '.join(missing)}")
    return paths


def unpack(debs: list[Path], sysroots_dir: Path) -> Path:
    """Unpack all ``debs`` into one merged sysroot, reused while the set is unchanged."""
    key = digest(*sorted(d.name for d in debs))
    root = sysroots_dir / key
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    tmp = sysroots_dir / f".{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("unpacking %d packages into %s", len(debs), root)
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
    (tmp / ".complete").write_text("\n".join(d.name for d in debs) + "\n")
    tmp.rename(root)
    return root


#: The hypervisor package whose config decides whether Xen has log-dirty mode for PV
#: guests (``CONFIG_SHADOW_PAGING``): live migration and xenpbr's live capture need it.
HYPERVISOR_PACKAGE = "xen-hypervisor-4.17-amd64"
SHADOW_PAGING = "CONFIG_SHADOW_PAGING=y"


def versions(name: str) -> list[DebPackage]:
    """Every version of ``name`` the mirrors serve, newest first (``apt-cache show``)."""
    out = _run(["apt-cache", "show", name], f"listing the versions of {name}")
    found = []
    for stanza in out.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.M))
        if fields.get("Package") == name:
            version = fields["Version"]
            found.append(DebPackage(name, version, f"{name}_{version.replace(':', '%3a')}_"
                                                   f"{fields['Architecture']}.deb"))
    return sorted(found, key=lambda p: _VersionKey(p.version), reverse=True)


def hypervisor_with_shadow_paging(debs_dir: Path, sysroots_dir: Path) -> tuple[Path, str]:
    """The newest Debian 12 Xen 4.17 hypervisor built with shadow paging: its ``xen.gz``
    and version. Debian's security update 4.17.7 turned shadow paging off (upstream
    deprecated it), so PV guests cannot be live-migrated on it; the 4.17.5 of bookworm's
    point release still has it, and within 4.17 any hypervisor runs with 4.17's tools.
    The lab boots it only for the tests of live capture."""
    for package in versions(HYPERVISOR_PACKAGE):
        (deb,) = download([package], debs_dir)
        root = unpack([deb], sysroots_dir)
        config = root / "boot/xen-4.17-amd64.config"
        if config.exists() and SHADOW_PAGING in config.read_text().splitlines():
            return root / "boot/xen-4.17-amd64.gz", package.version
    raise PackageError(f"no version of {HYPERVISOR_PACKAGE} on the mirrors is built with "
                       f"{SHADOW_PAGING} (needed for live capture of PV guests)")


class _VersionKey:
    """Orders Debian version strings as ``dpkg --compare-versions`` does."""

    def __init__(self, version: str) -> None:
        self.version = version

    def __lt__(self, other: "_VersionKey") -> bool:
        return subprocess.run(["dpkg", "--compare-versions", self.version, "lt",
                               other.version], check=False).returncode == 0
