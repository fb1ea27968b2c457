"""The C header (guest-agent/include/xenpbr-resurrect.h) against the Python codec.

The example program is compiled with ``cc`` and run in its ``--file`` mode, which writes
its region to a file instead of registering it; dom0's parsers read that file, and the
Python library doing the same puts must give the same records.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from xenpbr.guestproto.resurrection import (
    PAGE_SIZE,
    parse_directory,
    parse_header,
    parse_slots,
)
from xenpbr_agent.resurrect import Region

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("cc") is None or not Path(
    "/usr/include/zlib.h").exists(), reason="needs cc and zlib1g-dev: tools/install-host-deps.sh")


@pytest.fixture(scope="module")
def c_region(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    tmp = tmp_path_factory.mktemp("c")
    exe, out = tmp / "resurrect-example", tmp / "region.bin"
    subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", "-O2", "-I",
                    str(ROOT / "guest-agent/include"),
                    str(ROOT / "guest-agent/examples/resurrect-example.c"), "-lz", "-o",
                    str(exe)], check=True, capture_output=True)
    subprocess.run([str(exe), "--file", str(out)], check=True, timeout=30)
    data = out.read_bytes()
    assert len(data) % PAGE_SIZE == 0
    return [data[i:i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]


def python_records() -> list[tuple[bytes, bytes, int, bool]]:
    region = Region.create("c-example", 3 * PAGE_SIZE, 128, register=False, lock=False,
                           generation=7, pfn_lookup=lambda a, n: [1000 + 3 * i for i in range(n)])
    for i in range(40):
        region.put(b"key-%d" % (i % 10), b"value-%d" % i)
    region.delete(b"key-3")
    header = parse_header(region.pages()[0])
    records, _ = parse_slots(b"".join(region.pages()[header.first_record_page:]), header)
    region.close()
    return [(r.key, r.value, r.seq, r.tombstone) for r in records]


def test_c_header_and_directory_parse(c_region: list[bytes]) -> None:
    header = parse_header(c_region[0])
    assert (header.app, header.generation, header.page_count, header.slot_size) == (
        "c-example", 7, len(c_region), 128)
    pfns = parse_directory(c_region[1:1 + header.dir_pages], header, 1000, [1003])
    assert pfns == tuple(1000 + 3 * i for i in range(len(c_region)))


def test_c_and_python_commit_the_same_records(c_region: list[bytes]) -> None:
    header = parse_header(c_region[0])
    records, rejections = parse_slots(b"".join(c_region[header.first_record_page:]), header)
    assert rejections == []
    got = [(r.key, r.value, r.seq, r.tombstone) for r in records]
    assert got == python_records()
    assert (b"key-3", b"", 41, True) in got and (b"key-9", b"value-39", 40, False) in got
