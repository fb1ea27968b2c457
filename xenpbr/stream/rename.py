"""Give the domain in an ``xl save`` stream another name, as the stream flows.

``xl restore`` takes the domain's name from the libxl config xl embedded in the stream's
header, and offers no option to change it; a config file would replace the whole embedded
config, which is exactly the one the saved memory belongs to. A standby domain
(:mod:`xenpbr.images.standby`) must be restored beside the running guest under another
name, so :class:`RenamingSink` rewrites ``c_info.name`` in that config on its way into
xl and passes every other byte through untouched: the UUID, the devices and the memory
stay the saved ones (xl's own local migration runs its receiving domain under a
temporary name the same way, with the same UUID).

The header is small (a 48-byte struct and the config: kilobytes), so it is buffered
whole, rewritten, and the rest of the stream is written through as it comes.
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO

from xenpbr.stream import format as fmt
from xenpbr.stream.errors import StreamError
from xenpbr.stream.headers import XlHeader

_FIXED = fmt.XL_HEADER.sizeof()


def renamed_header(header: bytes, name: str) -> bytes:
    """The whole xl header ``header`` (struct and optional data) with the embedded
    config's ``c_info.name`` set to ``name``.

    :raises StreamError: not an xl header with a libxl JSON config naming a domain.
    """
    raw = fmt.XL_HEADER.parse(header[:_FIXED])
    old = XlHeader(raw.mandatory_flags, raw.optional_flags, header[_FIXED:])
    if raw.magic != fmt.XL_MAGIC:
        raise StreamError("cannot rename the domain: not an xl save stream",
                          record="xl header")
    check_renameable(old)
    blob = old.config_json
    config = _config(blob)
    config["c_info"]["name"] = name
    new_blob = json.dumps(config, indent=4).encode() + b"\0"  # NUL-terminated, as xl's
    assert blob is not None
    rest = old.optional_data[fmt.XL_CONFIG_LEN.sizeof() + len(blob):]
    optional = fmt.XL_CONFIG_LEN.build({"config_len": len(new_blob)}) + new_blob + rest
    return fmt.XL_HEADER.build({
        "magic": fmt.XL_MAGIC, "byteorder": raw.byteorder,
        "mandatory_flags": raw.mandatory_flags, "optional_flags": raw.optional_flags,
        "optional_data_len": len(optional)}) + optional


def check_renameable(header: XlHeader | None) -> None:
    """Raise :class:`StreamError` unless a stream with ``header`` can be renamed."""
    if header is None or not header.mandatory_flags & fmt.XL_MANDATORY_FLAG_JSON:
        raise StreamError("cannot rename the domain: the stream has no xl header with a "
                          "JSON domain config", record="xl header")
    _config(header.config_json)


def _config(blob: bytes | None) -> dict[str, Any]:
    try:
        config = json.loads((blob or b"").rstrip(b"\0"))
    except ValueError as exc:
        raise StreamError(f"cannot rename the domain: its embedded config is not JSON "
                          f"({exc})", record="xl header") from exc
    if not isinstance(config, dict) or not isinstance(config.get("c_info"), dict):
        raise StreamError("cannot rename the domain: its embedded config has no c_info",
                          record="xl header")
    return config


class RenamingSink:
    """A writable file that forwards a stream to ``sink`` with the domain renamed.

    Only ``write`` (and ``flush``) are used by the stream producers; everything before the
    end of the xl header is held back until the header is complete.
    """

    def __init__(self, sink: BinaryIO, name: str) -> None:
        self.sink, self.name = sink, name
        self._head = bytearray()
        self._passing = False
        self.written = 0  # bytes written to ``sink``

    def write(self, data: Any) -> int:
        if self._passing:
            self._emit(bytes(data))
            return len(data)
        self._head += data
        if len(self._head) < _FIXED:
            return len(data)
        end = _FIXED + fmt.XL_HEADER.parse(bytes(self._head[:_FIXED])).optional_data_len
        if end > _FIXED + fmt.XL_OPTIONAL_DATA_MAX:
            raise StreamError("cannot rename the domain: xl header optional data too long",
                              record="xl header")
        if len(self._head) >= end:
            self._emit(renamed_header(bytes(self._head[:end]), self.name))
            self._emit(bytes(self._head[end:]))
            self._head.clear()
            self._passing = True
        return len(data)

    def _emit(self, data: bytes) -> None:
        if data:
            self.sink.write(data)
            self.written += len(data)

    def flush(self) -> None:
        self.sink.flush()
