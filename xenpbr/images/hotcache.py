"""A ready-made stream of each domain's newest image, for ``xl restore FILE``.

Why: restoring regenerates the ``xl save`` stream from the page store into a FIFO that
xl reads. Every pass over the data costs (pack read, SHA-256 per page, the pipe copy):
in the lab that stream ran at 26 MiB/s, most of a phase-based recovery, while xl reads a
plain file at several times that (docs/benchmarks). A crash wants the newest image,
the deepest phase, and it is known long before the crash. So after each capture xenpbrd
regenerates that image's stream once, in the background, into

    <store>/hot/<domain>/<image_id>.stream

and a restore of that image hands xl the file. Costs: one raw image of space per domain
(a cache: not charged to the quota, rebuilt after each capture, dropped with its image
and by GC), and a background pass after each capture.

Trust: the file is written from pages verified against their SHA-256 as they are read,
fsync'd, and renamed into place only when complete, so it is either whole or absent.
A restore from it checks its size against the manifest but does not re-hash every page
(as ``xl restore`` of a save file does not). ``xenpbr_hot_stream = 0`` in a domain's
config (or ``[hot-stream] enabled = no`` in /etc/xenpbr/xenpbr.conf, ``XENPBR_HOT_CACHE=0``,
for the whole xenpbrd) restores that domain every time from verified pages instead.
``[hot-stream] dir`` (``XENPBR_HOT_STREAM_DIR``) puts the streams on another file system
than the store (docs/settings.md).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from xenpbr import settings
from xenpbr.fsutil import fsync_dir
from xenpbr.images.image import Image, check_image_id, check_name

if TYPE_CHECKING:
    from xenpbr.images.store import ImageStore

_LOG = logging.getLogger(__name__)
SUFFIX = ".stream"
ENV = "XENPBR_HOT_CACHE"


def enabled() -> bool:
    """False if the operator turned the cache off (``[hot-stream] enabled = no`` or
    ``XENPBR_HOT_CACHE=0``)."""
    return settings.current().hot_stream


def hot_root(store: ImageStore) -> Path:
    """The folder of all hot streams: ``[hot-stream] dir``, else ``<store>/hot``."""
    return settings.current().hot_root(store.root)


def domain_dir(store: ImageStore, domain: str) -> Path:
    return hot_root(store) / check_name(domain, "domain")


def path_of(store: ImageStore, domain: str, image_id: str) -> Path:
    return domain_dir(store, domain) / f"{check_image_id(image_id)}{SUFFIX}"


def lookup(store: ImageStore, image: Image) -> Path | None:
    """The ready stream of ``image``, or None (never built, replaced, or incomplete)."""
    path = path_of(store, image.meta.domain, image.meta.image_id)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size != image.meta.stream_bytes:
        _LOG.warning("hot stream %s has %d bytes, the image %d: not used, removed", path,
                     size, image.meta.stream_bytes)
        path.unlink(missing_ok=True)
        return None
    return path


class Cancelled(Exception):
    """The warm-up was called off (the domain crashed: its recovery needs the CPU)."""


class _CancellableFile:
    """A file whose writes raise :class:`Cancelled` once ``cancel`` is set."""

    def __init__(self, f: BinaryIO, cancel: threading.Event | None) -> None:
        self.f, self.cancel = f, cancel

    def write(self, data: Any) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("warm-up cancelled")
        return self.f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)


def warm(store: ImageStore, domain: str, image_id: str,
         cancel: threading.Event | None = None) -> Path | None:
    """Regenerate ``image_id``'s stream into the cache, dropping the domain's other
    streams first. Returns None (and writes nothing) if it is not, or stops being, the
    domain's newest image: only that one is worth the space.
    :raises Cancelled: ``cancel`` was set. :raises NoRoom: not enough space."""
    image = store.load(domain, image_id)
    if not _is_newest(store, domain, image_id):
        return None
    dest = path_of(store, domain, image_id)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # an older image's stream is worth less than this one's: free its room first (at
    # 512 MiB in the lab, keeping it until the new one was written left no room for it)
    drop(store, domain, keep=image_id)
    _check_room(dest.parent, image.meta.stream_bytes)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    start = time.monotonic()
    try:
        with open(tmp, "wb") as out:
            written = store.regenerate(image, _CancellableFile(out, cancel))  # type: ignore[arg-type]
            out.flush()
            os.fsync(out.fileno())
        if not _is_newest(store, domain, image_id):
            tmp.unlink()
            return None
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _LOG.info("hot stream of %s/%s ready: %d bytes in %.2f s", domain, image_id, written,
              time.monotonic() - start)
    return dest


def _is_newest(store: ImageStore, domain: str, image_id: str) -> bool:
    newest = store.images(domain)
    return bool(newest) and newest[-1].image_id == image_id


class NoRoom(Exception):
    """Writing the stream would leave too little space for the store and xenpbrd's state."""


#: What a hot stream must leave free: the state directory, the next capture's pages and
#: the daemon's log live on the same file system (a recovery that could not write its
#: intent record once failed outright in the lab).
RESERVE_FRACTION = 0.10
RESERVE_MIN = 128 << 20


def _check_room(folder: Path, size: int) -> None:
    usage = shutil.disk_usage(folder)
    reserve = max(RESERVE_MIN, int(usage.total * RESERVE_FRACTION))
    if usage.free - size < reserve:
        raise NoRoom(f"a hot stream of {size >> 20} MiB would leave {max(usage.free - size, 0) >> 20} "
                     f"MiB free in {folder}, less than the {reserve >> 20} MiB kept for the "
                     "store and xenpbrd's state; restores use the page store (free space, "
                     f"or move the streams with {settings.hint('hot_stream_dir')})")


def drop(store: ImageStore, domain: str, image_id: str | None = None,
         keep: str | None = None) -> None:
    """Remove the domain's hot streams: one (``image_id``), or all but ``keep``."""
    folder = domain_dir(store, domain)
    if not folder.is_dir():
        return
    for path in folder.glob(f"*{SUFFIX}"):
        name = path.name[:-len(SUFFIX)]
        if (image_id is None or name == image_id) and name != keep:
            path.unlink(missing_ok=True)


def orphans(store: ImageStore) -> list[Path]:
    """Hot streams (and leftovers of interrupted writes) whose image is gone."""
    root = hot_root(store)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            name = path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else ""
            if not name or not store.manifest_path(folder.name, name).exists():
                found.append(path)
    return found
