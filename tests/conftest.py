"""Shared pytest wiring.

Tests under ``tests/lab`` need real Xen booted in QEMU and are marked ``lab``
automatically, so ``pytest -m "not lab"`` is the fast suite and ``pytest -m lab`` the
real-Xen suite. A makereport hook stashes each phase's report on the item (as
Firecracker's harness does) so fixtures can tell at teardown whether the test failed and
keep evidence.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

LAB_DIR = Path(__file__).parent / "lab"
PHASE_REPORTS = pytest.StashKey[dict]()


def pytest_configure(config: pytest.Config) -> None:
    """Point the tests that load Xen's real libraries at the lab's unpacked Debian
    packages (``XENPBR_TEST_LIBDIR``, ``XENPBR_TEST_XEN_ROOT``), unless already set.

    A run that includes the lab tier resolves the sysroot (the lab's cache entry: apt
    and a download the first time, about a second when warm). The fast tier
    (``-m "not lab"``) never touches the network: it uses a sysroot already in the
    cache if there is one, and otherwise those tests skip and say how to get it.
    """
    if os.environ.get("XENPBR_TEST_LIBDIR") and os.environ.get("XENPBR_TEST_XEN_ROOT"):
        return
    from xenpbr_lab.build import cached_sysroot, unpacked_sysroot
    from xenpbr_lab.errors import LabError
    root = cached_sysroot()
    if root is None and not _fast_tier_only(config):
        try:
            root = unpacked_sysroot()[0]
        except LabError as exc:
            log.warning("real Xen libraries unavailable for unit tests: %s", exc)
    if root is None:
        return
    os.environ.setdefault("XENPBR_TEST_LIBDIR", str(root / "usr/lib/x86_64-linux-gnu"))
    os.environ.setdefault("XENPBR_TEST_XEN_ROOT", str(root / "usr/lib/xen-4.17"))


def _fast_tier_only(config: pytest.Config) -> bool:
    """True if the run deselects the lab tier (``-m "not lab"``, as ``make test-fast``
    and ``tox -e fast`` do)."""
    markexpr = config.getoption("markexpr", "") or ""
    return "not lab" in " ".join(markexpr.split())


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


class _RefusingFreezer:
    """Stands in for the agent's kernel freezer during tests: it answers questions about
    devices, but a FIFREEZE/FITHAW ioctl fails the test instead of reaching the kernel."""

    def device(self, mount: str) -> int:
        return os.stat(mount).st_dev

    def ioctl(self, mount: str, request: int) -> None:
        raise AssertionError(f"a test reached the real freeze ioctl {request:#x} on {mount}: "
                             "give it a fake freezer (run as root this would freeze the "
                             "test host's own file system)")

    def output_devices(self) -> set[int]:
        return set()


@pytest.fixture(autouse=True)
def _never_freeze_the_test_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest agent freezes every read-write disk at a boundary. A test that reaches it
    with the real ioctls, run as root, would freeze this machine's own disks (it nearly
    did): every test starts with a freezer that refuses, and sets a fake where it wants
    one. Tests that mean the real kernel pass ``KernelFreezer()`` explicitly."""
    try:
        from xenpbr_agent import freeze
    except ImportError:
        return
    monkeypatch.setattr(freeze, "KERNEL", _RefusingFreezer())


@pytest.fixture(autouse=True)
def _never_move_the_test_hosts_journal(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Around a freeze the agent asks journald to write to /run (journalctl
    --relinquish-var): never this machine's journald. Tests of that pass paths or a
    runner explicitly."""
    try:
        from xenpbr_agent import journal
    except ImportError:
        return
    monkeypatch.setattr(journal, "SOCKET", str(tmp_path / "no-journald-socket"))
