"""The type checker is part of the fast suite: ``mypy`` over dom0's package, the agent and
the lab (whose benchmarks produce the figures the docs quote).

Its settings are in setup.cfg (``[mypy]``); it runs from the repository root, so a
developer gets the same answer from a bare ``mypy``. The check is a test, not a CI step,
because a type error in a rarely run path (a recovery fallback, a refusal) is exactly the
bug a unit test misses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_checks_every_module_of_xenpbr_the_agent_and_the_lab_and_finds_no_errors() -> None:
    run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir",
                          str(ROOT / "build" / "mypy-cache")],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, f"mypy found errors:\n{run.stdout}{run.stderr}"
    # A config that silently checks nothing would pass too: count what it checked.
    modules = len(list((ROOT / "xenpbr").rglob("*.py")))
    modules += len(list((ROOT / "guest-agent" / "xenpbr_agent").rglob("*.py")))
    modules += len(list((ROOT / "xenpbr_lab").rglob("*.py")))
    checked = re.search(r"no issues found in (\d+) source files", run.stdout)
    assert checked is not None and int(checked.group(1)) == modules, run.stdout
