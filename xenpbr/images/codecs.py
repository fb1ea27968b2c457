"""Per-page compression codecs, identified by the codec byte of each pack record.

The byte lives in every record (see ``docs/images.md``), so packs written with
different settings coexist and a store can switch codec at any time: readers look the
codec up per record. Only codecs from the standard library are registered; lz4/zstd
can be added under new ids without touching the pack format. A page is stored raw
(codec 0) whenever compressing it would not make it smaller.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from xenpbr.images.errors import ImageError


@dataclass(frozen=True, slots=True)
class PageCodec:
    """How to encode and decode one page; ``ident`` is the on-disk codec byte."""

    ident: int
    name: str
    encode: Callable[[bytes], bytes]
    decode: Callable[[bytes], bytes]


def _identity(data: bytes) -> bytes:
    return data


def _zlib_encode(data: bytes) -> bytes:
    return zlib.compress(data, 1)  # level 1: dom0 under TCG is slow, pages are small


NONE = PageCodec(0, "none", _identity, _identity)
ZLIB = PageCodec(1, "zlib", _zlib_encode, zlib.decompress)

BY_ID: dict[int, PageCodec] = {c.ident: c for c in (NONE, ZLIB)}
BY_NAME: dict[str, PageCodec] = {c.name: c for c in (NONE, ZLIB)}


def by_name(name: str) -> PageCodec:
    """The codec called ``name`` (``"none"`` or ``"zlib"``)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ImageError(f"unknown page codec {name!r}; known: {sorted(BY_NAME)}") from None
