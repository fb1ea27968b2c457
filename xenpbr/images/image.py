"""What an image is, as the rest of xenpbr sees it: metadata plus a loaded manifest.

:class:`ImageMeta` is cheap (what ``xenpbr images`` lists and the phase logic
compares); :class:`ImageEntry` is a listing's row (metadata, or why the manifest is
unusable); :class:`Image` adds the page-free stream model and the ordered page
references needed to regenerate the stream. Both come out of the store only after
the manifest's checksum was verified.
"""

from __future__ import annotations

import re
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

from xenpbr.images.errors import ImageInvalid, InvalidName
from xenpbr.stream.model import Stream

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
IMAGE_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{6}$")
ZERO_REF = 0xFFFFFFFF
MAX_FINGERPRINT = 4096


def check_name(value: str, what: str) -> str:
    """A domain or phase name safe as a path component and a log word.

    Domain names come from the operator's config; phase names come from the guest
    (untrusted): both are bounded and restricted to ``[A-Za-z0-9_.-]``.
    """
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidName(f"{what} {value!r} is not usable: use 1-64 letters, digits, "
                          "'_', '.', '-', starting with a letter or digit")
    return value


def check_image_id(value: str) -> str:
    """An image id as the store generates it (``20261123T201535.123456Z-3fa9c2``)."""
    if not isinstance(value, str) or not IMAGE_ID_RE.match(value):
        raise InvalidName(f"image id {value!r} is not one this store generates "
                          "(expected e.g. 20261123T201535.123456Z-3fa9c2)")
    return value


@dataclass(frozen=True)
class ImageMeta:
    """Metadata of one image; sizes in bytes.

    ``stream_bytes`` is the size of the ``xl save`` stream (raw); ``stored_page_bytes``
    what its distinct non-zero pages occupy in packs (record headers included) and
    ``manifest_bytes`` the manifest file: their sum is what the image costs alone.
    Pages shared with other images are stored once, so the store as a whole is smaller
    than the sum over images.
    """

    image_id: str
    domain: str
    phase: str
    seq: int
    created: float
    fingerprint: str
    xenpbr_version: str
    uuid: str | None
    stream_bytes: int
    pfns: int
    data_pages: int
    zero_pages: int
    distinct_pages: int
    stored_page_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    manifest_bytes: int = 0  # set when read from disk; not part of the manifest itself

    @property
    def created_iso(self) -> str:
        """Creation time, UTC, ISO 8601."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))

    @property
    def stored_bytes(self) -> int:
        """What this image alone costs on disk: its distinct pages plus its manifest."""
        return self.stored_page_bytes + self.manifest_bytes

    def to_json(self) -> dict[str, Any]:
        """The manifest's metadata section (``manifest_bytes`` excluded)."""
        out = asdict(self)
        del out["manifest_bytes"]
        return out


_META_TYPES: dict[str, tuple[type, ...]] = {
    "image_id": (str,), "domain": (str,), "phase": (str,), "seq": (int,),
    "created": (int, float), "fingerprint": (str,), "xenpbr_version": (str,),
    "uuid": (str, type(None)), "stream_bytes": (int,), "pfns": (int,), "data_pages": (int,),
    "zero_pages": (int,), "distinct_pages": (int,), "stored_page_bytes": (int,),
    "extra": (dict,),
}


def meta_from_json(obj: Any, manifest_bytes: int) -> ImageMeta:
    """Validate the metadata section field by field (it is data, never code)."""
    if not isinstance(obj, dict):
        raise TypeError("metadata is not a JSON object")
    values: dict[str, Any] = {}
    for key, kinds in _META_TYPES.items():
        value = obj.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise TypeError(f"metadata field {key!r} is missing or has type "
                             f"{type(value).__name__}")
        values[key] = value
    check_name(values["domain"], "domain")
    check_name(values["phase"], "phase")
    check_image_id(values["image_id"])
    return ImageMeta(**values, manifest_bytes=manifest_bytes)


@dataclass(frozen=True)
class ImageEntry:
    """One manifest found on disk: its metadata, or why it is unusable."""

    domain: str
    image_id: str
    meta: ImageMeta | None
    error: ImageInvalid | None

    @property
    def valid(self) -> bool:
        return self.error is None


@dataclass
class Image:
    """A verified manifest: metadata, stream model and page references.

    ``hashes`` are the distinct non-zero page digests in order of first use;
    ``refs`` has one entry per data-carrying page in stream order: an index into
    ``hashes`` or :data:`ZERO_REF`.
    """

    meta: ImageMeta
    stream: Stream
    hashes: list[bytes]
    refs: array

    @property
    def image_id(self) -> str:
        return self.meta.image_id

    @property
    def domain(self) -> str:
        return self.meta.domain

    def describe(self) -> str:
        """``domain/image_id (phase P)`` for messages."""
        return f"image {self.meta.domain}/{self.meta.image_id} (phase {self.meta.phase})"
