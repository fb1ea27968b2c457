"""Framing of the lab's control channel (host <-> dom0 over virtio-serial).

A frame is ``MAGIC | u32 header length | u32 payload length | JSON header | payload``,
all big-endian. The JSON header carries the request id and the operation; the payload
carries raw bytes (file contents, stdin) so nothing is base64-inflated. The magic lets a
reader resynchronise if the other side vanished mid-frame. Standard library only: this
module runs in dom0 too.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Callable

MAGIC = b"XPBR"
_PREFIX = struct.Struct(">4sII")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 30


class FrameError(Exception):
    """A frame that is too big or not JSON: the peer is broken, not merely slow."""


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One frame as bytes."""
    head = json.dumps(header, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise FrameError(f"frame too large: header {len(head)} B, payload {len(payload)} B")
    return _PREFIX.pack(MAGIC, len(head), len(payload)) + head + payload


class FrameReader:
    """Reassemble frames from a byte stream delivered by ``read(n)`` (b"" means EOF)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._buf = bytearray()
        self.resyncs = 0

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = self._read(max(65536, n - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def next_frame(self) -> tuple[dict[str, Any], bytes] | None:
        """The next frame, or None at end of stream."""
        while True:
            if not self._fill(_PREFIX.size):
                return None
            magic, hlen, plen = _PREFIX.unpack_from(self._buf)
            if magic != MAGIC:
                idx = self._buf.find(MAGIC, 1)
                del self._buf[: idx if idx > 0 else max(1, len(self._buf) - 3)]
                self.resyncs += 1
                continue
            if hlen > MAX_HEADER or plen > MAX_PAYLOAD:
                raise FrameError(f"frame announces header {hlen} B / payload {plen} B")
            total = _PREFIX.size + hlen + plen
            if not self._fill(total):
                return None
            head = bytes(self._buf[_PREFIX.size:_PREFIX.size + hlen])
            payload = bytes(self._buf[_PREFIX.size + hlen:total])
            del self._buf[:total]
            try:
                return json.loads(head), payload
            except ValueError as exc:
                raise FrameError(f"frame header is not JSON: {exc}") from exc
