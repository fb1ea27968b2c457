"""Shared pytest wiring.

Tests under ``tests/lab`` need real Xen booted in QEMU and are marked ``lab``
automatically, so ``pytest -m "not lab"`` is the fast suite and ``pytest -m lab`` the
real-Xen suite. A makereport hook stashes each phase's report on the item (as
Firecracker's harness does) so fixtures can tell at teardown whether the test failed and
keep evidence.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any

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


#: The lab files of ``make test``, longest first (minutes on a slow machine, 2026-12-07:
#: 7.5, 7, 6.5, 5, 4, then 3 or less). ``make test`` runs whole files in two pytest-xdist
#: workers, each handed the next file in collection order when it has fewer than two
#: queued (``--dist loadfile --no-loadscope-reorder``): longest first keeps one worker
#: from finishing a 7-minute file alone after the other ran out of work.
LONGEST_LAB_FILES_FIRST = (
    "test_faults_real", "test_watcher_real", "test_phasereboot_real", "test_hypervisor_real",
    "test_consistency_real", "test_resurrection_hostile_real", "test_stream_real",
    "test_store_corruption_real", "test_standby_real", "test_resurrection_real",
    "test_lifecycle_real", "test_protocol_real", "test_xen_basics")


def _is_lab(item: pytest.Item) -> bool:
    return LAB_DIR in Path(str(item.fspath)).parents


def _run_order(item: pytest.Item) -> tuple[int, int]:
    """Lab tests before unit tests (short unit files fill the workers' last minutes),
    the lab's longest files first; the sort is stable, so a file's tests keep their order."""
    if not _is_lab(item):
        return (1, 0)
    stem, order = Path(str(item.fspath)).stem, LONGEST_LAB_FILES_FIRST
    return (0, order.index(stem) if stem in order else len(order))


def _scale_lab_timeouts(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In ``make test``'s N pytest-xdist workers each lab host gets about 1/N of the
    machine: N times each lab test's timeout (its own mark, or setup.cfg's default), so
    the margin sized for one host at a time still holds."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers < 2:
        return
    default = float(config.getini("timeout") or 0)
    for item in filter(_is_lab, items):
        mark = item.get_closest_marker("timeout")
        own = (mark.args[0] if mark.args else mark.kwargs.get("timeout")) if mark else None
        base = float(own) if own is not None else default
        if base > 0:
            item.add_marker(pytest.mark.timeout(base * workers), append=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in filter(_is_lab, items):
        item.add_marker(pytest.mark.lab)
    _scale_lab_timeouts(config, items)
    items.sort(key=_run_order)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


def test_failed(request: pytest.FixtureRequest) -> bool:
    """True if the requesting test's setup or call phase failed."""
    reports = request.node.stash.get(PHASE_REPORTS, {})
    return any(r.failed for r in reports.values())


#: ``FIFREEZE`` and ``FITHAW`` (linux/fs.h): no code of this project may issue them.
FREEZE_IOCTLS = frozenset({0xC0045877, 0xC0045878})


@pytest.fixture(autouse=True)
def _never_freeze_the_test_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest agent once froze every read-write disk at a boundary, and a test run as
    root nearly froze this machine's own disks. Nothing freezes now (dom0 snapshots
    disks while the guest is paused): a freeze ioctl reaching ``fcntl.ioctl`` fails the
    test instead of the kernel, so the old path cannot come back unnoticed."""
    real = fcntl.ioctl

    def guarded(fd: Any, request: int, *args: Any) -> Any:
        if request in FREEZE_IOCTLS:
            raise AssertionError(f"a test reached a file-system freeze ioctl {request:#x}")
        return real(fd, request, *args)

    monkeypatch.setattr(fcntl, "ioctl", guarded)
