"""libxl record bodies: parse and emit, one pair per record type.

Implements the "Records" chapter of ``libxl-migration-stream.pandoc``
(Revision 2, Xen RELEASE-4.17.7) with the layouts of
``tools/libs/light/libxl_sr_stream_format.h``. :data:`CODECS` is the registry.

LIBXC_CONTEXT has an empty body: it announces that a complete libxc image
follows *after* the record (the saver cannot know its length in advance). Its
codec therefore reads/writes that nested image through the context's
``read_libxc``/``write_libxc`` hooks, after the (empty) record itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from xenpbr.stream import format as fmt
from xenpbr.stream.codec import EMPTY, Codec, ReadContext, Record, WriteContext
from xenpbr.stream.framing import BodyReader, write_record

if TYPE_CHECKING:
    from xenpbr.stream.model import LibxcImage

_EMULATOR_IDS = (fmt.EMULATOR_UNKNOWN, fmt.EMULATOR_QEMU_TRADITIONAL, fmt.EMULATOR_QEMU_UPSTREAM)


@dataclass(slots=True)
class LibxcContextRecord:
    """LIBXC_CONTEXT marker plus the libxc image that follows it in the stream."""

    image: LibxcImage
    rtype: ClassVar[int] = fmt.LIBXL_REC_LIBXC_CONTEXT


def parse_libxc_context(body: BodyReader, ctx: ReadContext[LibxcImage]) -> LibxcContextRecord:
    """Check the empty body, then read the nested libxc image.

    Safe to read past the record here: a zero-length body has no padding, so
    the framing layer has nothing left to consume for this record.
    """
    if body.length:
        raise body.error("LIBXC_CONTEXT must have an empty body")
    if ctx.read_libxc is None:
        raise RuntimeError("ReadContext.read_libxc not set")
    return LibxcContextRecord(ctx.read_libxc())


def emit_libxc_context(rec: Record, ctx: WriteContext[LibxcImage]) -> None:
    """Emit the empty LIBXC_CONTEXT record followed by the libxc image."""
    assert isinstance(rec, LibxcContextRecord)
    if ctx.write_libxc is None:
        raise RuntimeError("WriteContext.write_libxc not set")
    write_record(ctx.sink, rec.rtype, 0, ())
    ctx.write_libxc(rec.image)


@dataclass(frozen=True, slots=True)
class EmulatorRecord:
    """EMULATOR_XENSTORE_DATA / EMULATOR_CONTEXT (HVM only): emulator blob."""

    rtype: int
    emulator_id: int
    index: int
    data: bytes


def parse_emulator(body: BodyReader, ctx: ReadContext) -> EmulatorRecord:
    """Parse an emulator record (common sub-header + opaque data)."""
    hdr_size = fmt.EMULATOR_HEADER.sizeof()
    if body.length < hdr_size:
        raise body.error(f"length must be at least {hdr_size}")
    hdr = fmt.EMULATOR_HEADER.parse(body.read(hdr_size, "emulator header"))
    if hdr.id not in _EMULATOR_IDS:
        raise body.error(f"unknown emulator id {hdr.id:#x}")
    return EmulatorRecord(body.frame.rtype, hdr.id, hdr.index, body.read_rest())


def emit_emulator(rec: Record, ctx: WriteContext) -> None:
    """Emit an emulator record."""
    assert isinstance(rec, EmulatorRecord)
    hdr = fmt.EMULATOR_HEADER.build({"id": rec.emulator_id, "index": rec.index})
    write_record(ctx.sink, rec.rtype, len(hdr) + len(rec.data), (hdr, rec.data))


@dataclass(frozen=True, slots=True)
class CheckpointStateRecord:
    """CHECKPOINT_STATE (COLO back channel): a control id."""

    control_id: int
    rtype: ClassVar[int] = fmt.LIBXL_REC_CHECKPOINT_STATE


def parse_checkpoint_state(body: BodyReader, ctx: ReadContext) -> CheckpointStateRecord:
    """Parse CHECKPOINT_STATE (libxl writes ``sizeof(uint32_t)`` = 4 bytes)."""
    size = fmt.CHECKPOINT_STATE.sizeof()
    if body.length != size:
        raise body.error(f"length must be exactly {size}")
    return CheckpointStateRecord(fmt.CHECKPOINT_STATE.parse(body.read_rest()).control_id)


def emit_checkpoint_state(rec: Record, ctx: WriteContext) -> None:
    """Emit CHECKPOINT_STATE."""
    assert isinstance(rec, CheckpointStateRecord)
    body = fmt.CHECKPOINT_STATE.build({"control_id": rec.control_id})
    write_record(ctx.sink, rec.rtype, len(body), (body,))


_EMULATOR = Codec(parse_emulator, emit_emulator)

CODECS: dict[int, Codec] = {
    fmt.LIBXL_REC_END: EMPTY,
    fmt.LIBXL_REC_LIBXC_CONTEXT: Codec(parse_libxc_context, emit_libxc_context),
    fmt.LIBXL_REC_EMULATOR_XENSTORE_DATA: _EMULATOR,
    fmt.LIBXL_REC_EMULATOR_CONTEXT: _EMULATOR,
    fmt.LIBXL_REC_CHECKPOINT_END: EMPTY,
    fmt.LIBXL_REC_CHECKPOINT_STATE: Codec(parse_checkpoint_state, emit_checkpoint_state),
}
"""Registry: libxl record type -> (parse, emit)."""
