"""Synthetic ``xl save`` streams for the stream-codec tests.

Deliberately independent of ``xenpbr.stream``: layouts are re-derived here
with :mod:`struct` from the Xen 4.17 specs (docs/specs/*-migration-stream.pandoc,
tools/xl/xl.h), so a shared mistake between codec and tests is less likely, and
Xen's own ``verify-stream-v2`` checks what we produce.

The PV layout mirrors what Xen 4.17's ``xg_sr_save.c`` + ``xg_sr_save_x86_pv.c``
emit for a non-live ``xl save``: X86_PV_INFO, X86_CPUID_POLICY, X86_MSR_POLICY,
STATIC_DATA_END, X86_PV_P2M_FRAMES, PAGE_DATA batches of up to 1024 pfns in pfn
order, X86_TSC_INFO, SHARED_INFO, then per online vCPU BASIC, EXTENDED, XSAVE,
MSRS, then END; wrapped in libxl header, LIBXC_CONTEXT, ..., libxl END.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

PAGE = 4096
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"

# libxc record types (libxc-migration-stream.pandoc)
END, PAGE_DATA, PV_INFO, P2M_FRAMES = 0x0, 0x1, 0x2, 0x3
VCPU_BASIC, VCPU_EXTENDED, VCPU_XSAVE, SHARED_INFO, TSC_INFO = 0x4, 0x5, 0x6, 0x7, 0x8
VCPU_MSRS, STATIC_DATA_END, CPUID_POLICY, MSR_POLICY = 0xC, 0x10, 0x11, 0x12
# libxl record types (libxl-migration-stream.pandoc)
LIBXL_END, LIBXC_CONTEXT, EMU_XENSTORE, EMU_CONTEXT = 0x0, 0x1, 0x2, 0x3

NOTAB, L1, L2, L3, L4, PIN = 0x0, 0x1, 0x2, 0x3, 0x4, 0x8
BROKEN, XALLOC, XTAB = 0xD, 0xE, 0xF

CONFIG_JSON = (b'{\n    "c_info": {\n        "type": "pv",\n        "name": "pbr-guest",\n'
               b'        "uuid": "6a1f2c3e-0d4b-4e5f-9a8b-7c6d5e4f3a2b"\n    },\n'
               b'    "b_info": {\n        "max_vcpus": 2,\n        "max_memkb": 6144,\n'
               b'        "type.pv": {\n            "kernel": "/boot/vmlinuz"\n        }\n'
               b'    }\n}\n\0')


def pad8(n: int) -> int:
    return (n + 7) & ~7


def record(rtype: int, *body_parts: bytes) -> bytes:
    """Record header + body + zero padding, as write_split_record() does."""
    body = b"".join(body_parts)
    return struct.pack("<II", rtype, len(body)) + body + bytes(pad8(len(body)) - len(body))


def xl_header(config: bytes = CONFIG_JSON) -> bytes:
    """save_domain_core_writeconfig(): header, then u32 config_len + config."""
    optional = struct.pack("<I", len(config)) + config
    mandatory = 0x2 | (0x1 if config else 0)  # STREAMv2 | JSON
    return XL_MAGIC + struct.pack("<IIII", 0x01020304, mandatory, 0, len(optional)) + optional


def libxl_header() -> bytes:
    return struct.pack(">QII", 0x4C6962786C466D74, 2, 0)


def image_header(version: int = 3) -> bytes:
    return struct.pack(">QIIHHI", 0xFFFFFFFFFFFFFFFF, 0x58454E46, version, 0, 0, 0)


def domain_header(gtype: int = 1, major: int = 4, minor: int = 17) -> bytes:
    return struct.pack("<IHHII", gtype, 12, 0, major, minor)


def page_content(pfn: int) -> bytes:
    """Deterministic contents; every 5th pfn is an all-zero page."""
    if pfn % 5 == 3:
        return bytes(PAGE)
    return hashlib.sha256(pfn.to_bytes(8, "little")).digest() * (PAGE // 32)


def dirtied(pfn: int, n: int) -> bytes:
    """Page ``pfn`` as the guest left it after live pass ``n`` (differs from each earlier)."""
    return hashlib.sha256(b"dirty %d %d" % (pfn, n)).digest() * (PAGE // 32)


def has_data(page_type: int) -> bool:
    return page_type not in (BROKEN, XALLOC, XTAB)


def pv_page_type(pfn: int, nr_pfns: int) -> int:
    """A plausible x86-64 PV type map: one pinned L4, some L3/L2/L1 tables,
    a run of ballooned (XTAB) pfns near the top, one BROKEN, one XALLOC."""
    if pfn == 100:
        return L4 | PIN
    if 101 <= pfn <= 102:
        return L3
    if 103 <= pfn <= 106:
        return L2
    if 107 <= pfn <= 130:
        return L1
    if nr_pfns - 40 <= pfn < nr_pfns - 30:
        return XTAB
    if pfn == 777:
        return BROKEN
    if pfn == 778:
        return XALLOC
    return NOTAB


def page_data_record(entries: list[tuple[int, int]],
                     content: Callable[[int], bytes] = page_content) -> Iterator[bytes]:
    """One PAGE_DATA record, yielded in pieces (header+pfns, then each page)."""
    nr_data = sum(has_data(t) for _, t in entries)
    length = 8 + 8 * len(entries) + PAGE * nr_data
    words = [(t << 60) | pfn for pfn, t in entries]
    yield struct.pack("<II", PAGE_DATA, length) + struct.pack("<II", len(entries), 0) \
        + struct.pack(f"<{len(words)}Q", *words)
    for pfn, t in entries:
        if has_data(t):
            yield content(pfn)


@dataclass
class Layout:
    """Where things are in a synthetic stream (for error-injection tests)."""

    offsets: list[tuple[str, int, int]] = field(default_factory=list)  # (family, type, offset)

    def first(self, family: str, rtype: int) -> int:
        return next(off for fam, t, off in self.offsets if fam == family and t == rtype)


@dataclass
class PvStreamSpec:
    """Knobs for :func:`iter_pv_stream`."""

    nr_pfns: int = 1500
    batch: int = 1024  # MAX_BATCH_SIZE in xg_save_restore.h
    nr_vcpus: int = 2
    with_xl: bool = True
    with_libxl: bool = True
    page_type: Callable[[int, int], int] = pv_page_type
    content: Callable[[int], bytes] = page_content
    extra_libxc: list[bytes] = field(default_factory=list)  # raw records before END
    extra_libxl: list[bytes] = field(default_factory=list)  # raw records before END
    # a live migration's later passes: the pfns the guest dirtied during each pass, sent
    # again (new contents) after the full first pass, as send_memory_live does
    dirty_passes: list[list[int]] = field(default_factory=list)


def cpuid_policy() -> bytes:
    leaves = [(0x0, 0xFFFFFFFF, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
              (0x1, 0xFFFFFFFF, 0x000906EA, 0x00010800, 0xF6FA3203, 0x178BFBFF),
              (0x7, 0x0, 0x0, 0x009C6FBB, 0x0, 0x9C000400),
              (0xD, 0x1, 0xF, 0x0, 0x0, 0x0),
              (0x80000000, 0xFFFFFFFF, 0x80000008, 0x0, 0x0, 0x0)]
    return b"".join(struct.pack("<6I", *leaf) for leaf in leaves)


def msr_policy() -> bytes:
    return struct.pack("<IIQ", 0xCE, 0, 0x80000000) + struct.pack("<IIQ", 0x10A, 0, 0x0)


def vcpu_records(vcpu: int) -> list[bytes]:
    hdr = struct.pack("<II", vcpu, 0)
    fill = bytes([0x40 + vcpu])
    return [record(VCPU_BASIC, hdr, fill * 5168),  # illustrative x86_64 context size
            record(VCPU_EXTENDED, hdr, fill * 100),  # odd size: exercises padding
            record(VCPU_XSAVE, hdr, fill * 836),
            record(VCPU_MSRS, hdr, struct.pack("<IIQ", 0xC0000103, 0, vcpu))]


def iter_pv_stream(spec: PvStreamSpec, layout: Layout | None = None) -> Iterator[bytes]:
    """Yield the stream in chunks (never more than one page or record at once)."""
    layout = layout if layout is not None else Layout()
    pos = 0

    def emit(chunk: bytes, family: str | None = None) -> bytes:
        nonlocal pos
        if family is not None:
            layout.offsets.append((family, struct.unpack_from("<I", chunk)[0], pos))
        pos += len(chunk)
        return chunk

    if spec.with_xl:
        yield emit(xl_header())
    if spec.with_libxl:
        yield emit(libxl_header())
        yield emit(record(LIBXC_CONTEXT), "libxl")
    yield emit(image_header())
    yield emit(domain_header())
    for rec in static_records():
        yield emit(rec, "libxc")
    frames = (spec.nr_pfns - 1) // 512 + 1
    yield emit(record(P2M_FRAMES, struct.pack("<II", 0, spec.nr_pfns - 1),
                      struct.pack(f"<{frames}Q", *range(spec.nr_pfns - frames, spec.nr_pfns))),
               "libxc")
    for start in range(0, spec.nr_pfns, spec.batch):
        entries = [(pfn, spec.page_type(pfn, spec.nr_pfns))
                   for pfn in range(start, min(start + spec.batch, spec.nr_pfns))]
        for i, chunk in enumerate(page_data_record(entries, spec.content)):
            yield emit(chunk, "libxc" if i == 0 else None)
    for n, dirty in enumerate(spec.dirty_passes, 1):
        entries = [(pfn, spec.page_type(pfn, spec.nr_pfns)) for pfn in dirty]
        for i, chunk in enumerate(page_data_record(entries, lambda pfn: dirtied(pfn, n))):
            yield emit(chunk, "libxc" if i == 0 else None)
    for rec in tail_records(spec.nr_vcpus) + spec.extra_libxc + [record(END)]:
        yield emit(rec, "libxc")
    if spec.with_libxl:
        for rec in spec.extra_libxl + [record(LIBXL_END)]:
            yield emit(rec, "libxl")


def static_records() -> list[bytes]:
    return [record(PV_INFO, struct.pack("<BBHI", 8, 4, 0, 0)),
            record(CPUID_POLICY, cpuid_policy()),
            record(MSR_POLICY, msr_policy()),
            record(STATIC_DATA_END)]


def tail_records(nr_vcpus: int) -> list[bytes]:
    recs = [record(TSC_INFO, struct.pack("<IIQII", 0, 2_494_000, 123_456_789_012, 1, 0)),
            record(SHARED_INFO, bytes(range(256)) * 16)]
    for vcpu in range(nr_vcpus):
        recs += vcpu_records(vcpu)
    return recs


def build_pv_stream(spec: PvStreamSpec | None = None) -> tuple[bytes, Layout]:
    """The whole stream as bytes, plus where its records start."""
    layout = Layout()
    data = b"".join(iter_pv_stream(spec or PvStreamSpec(), layout))
    return data, layout


class ChunkReader:
    """A read-only, non-seekable file object over an iterator of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")
        self.max_chunk = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args: object) -> int:
        raise OSError("not seekable")

    def tell(self) -> int:
        raise OSError("not seekable")

    def read(self, n: int = -1) -> bytes:
        while not self._pending:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                return b""
            self.max_chunk = max(self.max_chunk, len(chunk))
            self._pending = memoryview(chunk)
        n = len(self._pending) if n < 0 else n
        out, self._pending = self._pending[:n], self._pending[n:]
        return bytes(out)
