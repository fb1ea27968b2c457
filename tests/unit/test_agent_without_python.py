"""The packaged ``/usr/bin/xenpbr-agent`` (debian/xenpbr-agent-launcher) runs the agent
with a Python that can, and without one still brings the guest up: ``phase NAME`` runs
guest-agent/sh/salvage.sh, which marks nothing, runs what the config names for that
phase (and after the last phase), tells dom0 why, and exits 2 (issue 16, bad input)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_debian_packaging import DEBIAN, ROOT, install_lines

LAUNCHER = DEBIAN / "xenpbr-agent-launcher"


@pytest.fixture
def lib(tmp_path: Path) -> Path:
    """/usr/lib/xenpbr-agent as the package lays it out."""
    lib = tmp_path / "usr/lib/xenpbr-agent"
    for source, dest in install_lines("xenpbr-agent"):
        if dest.startswith("usr/lib/xenpbr-agent"):
            (tmp_path / dest).mkdir(parents=True, exist_ok=True)
            for match in ROOT.glob(source):
                shutil.copy(match, tmp_path / dest)
    return lib


def agent(lib: Path, *argv: str, python: str = sys.executable,
          path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": path or os.environ["PATH"], "XENPBR_AGENT_LIB": str(lib),
           "XENPBR_AGENT_PYTHON": python}
    return subprocess.run(["sh", str(LAUNCHER), *argv], capture_output=True, text=True,
                          env=env, timeout=60)


CONFIG = """\
[agent]
identity = v1
# a comment
[phase:kernel]
start = sh -c 'echo kernel >> {out}'
[phase:app]
start = sh -c 'echo app1 >> {out}'
        sh -c 'echo app2 >> {out}'

[after-last-phase]
mount = /dev/xvdb {mounted}
start = sh -c 'echo deferred >> {out}'
"""


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "agent.conf"
    path.write_text(CONFIG.format(out=tmp_path / "ran", mounted="/"))
    return path


def test_with_python_the_launcher_runs_the_agent(lib: Path, conf: Path) -> None:
    done = agent(lib, "check", "--config", str(conf))
    assert done.returncode == 0, done.stderr
    assert "kernel" in done.stdout and "app" in done.stdout
    assert agent(lib, "--version").stdout.startswith("xenpbr-agent ")


def test_without_python_the_last_phase_still_starts_the_deferred_work(
        lib: Path, conf: Path, tmp_path: Path) -> None:
    done = agent(lib, "phase", "app", "--config", str(conf), python="/nonexistent/python3")
    assert (done.returncode, done.stdout) == (2, "app not-marked\n"), done.stderr
    assert (tmp_path / "ran").read_text() == "app1\napp2\ndeferred\n"
    assert "no Python 3.9 or later can run the agent" in done.stderr
    assert "boundary app is not marked" in done.stderr
    assert "/ is already mounted" in done.stderr  # the mount line was read, / left alone


def test_without_python_an_earlier_phase_runs_only_its_own_start(
        lib: Path, conf: Path, tmp_path: Path) -> None:
    done = agent(lib, "phase", "kernel", "--config", str(conf), python="/nonexistent")
    assert (done.returncode, done.stdout) == (2, "kernel not-marked\n"), done.stderr
    assert (tmp_path / "ran").read_text() == "kernel\n"


def test_without_python_a_failing_command_does_not_stop_the_others(
        lib: Path, tmp_path: Path) -> None:
    conf = tmp_path / "agent.conf"
    conf.write_text(f"[phase:app]\nstart = false\n[after-last-phase]\n"
                    f"start = sh -c 'echo svc >> {tmp_path}/ran'\n")
    done = agent(lib, "phase", "app", "--config", str(conf), python="/nonexistent")
    assert done.returncode == 2 and "error: 'false' failed" in done.stderr
    assert (tmp_path / "ran").read_text() == "svc\n"


def test_without_python_and_without_a_config_nothing_is_run(lib: Path, tmp_path) -> None:
    done = agent(lib, "phase", "app", "--config", str(tmp_path / "nope"), python="/x")
    assert (done.returncode, done.stdout) == (2, "app not-marked\n")
    assert "cannot read" in done.stderr and "nothing to salvage" in done.stderr


def test_without_python_other_commands_say_what_to_install(lib: Path) -> None:
    done = agent(lib, "status", python="/nonexistent/python3")
    assert done.returncode == 2 and "install python3" in done.stderr


def test_without_python_dom0_is_told_why(lib: Path, conf: Path, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "xenstore-write").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/xs\n")
    (bindir / "xenstore-write").chmod(0o755)
    agent(lib, "phase", "kernel", "--config", str(conf), python="/x",
          path=f"{bindir}:{os.environ['PATH']}")
    from xenpbr.guestproto.wire import parse_agent_problem
    key, _, value = (tmp_path / "xs").read_text().strip().partition(" ")
    assert key == "data/xenpbr/problem"
    problem = parse_agent_problem(value.encode())
    assert problem is not None and (problem.kind, problem.phase) == ("no-python", "kernel")
