"""Log lines for the journal (``<N>`` priority prefix) and for a file (timestamps)."""

from __future__ import annotations

import io
import logging
import os

import pytest

from xenpbr import logsetup


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.mark.parametrize("level, prio", [(logging.CRITICAL, 2), (logging.ERROR, 3),
                                         (logging.WARNING, 4), (logging.INFO, 6),
                                         (logging.DEBUG, 7), (logging.INFO + 5, 6)])
def test_priorities(level: int, prio: int) -> None:
    assert logsetup.priority(level) == prio


def test_journal_lines_carry_their_priority(restore_root) -> None:
    out = io.StringIO()
    logsetup.setup("debug", stream=out, journal=True)
    log = logging.getLogger("xenpbr.daemon")
    log.critical("%s is DOWN: %s", "web", "no image")
    log.error("e")
    log.warning("w")
    log.info("i")
    log.debug("d")
    assert out.getvalue().splitlines() == [
        "<2>xenpbr.daemon: web is DOWN: no image", "<3>xenpbr.daemon: e",
        "<4>xenpbr.daemon: w", "<6>xenpbr.daemon: i", "<7>xenpbr.daemon: d"]


def test_every_line_of_a_traceback_carries_the_priority(restore_root) -> None:
    out = io.StringIO()
    logsetup.setup("info", stream=out, journal=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("crashed")
    lines = out.getvalue().splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)


def test_without_systemd_the_human_format_with_timestamps(restore_root) -> None:
    out = io.StringIO()
    logsetup.setup("info", stream=out, journal=False)
    logging.getLogger("xenpbr.daemon").critical("web is DOWN")
    line = out.getvalue().strip()
    assert not line.startswith("<")
    assert line.endswith("CRITICAL xenpbr.daemon: web is DOWN")
    assert line[:4].isdigit()  # asctime first


def test_setup_twice_does_not_double_lines(restore_root) -> None:
    out = io.StringIO()
    logsetup.setup("info", stream=out, journal=False)
    logsetup.setup("info", stream=out, journal=False)
    logging.getLogger("x").warning("once")
    assert out.getvalue().count("once") == 1


def test_journal_detected_only_when_stderr_is_the_journal_stream(tmp_path) -> None:
    with open(tmp_path / "stream", "w") as f:
        st = os.fstat(f.fileno())
        mine = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logsetup.stderr_is_journal(f, mine)
        assert not logsetup.stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:1"})
        assert not logsetup.stderr_is_journal(f, {})
        assert not logsetup.stderr_is_journal(f, {"JOURNAL_STREAM": "garbage"})
    assert not logsetup.stderr_is_journal(io.StringIO(), mine)  # no file descriptor


def test_setup_detects_the_journal(restore_root, tmp_path, monkeypatch) -> None:
    with open(tmp_path / "stream", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logsetup.setup("info", stream=f)
        logging.getLogger("xenpbr.daemon").critical("web is DOWN")
    assert (tmp_path / "stream").read_text() == "<2>xenpbr.daemon: web is DOWN\n"
