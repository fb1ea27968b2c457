"""Wire constants and fixed-size layouts of the Xen 4.17 save stream.

Everything the codec knows about the byte layout lives here, nowhere else.
Sources (Xen tag RELEASE-4.17.7, see ``docs/specs/migration-stream.md``):

* libxc layer: ``docs/specs/libxc-migration-stream.pandoc`` (Revision 3) and
  ``tools/libs/guest/xg_sr_stream_format.h``;
* libxl layer: ``docs/specs/libxl-migration-stream.pandoc`` (Revision 2) and
  ``tools/libs/light/libxl_sr_stream_format.h``;
* xl layer: ``struct save_file_header`` in ``tools/xl/xl.h``.

Byte order: the xl header is in the saving host's order, the libxl header and
the libxc image header are big-endian, everything else follows the endianness
bit of those headers. Only little-endian streams (every x86 host) are
supported, so the little-endian layouts below are the only ones defined.
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ub, Int16ul, Int32ub, Int32ul, Int64ub, Int64ul, Struct

# --------------------------------------------------------------------------
# Framing common to the libxl and libxc layers ("Records" sections of both specs)
# --------------------------------------------------------------------------

REC_ALIGN_ORDER = 3
REC_ALIGN = 1 << REC_ALIGN_ORDER  # records are padded to 8 octets
REC_TYPE_OPTIONAL = 0x80000000  # bit 31 of the type: restorer may ignore it
# Xen's reader refuses records longer than this (xg_sr_stream_format.h); so do we.
REC_LENGTH_MAX = 128 << 20

RECORD_HEADER = Struct("type" / Int32ul, "length" / Int32ul)


def padded_length(length: int) -> int:
    """Return ``length`` rounded up to the record alignment (8 octets)."""
    return (length + REC_ALIGN - 1) & ~(REC_ALIGN - 1)


def is_optional(rtype: int) -> bool:
    """True if a record type has the optional bit (bit 31) set."""
    return bool(rtype & REC_TYPE_OPTIONAL)


# --------------------------------------------------------------------------
# xl layer: tools/xl/xl.h, struct save_file_header + optional data
# --------------------------------------------------------------------------

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"  # 32 octets
XL_BYTEORDER_VALUE = 0x01020304  # SAVEFILE_BYTEORDER_VALUE, host order
XL_MANDATORY_FLAG_JSON = 1 << 0  # config data is libxl JSON
XL_MANDATORY_FLAG_STREAMV2 = 1 << 1  # libxl migration v2 stream follows
XL_MANDATORY_FLAG_ALL = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
# xl itself does not bound optional_data_len; we refuse absurd sizes.
XL_OPTIONAL_DATA_MAX = 16 << 20

XL_HEADER = Struct(
    "magic" / Bytes(32),
    "byteorder" / Int32ul,
    "mandatory_flags" / Int32ul,
    "optional_flags" / Int32ul,
    "optional_data_len" / Int32ul,
)
XL_CONFIG_LEN = Struct("config_len" / Int32ul)  # first optional-data item

# --------------------------------------------------------------------------
# libxl layer: libxl-migration-stream.pandoc "Header", "Records"
# --------------------------------------------------------------------------

LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1
LIBXL_OPT_RESERVED_MASK = 0xFFFFFFFC

LIBXL_HEADER = Struct("ident" / Int64ub, "version" / Int32ub, "options" / Int32ub)

LIBXL_REC_END = 0x00000000
LIBXL_REC_LIBXC_CONTEXT = 0x00000001
LIBXL_REC_EMULATOR_XENSTORE_DATA = 0x00000002
LIBXL_REC_EMULATOR_CONTEXT = 0x00000003
LIBXL_REC_CHECKPOINT_END = 0x00000004
LIBXL_REC_CHECKPOINT_STATE = 0x00000005

LIBXL_REC_NAMES: dict[int, str] = {
    LIBXL_REC_END: "END",
    LIBXL_REC_LIBXC_CONTEXT: "LIBXC_CONTEXT",
    LIBXL_REC_EMULATOR_XENSTORE_DATA: "EMULATOR_XENSTORE_DATA",
    LIBXL_REC_EMULATOR_CONTEXT: "EMULATOR_CONTEXT",
    LIBXL_REC_CHECKPOINT_END: "CHECKPOINT_END",
    LIBXL_REC_CHECKPOINT_STATE: "CHECKPOINT_STATE",
}

EMULATOR_UNKNOWN = 0
EMULATOR_QEMU_TRADITIONAL = 1
EMULATOR_QEMU_UPSTREAM = 2
EMULATOR_HEADER = Struct("id" / Int32ul, "index" / Int32ul)
CHECKPOINT_STATE = Struct("control_id" / Int32ul)

# --------------------------------------------------------------------------
# libxc layer: libxc-migration-stream.pandoc "Headers", "Records"
# --------------------------------------------------------------------------

IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSIONS = (2, 3)  # 4.17 writes 3; 2 is accepted by 4.17's restore
IHDR_OPT_BIG_ENDIAN = 1 << 0
IHDR_OPT_RESERVED_MASK = 0xFFFE

IMAGE_HEADER = Struct(
    "marker" / Int64ub,
    "id" / Int32ub,
    "version" / Int32ub,
    "options" / Int16ub,
    "reserved1" / Int16ub,
    "reserved2" / Int32ub,
)

DHDR_TYPE_X86_PV = 0x00000001
DHDR_TYPE_X86_HVM = 0x00000002
DHDR_TYPE_NAMES: dict[int, str] = {DHDR_TYPE_X86_PV: "x86 PV", DHDR_TYPE_X86_HVM: "x86 HVM"}
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

DOMAIN_HEADER = Struct(
    "type" / Int32ul,
    "page_shift" / Int16ul,
    "reserved1" / Int16ul,
    "xen_major" / Int32ul,
    "xen_minor" / Int32ul,
)

REC_END = 0x00000000
REC_PAGE_DATA = 0x00000001
REC_X86_PV_INFO = 0x00000002
REC_X86_PV_P2M_FRAMES = 0x00000003
REC_X86_PV_VCPU_BASIC = 0x00000004
REC_X86_PV_VCPU_EXTENDED = 0x00000005
REC_X86_PV_VCPU_XSAVE = 0x00000006
REC_SHARED_INFO = 0x00000007
REC_X86_TSC_INFO = 0x00000008
REC_HVM_CONTEXT = 0x00000009
REC_HVM_PARAMS = 0x0000000A
REC_TOOLSTACK = 0x0000000B
REC_X86_PV_VCPU_MSRS = 0x0000000C
REC_VERIFY = 0x0000000D
REC_CHECKPOINT = 0x0000000E
REC_CHECKPOINT_DIRTY_PFN_LIST = 0x0000000F
REC_STATIC_DATA_END = 0x00000010
REC_X86_CPUID_POLICY = 0x00000011
REC_X86_MSR_POLICY = 0x00000012

LIBXC_REC_NAMES: dict[int, str] = {
    REC_END: "END",
    REC_PAGE_DATA: "PAGE_DATA",
    REC_X86_PV_INFO: "X86_PV_INFO",
    REC_X86_PV_P2M_FRAMES: "X86_PV_P2M_FRAMES",
    REC_X86_PV_VCPU_BASIC: "X86_PV_VCPU_BASIC",
    REC_X86_PV_VCPU_EXTENDED: "X86_PV_VCPU_EXTENDED",
    REC_X86_PV_VCPU_XSAVE: "X86_PV_VCPU_XSAVE",
    REC_SHARED_INFO: "SHARED_INFO",
    REC_X86_TSC_INFO: "X86_TSC_INFO",
    REC_HVM_CONTEXT: "HVM_CONTEXT",
    REC_HVM_PARAMS: "HVM_PARAMS",
    REC_TOOLSTACK: "TOOLSTACK",
    REC_X86_PV_VCPU_MSRS: "X86_PV_VCPU_MSRS",
    REC_VERIFY: "VERIFY",
    REC_CHECKPOINT: "CHECKPOINT",
    REC_CHECKPOINT_DIRTY_PFN_LIST: "CHECKPOINT_DIRTY_PFN_LIST",
    REC_STATIC_DATA_END: "STATIC_DATA_END",
    REC_X86_CPUID_POLICY: "X86_CPUID_POLICY",
    REC_X86_MSR_POLICY: "X86_MSR_POLICY",
}

# PAGE_DATA (libxc spec "PAGE_DATA"; xg_sr_stream_format.h)
PAGE_DATA_HEADER = Struct("count" / Int32ul, "reserved1" / Int32ul)
PAGE_DATA_PFN_MASK = (1 << 52) - 1  # bits 51-0
PAGE_DATA_RESERVED_MASK = ((1 << 60) - 1) & ~PAGE_DATA_PFN_MASK  # bits 59-52
PAGE_DATA_TYPE_SHIFT = 60  # bits 63-60: XEN_DOMCTL_PFINFO_* >> 28
PFN_ENTRY_SIZE = 8

# Page type nibbles (XEN_DOMCTL_PFINFO_* from public/domctl.h, shifted right by 28).
PAGE_TYPE_NOTAB = 0x0
PAGE_TYPE_L1TAB = 0x1
PAGE_TYPE_L2TAB = 0x2
PAGE_TYPE_L3TAB = 0x3
PAGE_TYPE_L4TAB = 0x4
PAGE_TYPE_LPINTAB = 0x8  # flag: pinned page table (0x9..0xC)
PAGE_TYPE_BROKEN = 0xD
PAGE_TYPE_XALLOC = 0xE
PAGE_TYPE_XTAB = 0xF
PAGE_TYPES_INVALID = frozenset({0x5, 0x6, 0x7, 0x8})  # "Reserved" in the spec
PAGE_TYPES_WITHOUT_DATA = frozenset({PAGE_TYPE_BROKEN, PAGE_TYPE_XALLOC, PAGE_TYPE_XTAB})
PAGE_TYPE_NAMES: dict[int, str] = {
    0x0: "NOTAB", 0x1: "L1TAB", 0x2: "L2TAB", 0x3: "L3TAB", 0x4: "L4TAB",
    0x9: "L1TAB_PIN", 0xA: "L2TAB_PIN", 0xB: "L3TAB_PIN", 0xC: "L4TAB_PIN",
    0xD: "BROKEN", 0xE: "XALLOC", 0xF: "XTAB",
}


def page_type_has_data(page_type: int) -> bool:
    """True if a PAGE_DATA entry of this type is followed by page contents."""
    return page_type not in PAGE_TYPES_WITHOUT_DATA


X86_PV_INFO = Struct(
    "guest_width" / Int8ul,
    "pt_levels" / Int8ul,
    "reserved1" / Int16ul,
    "reserved2" / Int32ul,
)
X86_PV_P2M_FRAMES_HEADER = Struct("start_pfn" / Int32ul, "end_pfn" / Int32ul)
X86_PV_VCPU_HEADER = Struct("vcpu_id" / Int32ul, "reserved1" / Int32ul)
X86_TSC_INFO = Struct(
    "mode" / Int32ul,
    "khz" / Int32ul,
    "nsec" / Int64ul,
    "incarnation" / Int32ul,
    "reserved1" / Int32ul,
)
HVM_PARAMS_HEADER = Struct("count" / Int32ul, "reserved1" / Int32ul)
HVM_PARAMS_ENTRY = Struct("index" / Int64ul, "value" / Int64ul)
# xen_cpuid_leaf_t and xen_msr_entry_t, public/arch-x86/xen.h
X86_CPUID_LEAF = Struct(
    "leaf" / Int32ul, "subleaf" / Int32ul,
    "a" / Int32ul, "b" / Int32ul, "c" / Int32ul, "d" / Int32ul,
)
X86_MSR_ENTRY = Struct("idx" / Int32ul, "flags" / Int32ul, "val" / Int64ul)

SHARED_INFO_SIZE = PAGE_SIZE
X86_PV_GUEST_WIDTHS = (4, 8)
X86_PV_PT_LEVELS = (3, 4)


def libxc_record_name(rtype: int) -> str:
    """Spec name of a libxc record type, or a placeholder for unknown types."""
    return _record_name(LIBXC_REC_NAMES, rtype)


def libxl_record_name(rtype: int) -> str:
    """Spec name of a libxl record type, or a placeholder for unknown types."""
    return _record_name(LIBXL_REC_NAMES, rtype)


def _record_name(names: dict[int, str], rtype: int) -> str:
    if rtype in names:
        return names[rtype]
    return "UNKNOWN_OPTIONAL" if is_optional(rtype) else "UNKNOWN_MANDATORY"
