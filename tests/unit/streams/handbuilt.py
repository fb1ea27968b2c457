"""The default synthetic PV stream, assembled from xenpbr.stream's public dataclasses.

Used to check that the writer accepts a model built by hand (as the restore
path will, from stored metadata) and that Xen's verifier accepts the result.
"""

from __future__ import annotations

import struct

from tests.unit.streams import synth
from xenpbr.stream import (
    CpuidLeaf,
    EmptyRecord,
    LibxcContextRecord,
    LibxcImage,
    LibxlStream,
    MsrEntry,
    PageDataRecord,
    SharedInfoRecord,
    Stream,
    X86CpuidPolicyRecord,
    X86MsrPolicyRecord,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuRecord,
    X86TscInfoRecord,
    XlHeader,
)
from xenpbr.stream import format as fmt
from xenpbr.stream.headers import DomainHeader, ImageHeader, LibxlHeader


def build_model_by_hand() -> tuple[Stream, dict[int, bytes]]:
    """The default synthetic stream, assembled from the public dataclasses."""
    nr = 1500
    contents = {p: synth.page_content(p) for p in range(nr)}
    batches = [PageDataRecord.from_pages((p, synth.pv_page_type(p, nr))
                                         for p in range(s, min(s + 1024, nr)))
               for s in range(0, nr, 1024)]
    vcpus = []
    for v in range(2):
        fill = bytes([0x40 + v])
        vcpus += [X86PvVcpuRecord(fmt.REC_X86_PV_VCPU_BASIC, v, fill * 5168),
                  X86PvVcpuRecord(fmt.REC_X86_PV_VCPU_EXTENDED, v, fill * 100),
                  X86PvVcpuRecord(fmt.REC_X86_PV_VCPU_XSAVE, v, fill * 836),
                  X86PvVcpuRecord(fmt.REC_X86_PV_VCPU_MSRS, v, struct.pack("<IIQ", 0xC0000103, 0, v))]
    leaves = struct.iter_unpack("<6I", synth.cpuid_policy())
    msrs = struct.iter_unpack("<IIQ", synth.msr_policy())
    records = [X86PvInfoRecord(8, 4), X86CpuidPolicyRecord(tuple(CpuidLeaf(*x) for x in leaves)),
               X86MsrPolicyRecord(tuple(MsrEntry(*x) for x in msrs)),
               EmptyRecord(fmt.REC_STATIC_DATA_END),
               X86PvP2mFramesRecord(0, nr - 1, (nr - 3, nr - 2, nr - 1)), *batches,
               X86TscInfoRecord(0, 2_494_000, 123_456_789_012, 1),
               SharedInfoRecord(bytes(range(256)) * 16), *vcpus, EmptyRecord(fmt.REC_END)]
    image = LibxcImage(ImageHeader(), DomainHeader(fmt.DHDR_TYPE_X86_PV, 4, 17), records)
    libxl = LibxlStream(LibxlHeader(), [LibxcContextRecord(image), EmptyRecord(fmt.LIBXL_REC_END)])
    return Stream(XlHeader.for_config(synth.CONFIG_JSON), libxl), contents
