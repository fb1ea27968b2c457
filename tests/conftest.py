"""Shared pytest wiring.

Tests under ``tests/lab`` need real Xen booted in QEMU and are marked ``lab``
automatically, so ``pytest -m "not lab"`` is the fast suite and ``pytest -m lab`` the
real-Xen suite. A makereport hook stashes each phase's report on the item (as
Firecracker's harness does) so fixtures can tell at teardown whether the test failed and
keep evidence.
"""

from __future__ import annotations

from pathlib import Path

import pytest

LAB_DIR = Path(__file__).parent / "lab"
PHASE_REPORTS = pytest.StashKey[dict]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


def test_failed(request: pytest.FixtureRequest) -> bool:
    """True if the requesting test's setup or call phase failed."""
    reports = request.node.stash.get(PHASE_REPORTS, {})
    return any(r.failed for r in reports.values())
