"""Codec for Xen 4.17 save streams (``xl save`` files, libxl + libxc migration v2).

Parse with :func:`read_stream` (page contents go to an ``on_page`` visitor),
regenerate byte for byte with :func:`write_stream` (contents come from
``get_page``). The layouts and record ordering we rely on are summarised in
``docs/specs/migration-stream.md``.

Modules: :mod:`.format` (wire constants and structs), :mod:`.framing` (record
framing and sequential I/O), :mod:`.codec` (registry plumbing),
:mod:`.headers`, :mod:`.libxl_records`, :mod:`.libxc_records` (record families),
:mod:`.model` (the structured form), :mod:`.reader`, :mod:`.writer`,
:mod:`.errors`; ``python -m xenpbr.stream FILE`` checks a captured stream.
"""

from xenpbr.stream.codec import (EmptyRecord, OpaqueRecord, PageBatchSource, PageSource,
                                 PageVisitor, RecordVisitor)
from xenpbr.stream.errors import RecordError, StreamCodecError, StreamError
from xenpbr.stream.headers import DomainHeader, ImageHeader, LibxlHeader, XlHeader
from xenpbr.stream.libxc_records import (
    CpuidLeaf,
    HvmContextRecord,
    HvmParamsRecord,
    MsrEntry,
    PageDataRecord,
    PageEntry,
    SharedInfoRecord,
    X86CpuidPolicyRecord,
    X86MsrPolicyRecord,
    X86PvInfoRecord,
    X86PvP2mFramesRecord,
    X86PvVcpuRecord,
    X86TscInfoRecord,
)
from xenpbr.stream.libxl_records import CheckpointStateRecord, EmulatorRecord, LibxcContextRecord
from xenpbr.stream.model import InMemoryPages, LibxcImage, LibxlStream, Stream
from xenpbr.stream.reader import ReadLimits, read_stream
from xenpbr.stream.writer import write_stream

__all__ = [
    "CheckpointStateRecord", "CpuidLeaf", "DomainHeader", "EmptyRecord", "EmulatorRecord",
    "HvmContextRecord", "HvmParamsRecord", "ImageHeader", "InMemoryPages", "LibxcContextRecord",
    "LibxcImage", "LibxlHeader", "LibxlStream", "MsrEntry", "OpaqueRecord", "PageDataRecord",
    "PageBatchSource", "PageEntry", "PageSource", "PageVisitor", "ReadLimits", "RecordError",
    "RecordVisitor", "SharedInfoRecord", "Stream", "StreamCodecError", "StreamError",
    "X86CpuidPolicyRecord", "X86MsrPolicyRecord", "X86PvInfoRecord", "X86PvP2mFramesRecord",
    "X86PvVcpuRecord", "X86TscInfoRecord", "XlHeader", "read_stream", "write_stream",
]
