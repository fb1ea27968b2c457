"""The ``python -m xenpbr.stream FILE`` lab diagnostic."""

from __future__ import annotations

from tests.unit.streams import synth
from xenpbr.stream.__main__ import main


def test_roundtrip_check_passes_on_a_good_stream(tmp_path, capsys):
    path = tmp_path / "good.xl"
    path.write_bytes(synth.build_pv_stream(synth.PvStreamSpec(nr_pfns=300))[0])
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "x86 PV from Xen 4.17" in out and "byte-identical" in out


def test_parse_error_is_reported(tmp_path, capsys):
    path = tmp_path / "cut.xl"
    path.write_bytes(synth.build_pv_stream(synth.PvStreamSpec(nr_pfns=300))[0][:-100])
    assert main([str(path)]) == 1
    assert "PARSE ERROR" in capsys.readouterr().err
