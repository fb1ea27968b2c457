"""Pin the wire layouts in xenpbr.stream.format to the Xen 4.17 specs."""

from __future__ import annotations

import importlib
import struct
import sys

import pytest

from tests.unit.streams.xen_tools import AVAILABLE, MISSING_REASON, XEN_PY
from xenpbr.stream import format as fmt

# (construct struct, size from the spec / BUILD_BUG_ON in xg_sr_common.c)
SPEC_SIZES = [
    (fmt.RECORD_HEADER, 8),  # xc_sr_rhdr / libxl__sr_rec_hdr
    (fmt.XL_HEADER, 48),  # struct save_file_header: 32 magic + 4 x u32
    (fmt.XL_CONFIG_LEN, 4),
    (fmt.LIBXL_HEADER, 16),  # libxl__sr_hdr
    (fmt.EMULATOR_HEADER, 8),  # libxl__sr_emulator_hdr
    (fmt.CHECKPOINT_STATE, 4),  # libxl_sr_checkpoint_state
    (fmt.IMAGE_HEADER, 24),  # xc_sr_ihdr
    (fmt.DOMAIN_HEADER, 16),  # xc_sr_dhdr
    (fmt.PAGE_DATA_HEADER, 8),  # xc_sr_rec_page_data_header
    (fmt.X86_PV_INFO, 8),  # xc_sr_rec_x86_pv_info
    (fmt.X86_PV_P2M_FRAMES_HEADER, 8),  # xc_sr_rec_x86_pv_p2m_frames
    (fmt.X86_PV_VCPU_HEADER, 8),  # xc_sr_rec_x86_pv_vcpu_hdr
    (fmt.X86_TSC_INFO, 24),  # xc_sr_rec_x86_tsc_info
    (fmt.HVM_PARAMS_HEADER, 8),  # xc_sr_rec_hvm_params
    (fmt.HVM_PARAMS_ENTRY, 16),  # xc_sr_rec_hvm_params_entry
    (fmt.X86_CPUID_LEAF, 24),  # xen_cpuid_leaf_t
    (fmt.X86_MSR_ENTRY, 16),  # xen_msr_entry_t
]


@pytest.mark.parametrize("struct_, size", SPEC_SIZES, ids=lambda v: getattr(v, "name", None) or str(v))
def test_struct_sizes_match_spec(struct_, size):
    assert struct_.sizeof() == size


def test_magic_and_idents():
    assert len(fmt.XL_MAGIC) == 32
    assert fmt.LIBXL_IDENT.to_bytes(8, "big") == b"LibxlFmt"
    assert fmt.IHDR_ID.to_bytes(4, "big") == b"XENF"


def test_header_byte_order():
    """Image and libxl headers are big-endian; the rest little-endian on x86."""
    ihdr = fmt.IMAGE_HEADER.build({"marker": fmt.IHDR_MARKER, "id": fmt.IHDR_ID, "version": 3,
                                   "options": 0, "reserved1": 0, "reserved2": 0})
    assert ihdr[8:16] == b"XENF\x00\x00\x00\x03"
    rhdr = fmt.RECORD_HEADER.build({"type": 1, "length": 0x10})
    assert rhdr == b"\x01\x00\x00\x00\x10\x00\x00\x00"


def test_names_cover_every_type():
    assert sorted(fmt.LIBXC_REC_NAMES) == list(range(0x13))
    assert sorted(fmt.LIBXL_REC_NAMES) == list(range(0x6))
    assert fmt.libxc_record_name(0x80000001) == "UNKNOWN_OPTIONAL"
    assert fmt.libxl_record_name(0x42) == "UNKNOWN_MANDATORY"


def test_alignment_and_optional_bit():
    assert [fmt.padded_length(n) for n in (0, 1, 7, 8, 9, 4104)] == [0, 8, 8, 8, 16, 4104]
    assert fmt.is_optional(0x80000000) and not fmt.is_optional(0x7FFFFFFF)


def test_page_types():
    assert [t for t in range(16) if not fmt.page_type_has_data(t)] == [0xD, 0xE, 0xF]
    assert fmt.PAGE_TYPES_INVALID == {5, 6, 7, 8}
    assert set(fmt.PAGE_TYPE_NAMES) | fmt.PAGE_TYPES_INVALID == set(range(16))
    assert fmt.PAGE_DATA_PFN_MASK == 0x000FFFFFFFFFFFFF
    assert fmt.PAGE_DATA_RESERVED_MASK == 0x0FF0000000000000


@pytest.fixture(scope="module")
def xen_migration():
    if not AVAILABLE:
        pytest.skip(MISSING_REASON)
    sys.path.insert(0, str(XEN_PY))
    try:
        yield {m: importlib.import_module(f"xen.migration.{m}") for m in ("libxc", "libxl", "xl")}
    finally:
        sys.path.remove(str(XEN_PY))


def test_constants_agree_with_xen_verifier(xen_migration):
    libxc, libxl, xl = xen_migration["libxc"], xen_migration["libxl"], xen_migration["xl"]
    xen_libxc = {v: k for k, v in vars(libxc).items() if k.startswith("REC_TYPE_")}
    xen_libxl = {v: k for k, v in vars(libxl).items() if k.startswith("REC_TYPE_")}
    assert set(xen_libxc) == set(fmt.LIBXC_REC_NAMES)
    assert set(xen_libxl) == set(fmt.LIBXL_REC_NAMES)
    assert (libxc.IHDR_MARKER, libxc.IHDR_IDENT) == (fmt.IHDR_MARKER, fmt.IHDR_ID)
    assert libxl.HDR_IDENT == fmt.LIBXL_IDENT and libxl.HDR_VERSION == fmt.LIBXL_VERSION
    assert xl.MAGIC.encode() == fmt.XL_MAGIC
    assert xl.MANDATORY_FLAG_STREAMV2 == fmt.XL_MANDATORY_FLAG_STREAMV2
    assert libxc.PAGE_DATA_PFN_MASK == fmt.PAGE_DATA_PFN_MASK
    assert libxc.PAGE_DATA_PFN_RESZ_MASK == fmt.PAGE_DATA_RESERVED_MASK


def test_sizes_agree_with_xen_verifier(xen_migration):
    libxc, libxl, xl = xen_migration["libxc"], xen_migration["libxl"], xen_migration["xl"]
    pairs = [(libxc.IHDR_FORMAT, fmt.IMAGE_HEADER), (libxc.DHDR_FORMAT, fmt.DOMAIN_HEADER),
             (libxc.RH_FORMAT, fmt.RECORD_HEADER), (libxc.X86_PV_INFO_FORMAT, fmt.X86_PV_INFO),
             (libxc.X86_TSC_INFO_FORMAT, fmt.X86_TSC_INFO),
             (libxc.X86_CPUID_POLICY_FORMAT, fmt.X86_CPUID_LEAF),
             (libxc.X86_MSR_POLICY_FORMAT, fmt.X86_MSR_ENTRY),
             (libxc.HVM_PARAMS_ENTRY_FORMAT, fmt.HVM_PARAMS_ENTRY),
             (libxl.HDR_FORMAT, fmt.LIBXL_HEADER), (libxl.EMULATOR_HEADER_FORMAT, fmt.EMULATOR_HEADER)]
    for xen_format, ours in pairs:
        assert struct.calcsize(xen_format) == ours.sizeof(), xen_format
    assert 32 + struct.calcsize(xl.HEADER_FORMAT) == fmt.XL_HEADER.sizeof()
