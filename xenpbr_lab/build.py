"""Build the lab's boot artefacts from Debian packages, cached by their inputs.

Artefacts (all under the cache, see :mod:`paths`):

* ``xen.elf``: the 4.17 hypervisor, gunzipped (QEMU's ``-kernel`` takes the multiboot ELF);
* ``vmlinuz`` and ``System.map``: Debian's 6.1 kernel, used by dom0 and by guests;
* ``dom0.cpio.gz``: busybox, the Xen tools and libraries, Python 3.11, kernel modules
  (the *base*, keyed by package versions and this builder), concatenated with an
  *overlay* holding xenpbr installed from the working tree and the guest images
  (keyed by the source tree), so editing xenpbr rebuilds only the cheap overlay;
* ``guest.cpio.gz``: a busybox PV guest with Xen's xenstore tools.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import debian, elfdeps, kmod, lkdtm
from .cpio import write_initramfs
from .errors import LabError, PackageError
from .paths import cache_lock, cache_root, digest, ensure_free_space, tree_digest

log = logging.getLogger(__name__)

SCRIPTS = Path(__file__).with_name("scripts")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
XEN_LIB = "usr/lib/xen-4.17"
DOM0_MODULES = ["xen_evtchn", "xen_gntdev", "xen_gntalloc", "xen_privcmd", "xenfs",
                "xen_blkback", "virtio_pci", "virtio_console", "loop", "ext4"]
# ext4 needs the crc32c algorithm; xen_wdt is /dev/watchdog (xenpbr-lab faults' hangs)
GUEST_MODULES = ["xen_blkfront", "crc32c_generic", "ext4", "xen_wdt"]
PYTHON_PRUNE = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                "pydoc_data", "config-3.11-x86_64-linux-gnu", "unittest/test", "sqlite3/test")
#: Guests boot under TCG with every byte of their initramfs: drop what an agent never uses.
GUEST_PYTHON_PRUNE = PYTHON_PRUNE + ("asyncio", "multiprocessing", "xml", "xmlrpc", "email",
                                     "http", "html", "wsgiref", "curses", "dbm", "sqlite3",
                                     "venv", "unittest", "pydoc.py")
#: The extension modules a guest keeps (hashing, zlib and the like are built in).
GUEST_EXTENSIONS = {"_ctypes", "_json", "mmap", "resource", "termios", "_queue",
                    "_contextvars", "_uuid", "_typing", "select", "fcntl"}
GUEST_ENCODINGS = {"__init__", "aliases", "utf_8", "utf_8_sig", "ascii", "latin_1", "idna",
                   "cp437"}


@dataclass(frozen=True)
class LabImages:
    """Paths of a complete, consistent set of boot artefacts."""

    xen: Path
    kernel: Path
    system_map: Path
    dom0_initrd: Path
    guest_initrd: Path
    kernel_version: str
    packages: tuple[debian.DebPackage, ...] = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict, compare=False, repr=False)


def _copy(src: Path, dest: Path) -> None:
    """Copy ``src`` into the stage as ``dest``, replacing what is there. A busybox applet
    link at ``dest`` points to ``/bin/busybox``: copying *through* it would overwrite the
    host's busybox (it did, with mke2fs), so whatever is at ``dest`` is unlinked first."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    if src.is_symlink():
        os.symlink(os.readlink(src), dest)
    else:
        shutil.copy2(src, dest)


def _busybox(stage: Path, sysroot: Path) -> None:
    busybox = sysroot / "bin/busybox"
    _copy(busybox, stage / "bin/busybox")
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        link = stage / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/bin/busybox", link)


def _libraries(stage: Path, sysroot: Path, programs: list[Path]) -> None:
    """Copy every library ``programs`` need into the stage's /lib, plus the loader."""
    libs = elfdeps.needed_libraries(programs, sysroot)
    libgcc = [d / "libgcc_s.so.1" for d in elfdeps.library_dirs(sysroot)
              if (d / "libgcc_s.so.1").exists()]
    if not libgcc:
        raise PackageError("libgcc_s.so.1 missing (package libgcc-s1): xl aborts without it")
    for lib in list(libs) + libgcc[:1]:
        real = lib.resolve()
        if lib.name.startswith("ld-linux"):
            _copy(real, stage / "lib64" / lib.name)
        else:
            _copy(real, stage / "lib/x86_64-linux-gnu" / lib.name)


def _python(stage: Path, sysroot: Path, prune: tuple[str, ...] = PYTHON_PRUNE) -> list[Path]:
    """Stage Debian's python3.11 with a pruned stdlib; return its ELF files for lib lookup."""
    _copy(sysroot / "usr/bin/python3.11", stage / "usr/bin/python3.11")
    os.symlink("python3.11", stage / "usr/bin/python3")
    src = sysroot / "usr/lib/python3.11"
    dest = stage / "usr/lib/python3.11"
    shutil.copytree(src, dest, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in prune:
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    (stage / "usr/lib/python3/dist-packages").mkdir(parents=True, exist_ok=True)
    elves = [stage / "usr/bin/python3.11"]
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(map(str, elfdeps.library_dirs(sysroot))))
    for ext in sorted((dest / "lib-dynload").glob("*.so")):
        out = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, env=env).stdout
        if "not found" in out:
            log.debug("dropping %s: a library it needs is not available", ext.name)
            ext.unlink()
        else:
            elves.append(ext)
    return elves


def _compile_python(tree: Path) -> None:
    """Precompile .pyc (unchecked hashes): Python start-up under TCG is otherwise slow."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                    "--invalidation-mode", "unchecked-hash", "-d", "/", str(tree)],
                   check=False, capture_output=True)


def _modules(stage: Path, sysroot: Path, version: str, wanted: list[str]) -> None:
    root = sysroot / "lib/modules" / version
    order = kmod.load_order(wanted, root)
    for ko in order:
        _copy(ko, stage / "lib/modules" / version / ko.relative_to(root))
    listing = "\n".join(str(Path("/lib/modules") / version / ko.relative_to(root))
                        for ko in order)
    (stage / "etc/xenpbr-lab").mkdir(parents=True, exist_ok=True)
    (stage / "etc/xenpbr-lab/modules").write_text(listing + "\n")


def _base_files(stage: Path, init_script: str) -> None:
    shutil.copy2(SCRIPTS / init_script, stage / "init")
    (stage / "init").chmod(0o755)
    etc = stage / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\n")
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "var/log", "var/lib", "var/run"):
        (stage / d).mkdir(parents=True, exist_ok=True)


def _build_dom0_base(sysroot: Path, kernel_version: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp)
        _busybox(stage, sysroot)
        _base_files(stage, "dom0-init.sh")
        shutil.copytree(sysroot / XEN_LIB, stage / XEN_LIB, symlinks=True)
        shutil.copytree(sysroot / "etc/xen", stage / "etc/xen", symlinks=True)
        for tool in (sysroot / "usr/bin").glob("xenstore*"):
            _copy(tool, stage / "usr/bin" / tool.name)
        for name in ("mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4", "debugfs"):
            if (sysroot / "sbin" / name).exists():
                _copy(sysroot / "sbin" / name, stage / "sbin" / name)
        elves = _python(stage, sysroot)
        elves += [p for p in stage.rglob("*") if p.is_file() and not p.is_symlink()
                  and elfdeps.is_elf(p) and "lib-dynload" not in p.parts
                  and p.suffix not in (".ko",) and p.name != "busybox"]
        _libraries(stage, sysroot, elves)
        _modules(stage, sysroot, kernel_version, DOM0_MODULES)
        (stage / "lab").mkdir()
        _copy(sysroot / f"boot/vmlinuz-{kernel_version}", stage / "lab/vmlinuz")
        _copy(sysroot / f"boot/System.map-{kernel_version}", stage / "lab/System.map")
        _compile_python(stage / "usr/lib")
        write_initramfs(stage, out)


def _slim_guest_python(stage: Path) -> None:
    """Keep only the listed extension modules and encodings, and ship the stdlib as
    byte-code only (about half the bytes the guest kernel must unpack)."""
    lib = stage / "usr/lib/python3.11"
    for ext in (lib / "lib-dynload").glob("*.so"):
        if ext.name.split(".")[0] not in GUEST_EXTENSIONS:
            ext.unlink()
    for enc in (lib / "encodings").glob("*.py"):
        if enc.stem not in GUEST_ENCODINGS:
            enc.unlink()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-b", "-j", "0", "-s", str(lib),
                    "-p", "/usr/lib/python3.11", "--invalidation-mode", "unchecked-hash",
                    str(lib)], check=True,
                   capture_output=True)
    for source in lib.rglob("*.py"):
        source.unlink()
    for cache in lib.rglob("__pycache__"):
        shutil.rmtree(cache)


def _build_guest_base(sysroot: Path, kernel_version: str, out: Path, lkdtm_ko: Path) -> None:
    """Busybox, Xen's xenstore tools, a slimmed Python 3.11 (for the guest agent) and
    LKDTM (loaded only with lab.lkdtm=1: xenpbr inject --fault lkdtm:TYPE)."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp)
        _busybox(stage, sysroot)
        _base_files(stage, "guest-init.sh")
        for tool in (sysroot / "usr/bin").glob("xenstore*"):
            _copy(tool, stage / "usr/bin" / tool.name)
        _python(stage, sysroot, GUEST_PYTHON_PRUNE)
        _slim_guest_python(stage)
        elves = [stage / "usr/bin/python3.11", *(stage / "usr/lib/python3.11/lib-dynload").glob("*.so")]
        _libraries(stage, sysroot, [sysroot / "usr/bin/xenstore", *elves])
        _modules(stage, sysroot, kernel_version, GUEST_MODULES)
        _copy(lkdtm_ko, stage / "lib/modules" / kernel_version / lkdtm.MODULE_PATH)
        write_initramfs(stage, out)


#: Wheels for dom0 only: Capstone for the fault injector (setup.cfg's ``faults`` extra;
#: 22 MB unpacked, more than a 128 MiB guest's initramfs has room for) and pyxs, to
#: measure an alternative beside ours (docs/xenstore.md).
DOM0_WHEELS = ["capstone>=4.0.2,<6", "pyxs==0.4.1"]


def _wheelhouse(dest: Path, requirements: list[str]) -> None:
    """Build or fetch *requirements* and their dependencies as wheels (on the host: dom0
    has no network)."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest),
           *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"building xenpbr wheels failed: {proc.stderr.strip()[-1500:]}")


def _build_site(out: Path, requirements: list[str], *, with_example: bool = True) -> None:
    """*requirements* installed as a dist-packages tree: xenpbr and its dependencies
    for dom0 and guests, or the dom0-only wheels."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp) / "stage"
        wheels = Path(tmp) / "wheels"
        _wheelhouse(wheels, requirements)
        site = stage / "usr/lib/python3/dist-packages"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
               "--no-compile", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LabError(f"installing wheels into the images failed: {proc.stderr[-1500:]}")
        shutil.rmtree(site / "bin", ignore_errors=True)
        _compile_python(site)
        if with_example:
            _c_example(stage / "usr/bin" / C_EXAMPLE)
        write_initramfs(stage, out, with_device_nodes=False)


#: The C resurrection example in the images (tests/lab/test_resurrection_extract_real.py).
C_EXAMPLE = "xenpbr-resurrect-example"


def _c_example(dest: Path) -> None:
    """guest-agent/examples/resurrect-example.c, linked statically (the guest has no zlib
    library of its own): a C program using xenpbr-resurrect.h, run in a real guest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    agent = PROJECT_ROOT / "guest-agent"
    cmd = ["cc", "-static", "-s", "-O2", "-Wall", "-Werror", "-I", str(agent / "include"),
           str(agent / "examples/resurrect-example.c"), "-lz", "-o", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise LabError("no C compiler to build the resurrection example for the images: "
                       "run tools/install-host-deps.sh (gcc, zlib1g-dev)") from None
    if proc.returncode != 0:
        raise LabError(f"building {dest.name} failed (gcc, zlib1g-dev: "
                       f"tools/install-host-deps.sh): {proc.stderr.strip()[-1500:]}")


def lab_files(guest_initrd: Path, lab: Path) -> None:
    """Into dom0's ``/lab`` folder ``lab``: the files dom0 hands to guests
    (``guest.cpio.gz``) and the disk hotplug script (``block-lab``)."""
    lab.mkdir(parents=True, exist_ok=True)
    shutil.copy2(guest_initrd, lab / "guest.cpio.gz")
    shutil.copy2(SCRIPTS / "block-lab", lab / "block-lab")
    (lab / "block-lab").chmod(0o755)


def _build_lab_files(guest_initrd: Path, out: Path) -> None:
    """``/lab`` of the busybox dom0, as an archive (see :func:`lab_files`)."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp)
        lab_files(guest_initrd, stage / "lab")
        write_initramfs(stage, out, with_device_nodes=False, level=0)


def _concatenate(parts: list[Path], out: Path) -> None:
    """Linux unpacks concatenated (separately compressed) cpio archives in order. An
    uncompressed archive must start 4-byte aligned, so each part is zero-padded (the
    kernel skips zeros between archives)."""
    with open(f"{out}.tmp", "wb") as dest:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dest)
            dest.write(b"\0" * (-dest.tell() % 4))
    os.replace(f"{out}.tmp", out)


def _source_digest() -> str:
    parts = [tree_digest(PROJECT_ROOT / d) for d in ("xenpbr", "xenpbr_lab", "guest-agent")
             if (PROJECT_ROOT / d).is_dir()]
    parts.append((PROJECT_ROOT / "setup.cfg").read_text())
    return digest(*parts)


def _timed(timings: dict[str, float], name: str, fn, *args, **kwargs) -> None:
    start = time.monotonic()
    fn(*args, **kwargs)
    timings[name] = round(time.monotonic() - start, 2)
    log.info("built %s in %.1f s", name, timings[name])


def _prune(folder: Path, keep: set[Path], newest: int = 3) -> None:
    """Drop cache entries beyond the ``newest`` few (by mtime), never those in ``keep``:
    every edit of xenpbr makes a new overlay, and old ones are dead weight."""
    entries = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[newest:]:
        if stale not in keep:
            log.info("pruning stale lab cache entry %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def cached_sysroot(cache: Path | None = None) -> Path | None:
    """The newest complete sysroot already in the cache, without asking apt or the
    network (None if there is none): for the fast tests that load Xen's libraries."""
    folder = (cache or cache_root()) / "sysroots"
    complete = [p.parent for p in folder.glob("*/.complete")] if folder.is_dir() else []
    return max(complete, key=lambda p: p.stat().st_mtime, default=None)


def unpacked_sysroot(cache: Path | None = None) -> tuple[Path, str, list[debian.DebPackage]]:
    """The unpacked Debian packages (Xen, userland, kernel): sysroot path, kernel version
    and the resolved packages. Also used by unit tests that load the real Xen libraries."""
    cache = cache or cache_root()
    with cache_lock(cache):
        return _unpacked_sysroot(cache)


def _unpacked_sysroot(cache: Path) -> tuple[Path, str, list[debian.DebPackage]]:
    ensure_free_space(cache)
    kernel_pkg = debian.newest_kernel_package()
    packages = debian.resolve([*debian.XEN_PACKAGES, *debian.USERLAND_PACKAGES, kernel_pkg])
    debs = debian.download(packages, cache / "debs")
    return (debian.unpack(debs, cache / "sysroots"), kernel_pkg.removeprefix("linux-image-"),
            packages)


def with_shadow_paging(images: LabImages, cache: Path | None = None) -> LabImages:
    """``images`` with a Debian 12 hypervisor built with shadow paging (log-dirty mode
    for PV guests, which live capture needs and Debian's current Xen lacks:
    debian.hypervisor_with_shadow_paging), uncompressed for QEMU, cached by version."""
    cache = cache or cache_root()
    with cache_lock(cache):
        # Not under sysroots/: a hypervisor-only unpack is no sysroot, and
        # cached_sysroot (the newest there) must never hand it to the tests.
        xen_gz, version = debian.hypervisor_with_shadow_paging(cache / "debs",
                                                               cache / "hypervisors")
        xen = cache / "images" / f"xen-shadow-{digest(version)}.elf"
        if not xen.exists():
            xen.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(xen_gz) as src, open(f"{xen}.tmp", "wb") as dest:
                shutil.copyfileobj(src, dest)
            os.replace(f"{xen}.tmp", xen)
    log.info("lab hypervisor with shadow paging: Debian's %s", version)
    return replace(images, xen=xen)


def build(cache: Path | None = None) -> LabImages:
    """Build (or reuse from the cache) every artefact the lab boots (one build at a
    time per cache: concurrent lab sessions wait for each other here)."""
    cache = cache or cache_root()
    with cache_lock(cache):
        return _build(cache)


def _build(cache: Path) -> LabImages:
    timings: dict[str, float] = {}
    start = time.monotonic()
    sysroot, kernel_version, packages = unpacked_sysroot(cache)
    builder = tree_digest(Path(__file__).parent, ("*.py", "scripts/*"))
    base_dir = cache / "images" / digest(sysroot.name, builder)
    base_dir.mkdir(parents=True, exist_ok=True)
    xen, kernel = base_dir / "xen.elf", base_dir / "vmlinuz"
    if not xen.exists():
        with gzip.open(sysroot / "boot/xen-4.17-amd64.gz") as src, open(f"{xen}.tmp", "wb") as d:
            shutil.copyfileobj(src, d)
        os.replace(f"{xen}.tmp", xen)
    for name, dest in ((f"vmlinuz-{kernel_version}", kernel),
                       (f"System.map-{kernel_version}", base_dir / "System.map")):
        if not dest.exists():
            shutil.copy2(sysroot / "boot" / name, dest)
    dom0_base, guest_base = base_dir / "dom0-base.cpio.gz", base_dir / "guest-base.cpio.gz"
    if not dom0_base.exists():
        _timed(timings, "dom0-base", _build_dom0_base, sysroot, kernel_version, dom0_base)
    if not guest_base.exists():
        modules = sysroot / "lib/modules" / kernel_version
        lkdtm_ko = lkdtm.module(cache, kernel_version, kmod.load_order(["xen_wdt"], modules)[0])
        _timed(timings, "guest-base", _build_guest_base, sysroot, kernel_version, guest_base,
               lkdtm_ko)
    overlay_dir = cache / "overlays" / digest(base_dir.name, _source_digest())
    overlay_dir.mkdir(parents=True, exist_ok=True)
    site, guest = overlay_dir / "site.cpio.gz", overlay_dir / "guest.cpio.gz"
    dom0_site = overlay_dir / "dom0-site.cpio.gz"
    lab_files, dom0 = overlay_dir / "lab.cpio", overlay_dir / "dom0.cpio.gz"
    if not dom0.exists():
        _timed(timings, "site", _build_site, site, [str(PROJECT_ROOT)])
        _timed(timings, "dom0-site", _build_site, dom0_site, DOM0_WHEELS, with_example=False)
        _concatenate([guest_base, site], guest)
        _build_lab_files(guest, lab_files)
        _concatenate([dom0_base, site, dom0_site, lab_files], dom0)
    for folder in ("overlays", "images", "sysroots"):
        _prune(cache / folder, {overlay_dir, base_dir, sysroot})
    timings["total"] = round(time.monotonic() - start, 2)
    return LabImages(xen, kernel, base_dir / "System.map", dom0, guest, kernel_version,
                     tuple(packages), timings)
