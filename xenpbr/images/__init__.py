"""Restartable images: a content-addressed page store, capture and restore through ``xl``.

* :class:`ImageStore` (:mod:`.store`): images per domain, quotas, GC, verification;
  pages live in a host-wide deduplicated pack store (:mod:`.pagestore`), everything
  else of the ``xl save`` stream in a checksummed manifest (:mod:`.manifest`,
  :mod:`.skeleton`).
* :func:`capture` (:mod:`.capture`): ``xl save -c`` into a FIFO, parsed into the store
  as it arrives.
* :func:`restore` (:mod:`.restore`): the stream regenerated (every page verified) into a
  FIFO that ``xl restore`` reads.

On-disk formats, integrity rules and the crash-safety argument: ``docs/images.md``.
"""

from xenpbr.images.capture import CaptureProgress, CaptureResult, capture
from xenpbr.images.errors import (
    CaptureFailed,
    CorruptObject,
    GcRefused,
    ImageError,
    ImageInvalid,
    ImageNotFound,
    InvalidName,
    MissingObject,
    QuotaExceeded,
    RestoreFailed,
    StoreBusy,
)
from xenpbr.images.garbage import GcReport
from xenpbr.images.image import Image, ImageEntry, ImageMeta
from xenpbr.images.restore import RestoreResult, restore
from xenpbr.images.store import DomainUsage, ImageStore
from xenpbr.images.writer import CaptureStats, CaptureWriter

__all__ = [
    "CaptureFailed", "CaptureProgress", "CaptureResult", "CaptureStats", "CaptureWriter", "CorruptObject",
    "DomainUsage", "GcRefused", "GcReport", "Image", "ImageEntry", "ImageError",
    "ImageInvalid", "ImageMeta", "ImageNotFound", "ImageStore", "InvalidName",
    "MissingObject", "QuotaExceeded", "RestoreFailed", "RestoreResult", "StoreBusy",
    "capture", "restore",
]
