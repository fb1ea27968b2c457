"""Manifest files: one per image, self-verifying, written atomically.

Layout (version 1, little-endian; see ``docs/images.md``)::

    header   8s magic "XPBRIMG\\n", u32 version, u32 reserved,
             u64 meta_len, u64 skeleton_len, u64 nhashes, u64 nrefs       (48 bytes)
    meta     meta_len bytes of UTF-8 JSON      (ImageMeta.to_json())
    skeleton skeleton_len bytes of UTF-8 JSON  (see :mod:`.skeleton`)
    hashes   nhashes x 32-byte SHA-256, distinct non-zero pages, first-use order
    refs     nrefs x u32: index into hashes, 0xFFFFFFFF = all-zero page, stream order
    checksum SHA-256 of everything above                                  (32 bytes)

Binary hash/ref tables keep a 128 MiB guest's manifest near 1 MiB (JSON hex would
triple it) and load with one ``frombytes``. The checksum is verified before any
section is interpreted; the sections are then parsed as data only (JSON, the codec's
record parsers), never executed.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from array import array
from dataclasses import dataclass

from xenpbr.images import skeleton
from xenpbr.images.errors import CorruptObject, InvalidName
from xenpbr.images.image import ZERO_REF, Image, ImageMeta, meta_from_json

MAGIC = b"XPBRIMG\n"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQQ")
DIGEST = 32
SUFFIX = ".manifest"


@dataclass
class ManifestParts:
    """The raw sections of a verified manifest (before the skeleton is decoded)."""

    meta: ImageMeta
    skeleton: bytes
    hashes: list[bytes]
    refs: array


def encode(meta: ImageMeta, skeleton_json: bytes, hashes: list[bytes], refs: array) -> bytes:
    """Serialise an image's manifest (checksum appended)."""
    meta_json = json.dumps(meta.to_json(), sort_keys=True, separators=(",", ":")).encode()
    refs_le = array("I", refs)
    if sys.byteorder != "little":
        refs_le.byteswap()
    body = b"".join([HEADER.pack(MAGIC, VERSION, 0, len(meta_json), len(skeleton_json),
                                 len(hashes), len(refs)),
                     meta_json, skeleton_json, b"".join(hashes), refs_le.tobytes()])
    return body + hashlib.sha256(body).digest()


def decode_parts(data: bytes, where: str) -> ManifestParts:
    """Verify the checksum and split the sections.

    :param where: ``domain/image_id`` for error messages.
    :raises CorruptObject: checksum, header or section mismatch.
    """
    def bad(reason: str) -> CorruptObject:
        return CorruptObject(f"manifest of image {where} is corrupt: {reason}; the image "
                             "cannot be used (delete it, then run gc)")

    if len(data) < HEADER.size + DIGEST:
        raise bad(f"only {len(data)} bytes")
    body, checksum = memoryview(data)[:-DIGEST], data[-DIGEST:]
    if hashlib.sha256(body).digest() != checksum:
        raise bad("SHA-256 checksum mismatch")
    magic, version, _, meta_len, skel_len, nhashes, nrefs = HEADER.unpack_from(body)
    if magic != MAGIC or version != VERSION:
        raise bad(f"unsupported format (magic {magic!r}, version {version})")
    if len(body) != HEADER.size + meta_len + skel_len + nhashes * DIGEST + nrefs * 4:
        raise bad("section lengths do not add up")
    pos = HEADER.size
    meta_raw = bytes(body[pos:pos + meta_len])
    pos += meta_len
    skel = bytes(body[pos:pos + skel_len])
    pos += skel_len
    table = bytes(body[pos:pos + nhashes * DIGEST])
    pos += nhashes * DIGEST
    refs = array("I")
    refs.frombytes(body[pos:pos + nrefs * 4])
    if sys.byteorder != "little":
        refs.byteswap()
    try:
        meta = meta_from_json(json.loads(meta_raw), len(data))
    except (ValueError, TypeError, InvalidName) as err:
        raise bad(f"metadata: {err}") from err
    hashes = [table[i:i + DIGEST] for i in range(0, len(table), DIGEST)]
    _check_refs(refs, len(hashes), bad)
    return ManifestParts(meta, skel, hashes, refs)


def _check_refs(refs: array, nhashes: int, bad) -> None:
    highest = max((r for r in refs if r != ZERO_REF), default=-1)
    if highest >= nhashes:
        raise bad(f"page reference {highest} beyond the {nhashes} stored hashes")


def decode(data: bytes, where: str) -> Image:
    """Verify and fully decode a manifest into an :class:`Image`."""
    parts = decode_parts(data, where)
    stream = skeleton.decode(parts.skeleton)
    expected = skeleton.data_page_count(stream)
    if expected != len(parts.refs):
        raise CorruptObject(f"manifest of image {where} is inconsistent: the stream has "
                            f"{expected} data pages but {len(parts.refs)} page references")
    return Image(parts.meta, stream, parts.hashes, parts.refs)


def read_meta(data: bytes, where: str) -> ImageMeta:
    """Verify the checksum, return the metadata only (listing images)."""
    return decode_parts(data, where).meta
