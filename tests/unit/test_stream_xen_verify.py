"""Xen 4.17's own verify-stream-v2 accepts what our writer emits."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.streams import synth
from tests.unit.streams.handbuilt import build_model_by_hand
from tests.unit.streams.xen_tools import AVAILABLE, MISSING_REASON, VERIFY, XEN_PY
from xenpbr.stream import InMemoryPages, read_stream, write_stream

pytestmark = pytest.mark.skipif(not AVAILABLE, reason=MISSING_REASON)


def verify(path: Path, stream_format: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(XEN_PY))
    return subprocess.run([sys.executable, str(VERIFY), "-v", "-f", stream_format, "-i", str(path)],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def regenerate(data: bytes, stream_format: str) -> bytes:
    pages = InMemoryPages()
    stream = read_stream(io.BytesIO(data), stream_format=stream_format, on_page=pages.on_page)
    out = io.BytesIO()
    write_stream(out, stream, pages.get_page)
    return out.getvalue()


@pytest.mark.parametrize("with_xl,with_libxl,stream_format",
                         [(True, True, "xl"), (False, True, "libxl"), (False, False, "libxc")])
def test_verifier_accepts_writer_output(tmp_path, with_xl, with_libxl, stream_format):
    data, _ = synth.build_pv_stream(synth.PvStreamSpec(with_xl=with_xl, with_libxl=with_libxl))
    out = tmp_path / f"pv.{stream_format}"
    out.write_bytes(regenerate(data, stream_format))
    result = verify(out, stream_format)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Domain Header: x86 PV from Xen 4.17" in result.stdout
    assert "Squashed 2 Page Data records together" in result.stdout
    assert result.stdout.rstrip().endswith("End, length 0")


def test_verifier_accepts_hand_built_model(tmp_path):
    stream, contents = build_model_by_hand()
    out = tmp_path / "model.xl"
    with out.open("wb") as f:
        write_stream(f, stream, contents.__getitem__)
    result = verify(out, "xl")
    assert result.returncode == 0, result.stdout + result.stderr


def test_verifier_is_not_a_rubber_stamp(tmp_path):
    """Negative control: the verifier does reject a stream with bad padding."""
    data, layout = synth.build_pv_stream(synth.PvStreamSpec(nr_pfns=64))
    ext = layout.first("libxc", synth.VCPU_EXTENDED)
    bad = bytearray(data)
    bad[ext + 8 + 108] = 1
    out = tmp_path / "bad.xl"
    out.write_bytes(bytes(bad))
    result = verify(out, "xl")
    assert result.returncode == 1
    assert "Padding containing non0 bytes" in result.stderr
