"""xenpbrd's command line: help and version without starting anything, usage errors exit
2, runtime failures exit 1 with one line (no traceback), settings reach the daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xenpbr import __version__, settings, xenpbrd


@pytest.fixture
def nothing_starts(monkeypatch) -> list[object]:
    """Fail the test if main() gets as far as opening Xen."""
    started: list[object] = []
    monkeypatch.setattr(xenpbrd, "_serve", lambda conf: started.append(conf) or 0)
    return started


def test_help_prints_help_and_starts_nothing(nothing_starts, capsys) -> None:
    assert xenpbrd.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xenpbrd") and "--config" in out and "--state-dir" in out
    assert not nothing_starts


def test_version(nothing_starts, capsys) -> None:
    assert xenpbrd.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"xenpbrd {__version__}"
    assert not nothing_starts


@pytest.mark.parametrize("argv", [["--json"], ["serve"], ["--state-dir"]])
def test_unknown_options_are_usage_errors(nothing_starts, capsys, argv) -> None:
    assert xenpbrd.main(argv) == 2
    assert "usage: xenpbrd" in capsys.readouterr().err
    assert not nothing_starts


def test_options_reach_the_settings(nothing_starts, tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "x.conf"
    conf.write_text("[images]\ndefault_quota = 1G\n[log]\nlevel = error\n")
    monkeypatch.delenv("XENPBR_STATE_DIR", raising=False)
    assert xenpbrd.main(["--config", str(conf), "--state-dir", str(tmp_path), "-v"]) == 0
    assert nothing_starts == [settings.Settings(state_dir=tmp_path, image_quota=1 << 30,
                                                log_level="debug")]


def test_a_state_root_path_still_works(nothing_starts, tmp_path: Path) -> None:
    assert xenpbrd.main(tmp_path) == 0  # `xenpbr daemon`'s older call
    assert nothing_starts[0].state_dir == tmp_path


def test_bad_config_is_one_line_and_exit_1(tmp_path: Path, capsys) -> None:
    conf = tmp_path / "x.conf"
    conf.write_text("[hot-stream]\nenable = no\n")
    assert xenpbrd.main(["--config", str(conf)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xenpbrd: error: ")
    assert "did you mean 'enabled'" in err


def test_unusable_state_dir_is_one_line_and_exit_1(tmp_path: Path, capsys,
                                                   monkeypatch) -> None:
    monkeypatch.setattr(settings, "DEFAULT_PATH", tmp_path / "absent.conf")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert xenpbrd.main(["--state-dir", str(blocker / "state")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "state directory" in err and "[state] dir" in err


def test_missing_xen_is_one_line_and_exit_1(tmp_path: Path, capsys, monkeypatch) -> None:
    """No Xen libraries here (or pointed at an empty folder): a message, no traceback."""
    monkeypatch.setattr(settings, "DEFAULT_PATH", tmp_path / "absent.conf")
    monkeypatch.setenv("XENPBR_LIBDIR", str(tmp_path))
    assert xenpbrd.main(["--state-dir", str(tmp_path / "state")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xenpbrd: error: ")
    assert "Traceback" not in err


def test_no_xenstored_is_one_line_and_exit_1(tmp_path: Path, capsys, monkeypatch) -> None:
    from xenpbr.hypervisor import libxc
    from xenpbr.xenstore import XenstoreClient

    class NoHypervisor:
        def __init__(self, **_) -> None: ...
        def __enter__(self): return self
        def __exit__(self, *_) -> None: ...

    def refuse(self):
        raise FileNotFoundError(2, "No such file or directory", "/run/xenstored/socket")

    monkeypatch.setattr(settings, "DEFAULT_PATH", tmp_path / "absent.conf")
    monkeypatch.setattr(libxc, "LibxcHypervisor", NoHypervisor)
    monkeypatch.setattr(XenstoreClient, "open", refuse)
    assert xenpbrd.main(["--state-dir", str(tmp_path / "state")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "xenstored" in err and "Traceback" not in err


def test_python_m_xenpbr_xenpbrd_help() -> None:
    """The lab starts xenpbrd as ``python3 -m xenpbr.xenpbrd``."""
    proc = subprocess.run([sys.executable, "-m", "xenpbr.xenpbrd", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: xenpbrd")
    proc = subprocess.run([sys.executable, "-m", "xenpbr.xenpbrd", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unrecognized arguments: --json" in proc.stderr
