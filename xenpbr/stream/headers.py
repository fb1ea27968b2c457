"""The four fixed headers of an ``xl save`` file, parsed and emitted.

* xl header: ``struct save_file_header`` and its optional data (``tools/xl/xl.h``,
  written by ``save_domain_core_writeconfig()`` in ``tools/xl/xl_saverestore.c``);
* libxl header: libxl-migration-stream.pandoc, "Header";
* libxc image header and domain header: libxc-migration-stream.pandoc, "Headers".

Fields that the spec fixes (magic, ident, marker, reserved) are checked, not
stored; everything else is stored so the emitter reproduces the input exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from construct import Struct

from xenpbr.stream import format as fmt
from xenpbr.stream.errors import StreamError
from xenpbr.stream.framing import Sink, Source


@dataclass(frozen=True, slots=True)
class XlHeader:
    """``xl`` save-file header; ``optional_data`` is kept raw for round-tripping."""

    mandatory_flags: int
    optional_flags: int
    optional_data: bytes

    @property
    def config_json(self) -> bytes | None:
        """The domain config blob (libxl JSON, NUL-terminated as xl writes it)."""
        if len(self.optional_data) < fmt.XL_CONFIG_LEN.sizeof():
            return None
        size = fmt.XL_CONFIG_LEN.parse(self.optional_data).config_len
        start = fmt.XL_CONFIG_LEN.sizeof()
        blob = self.optional_data[start:start + size]
        return blob if len(blob) == size else None

    @classmethod
    def for_config(cls, config_json: bytes) -> XlHeader:
        """Build the header ``xl save`` writes for a given config blob."""
        flags = fmt.XL_MANDATORY_FLAG_STREAMV2
        if config_json:
            flags |= fmt.XL_MANDATORY_FLAG_JSON
        optional = fmt.XL_CONFIG_LEN.build({"config_len": len(config_json)}) + config_json
        return cls(flags, 0, optional)


@dataclass(frozen=True, slots=True)
class LibxlHeader:
    """libxl stream header; ``options`` may carry the legacy-conversion bit."""

    version: int = fmt.LIBXL_VERSION
    options: int = 0


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """libxc image header (big-endian on the wire)."""

    version: int = 3
    options: int = 0


@dataclass(frozen=True, slots=True)
class DomainHeader:
    """libxc domain header."""

    guest_type: int
    xen_major: int
    xen_minor: int
    page_shift: int = fmt.PAGE_SHIFT

    @property
    def type_name(self) -> str:
        """E.g. ``"x86 PV"``."""
        return fmt.DHDR_TYPE_NAMES.get(self.guest_type, f"type {self.guest_type:#x}")


def _read_struct(src: Source, struct: Struct, what: str):
    offset = src.offset
    return offset, struct.parse(src.read_exact(struct.sizeof(), what))


# ---------------------------------------------------------------- xl header


def read_xl_header(src: Source, log: logging.Logger,
                   max_optional: int = fmt.XL_OPTIONAL_DATA_MAX) -> XlHeader:
    """Parse the xl header and its optional data (the domain config)."""
    what = "xl header"
    offset, raw = _read_struct(src, fmt.XL_HEADER, what)
    if raw.magic != fmt.XL_MAGIC:
        raise StreamError(f"bad magic {raw.magic!r}, expected {fmt.XL_MAGIC!r}; "
                          "not an 'xl save' file", offset=offset, record=what)
    if raw.byteorder != fmt.XL_BYTEORDER_VALUE:
        raise StreamError(f"byteorder marker {raw.byteorder:#010x}: saved on a "
                          "big-endian host, unsupported", offset=offset, record=what)
    _check_xl_flags(raw.mandatory_flags, offset)
    if raw.optional_data_len > max_optional:
        raise StreamError(f"optional data length {raw.optional_data_len} exceeds "
                          f"{max_optional}", offset=offset, record=what)
    optional = src.read_exact(raw.optional_data_len, "xl header optional data")
    hdr = XlHeader(raw.mandatory_flags, raw.optional_flags, optional)
    log.info("xl header: mandatory %#x optional %#x, %d bytes optional data",
             hdr.mandatory_flags, hdr.optional_flags, len(optional))
    return hdr


def _check_xl_flags(mandatory: int, offset: int) -> None:
    unknown = mandatory & ~fmt.XL_MANDATORY_FLAG_ALL
    if unknown:
        raise StreamError(f"unknown mandatory flags {unknown:#x}", offset=offset,
                          record="xl header")
    if not mandatory & fmt.XL_MANDATORY_FLAG_STREAMV2:
        raise StreamError("legacy (pre-v2) stream; only migration v2 is supported",
                          offset=offset, record="xl header")


def write_xl_header(sink: Sink, hdr: XlHeader) -> None:
    """Emit the xl header followed by its optional data."""
    sink.write(fmt.XL_HEADER.build({
        "magic": fmt.XL_MAGIC,
        "byteorder": fmt.XL_BYTEORDER_VALUE,
        "mandatory_flags": hdr.mandatory_flags,
        "optional_flags": hdr.optional_flags,
        "optional_data_len": len(hdr.optional_data),
    }))
    sink.write(hdr.optional_data)


# ------------------------------------------------------------- libxl header


def read_libxl_header(src: Source, log: logging.Logger) -> LibxlHeader:
    """Parse the libxl stream header."""
    what = "libxl header"
    offset, raw = _read_struct(src, fmt.LIBXL_HEADER, what)
    if raw.ident != fmt.LIBXL_IDENT:
        raise StreamError(f"bad ident {raw.ident:#018x}, expected {fmt.LIBXL_IDENT:#018x} "
                          "('LibxlFmt')", offset=offset, record=what)
    if raw.version != fmt.LIBXL_VERSION:
        raise StreamError(f"unsupported version {raw.version}, expected "
                          f"{fmt.LIBXL_VERSION}", offset=offset, record=what)
    if raw.options & fmt.LIBXL_OPT_RESERVED_MASK:
        raise StreamError(f"reserved option bits set: {raw.options:#x}",
                          offset=offset, record=what)
    if raw.options & fmt.LIBXL_OPT_BIG_ENDIAN:
        raise StreamError("big-endian stream, unsupported", offset=offset, record=what)
    log.info("libxl header: version %d, options %#x", raw.version, raw.options)
    return LibxlHeader(raw.version, raw.options)


def write_libxl_header(sink: Sink, hdr: LibxlHeader) -> None:
    """Emit the libxl stream header."""
    sink.write(fmt.LIBXL_HEADER.build({
        "ident": fmt.LIBXL_IDENT, "version": hdr.version, "options": hdr.options,
    }))


# ------------------------------------------------- libxc image/domain header


def read_image_header(src: Source, log: logging.Logger) -> ImageHeader:
    """Parse the libxc image header."""
    what = "libxc image header"
    offset, raw = _read_struct(src, fmt.IMAGE_HEADER, what)
    if raw.marker != fmt.IHDR_MARKER:
        raise StreamError(f"bad marker {raw.marker:#018x}: not a migration v2 image "
                          "(legacy format?)", offset=offset, record=what)
    if raw.id != fmt.IHDR_ID:
        raise StreamError(f"bad id {raw.id:#010x}, expected {fmt.IHDR_ID:#010x} ('XENF')",
                          offset=offset, record=what)
    if raw.version not in fmt.IHDR_VERSIONS:
        raise StreamError(f"unsupported version {raw.version}", offset=offset, record=what)
    if raw.options & fmt.IHDR_OPT_RESERVED_MASK or raw.reserved1 or raw.reserved2:
        raise StreamError("reserved bits set", offset=offset, record=what)
    if raw.options & fmt.IHDR_OPT_BIG_ENDIAN:
        raise StreamError("big-endian image, unsupported", offset=offset, record=what)
    log.info("libxc image header: version %d", raw.version)
    return ImageHeader(raw.version, raw.options)


def write_image_header(sink: Sink, hdr: ImageHeader) -> None:
    """Emit the libxc image header."""
    sink.write(fmt.IMAGE_HEADER.build({
        "marker": fmt.IHDR_MARKER, "id": fmt.IHDR_ID, "version": hdr.version,
        "options": hdr.options, "reserved1": 0, "reserved2": 0,
    }))


def read_domain_header(src: Source, log: logging.Logger) -> DomainHeader:
    """Parse the libxc domain header."""
    what = "libxc domain header"
    offset, raw = _read_struct(src, fmt.DOMAIN_HEADER, what)
    if raw.type not in fmt.DHDR_TYPE_NAMES:
        raise StreamError(f"unknown domain type {raw.type:#x}", offset=offset, record=what)
    if raw.page_shift != fmt.PAGE_SHIFT:
        raise StreamError(f"page_shift {raw.page_shift}, only {fmt.PAGE_SHIFT} supported",
                          offset=offset, record=what)
    if raw.reserved1:
        raise StreamError("reserved field set", offset=offset, record=what)
    hdr = DomainHeader(raw.type, raw.xen_major, raw.xen_minor, raw.page_shift)
    log.info("libxc domain header: %s, saved by Xen %d.%d", hdr.type_name,
             hdr.xen_major, hdr.xen_minor)
    return hdr


def write_domain_header(sink: Sink, hdr: DomainHeader) -> None:
    """Emit the libxc domain header."""
    sink.write(fmt.DOMAIN_HEADER.build({
        "type": hdr.guest_type, "page_shift": hdr.page_shift, "reserved1": 0,
        "xen_major": hdr.xen_major, "xen_minor": hdr.xen_minor,
    }))
