"""Where the lab keeps its cache and its per-run artefacts.

The cache lives outside the work tree (CI clones afresh each run) under the user's cache
folder, overridable with ``XENPBR_LAB_CACHE``. Everything in it is keyed by a hash of its
inputs, so a stale entry is never reused and a warm rebuild costs only hashing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DiskSpaceError

#: Free space the lab wants before it starts a build (packages, images, unpacked trees).
MIN_FREE_BYTES = 2 * 1024**3


def cache_root() -> Path:
    """The lab cache folder (``$XENPBR_LAB_CACHE`` or ``$XDG_CACHE_HOME/xenpbr-lab``)."""
    explicit = os.environ.get("XENPBR_LAB_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xenpbr-lab"


_held = threading.local()


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache's build lock (``<cache>/.lock``, an exclusive flock).

    Two builds at once (a lab session and a unit-test run, or two lab sessions) would
    unpack into the same temporary folder or prune an entry the other is writing. The
    lock is re-entrant within a thread, so ``build`` may call ``unpacked_sysroot``.
    """
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def artifacts_root() -> Path:
    """Per-run logs and failure evidence (``$XENPBR_LAB_ARTIFACTS`` or ./lab-artifacts)."""
    return Path(os.environ.get("XENPBR_LAB_ARTIFACTS", "lab-artifacts")).resolve()


def ensure_free_space(path: Path, need: int = MIN_FREE_BYTES) -> None:
    """Fail early, naming the folder, rather than half-writing an image."""
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < need:
        raise DiskSpaceError(
            f"only {free / 2**20:.0f} MiB free under {path}; the lab needs "
            f"{need / 2**20:.0f} MiB. Free space or point XENPBR_LAB_CACHE elsewhere"
        )


def digest(*parts: bytes | str) -> str:
    """A short stable hash of build inputs, used to name cache entries."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def tree_digest(root: Path, patterns: tuple[str, ...] = ("**/*",)) -> str:
    """Hash of the names and contents of the files under ``root`` (for source inputs)."""
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
    for path in files:
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
