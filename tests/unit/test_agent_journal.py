"""journald is moved off the disks while the agent has them frozen (xenpbr_agent/journal.py):
a journald blocked on a frozen root keeps the guest from suspending for the capture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from xenpbr_agent import journal


class Runner:
    def __init__(self, rc: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.rc = rc

    def __call__(self, argv: Sequence[str]) -> int:
        self.calls.append(list(argv))
        return self.rc


def test_relinquished_around_the_body_and_flushed_back() -> None:
    run = Runner()
    with journal.off_the_disks(True, run):
        assert run.calls == [["journalctl", "--relinquish-var"]]
    assert run.calls[-1] == ["journalctl", "--flush"]


def test_flushed_back_when_the_body_fails() -> None:
    run = Runner()
    with pytest.raises(RuntimeError), journal.off_the_disks(True, run):
        raise RuntimeError("boundary failed")
    assert run.calls == [["journalctl", "--relinquish-var"], ["journalctl", "--flush"]]


def test_nothing_without_a_persistent_journald() -> None:
    run = Runner()
    with journal.off_the_disks(False, run):
        pass
    assert run.calls == []


def test_no_flush_when_journald_did_not_move() -> None:
    run = Runner(rc=1)
    with journal.off_the_disks(True, run):
        pass
    assert run.calls == [["journalctl", "--relinquish-var"]]


def test_persistent_means_a_socket_and_a_journal_folder(tmp_path: Path) -> None:
    sock, folder = tmp_path / "socket", tmp_path / "journal"
    assert not journal.journald_persistent(str(sock), str(folder))
    sock.touch()
    assert not journal.journald_persistent(str(sock), str(folder))  # volatile journal
    folder.mkdir()
    assert journal.journald_persistent(str(sock), str(folder))


def test_a_missing_journalctl_is_a_warning_not_an_error(caplog) -> None:
    assert journal._run(["/nonexistent/journalctl", "--flush"]) == 127
    assert "nonexistent" in caplog.text
