"""Exceptions of the restartable-image store, capture and restore.

The hierarchy lets the recovery code react by kind: an :class:`ImageInvalid` image is
skipped (fall back to an earlier one), :class:`QuotaExceeded` refuses a capture,
:class:`CaptureFailed` / :class:`RestoreFailed` carry what ``xl`` said, and the hot
stream's warm-up stops with :class:`NoRoom` or :class:`Cancelled`. Messages name the
object (domain, image, page, pack, offset) and say what an operator can do.
"""

from __future__ import annotations

from xenpbr.errors import XenpbrError


class ImageError(XenpbrError):
    """Base class of every image-store error."""


class InvalidName(ImageError):
    """A domain name, phase name or image id is not usable as a store key."""


class ImageNotFound(ImageError):
    """No image with that id exists for that domain."""


class ImageInvalid(ImageError):
    """A stored image cannot be used: it failed verification or lacks a page.

    Never restore such an image; fall back to an earlier one or a normal reboot.
    """


class CorruptObject(ImageInvalid):
    """A stored object (page, manifest, pack index) does not match its checksum."""


class MissingObject(ImageInvalid):
    """A page an image references is not in the store (lost pack or index)."""


class QuotaExceeded(ImageError):
    """Storing this capture would take the domain past its quota; nothing was published."""


class StoreBusy(ImageError):
    """The store lock is held by another operation (a capture or restore blocks GC)."""


class GcRefused(ImageError):
    """GC will not sweep while some manifest is unreadable: its pages might be needed."""


class CaptureFailed(ImageError):
    """``xl save`` failed, timed out, or produced a stream we reject."""


class LiveCaptureUnsupported(CaptureFailed):
    """Xen cannot copy this guest's memory while it runs (no log-dirty mode for PV guests
    without shadow paging); the guest was never suspended and nothing was stored."""


class RestoreFailed(ImageError):
    """``xl restore`` failed or timed out; any partial domain was destroyed."""


class NoRoom(ImageError):
    """Writing a hot stream would leave too little space for the store and xenpbrd's state."""


class Cancelled(ImageError):
    """A hot stream's warm-up was called off (the domain crashed: its recovery needs the CPU)."""
