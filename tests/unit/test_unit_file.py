"""hooks/xenpbrd.service: systemd accepts it, and it works on Debian 12 and upstream Xen."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "hooks" / "xenpbrd.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def verify(text: str, tmp_path: Path) -> str:
    """``systemd-analyze verify`` of ``text`` with ExecStart pointed at a binary that
    exists here (it checks that the command is executable); its complaints, if any."""
    if not Path(ANALYZE).exists():
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    path = tmp_path / "xenpbrd.service"
    lines = [f"ExecStart={shutil.which('true')}" if line.startswith("ExecStart=") else line
             for line in text.splitlines()]
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([ANALYZE, "verify", "--man=no", str(path)], capture_output=True,
                          text=True, timeout=120)
    return (proc.stdout + proc.stderr).strip() + ("" if proc.returncode == 0 else
                                                  f" (exit {proc.returncode})")


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == ""


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: systemd-analyze names a misspelled key."""
    assert "Typo" in verify(UNIT.read_text().replace("Type=notify", "Typo=notify"), tmp_path)


def test_notify_readiness() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"


def test_no_hard_dependency_on_units_debian_lacks() -> None:
    """Debian 12 ships neither xenstored.service nor proc-xen.mount: only soft deps."""
    u = unit()["Unit"]
    for hard in ("Requires", "BindsTo", "Requisite", "PartOf"):
        assert hard not in u, f"{hard}= fails where the unit does not exist"
    for name in ("xen.service", "xenstored.service", "proc-xen.mount"):
        assert name in u["Wants"].split() and name in u["After"].split()
    assert u["ConditionPathExists"] == "/proc/xen/capabilities"


def test_no_environment_overriding_the_config_file() -> None:
    assert "Environment" not in unit()["Service"]
