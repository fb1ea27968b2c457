"""Recovery's resurrection step: the extractor reads the crashed domain before the destroy,
only for a crash or a watchdog, and nothing it does stops the recovery."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.unit.test_recovery import FakeXen, domain_with_an_image_per_phase
from xenpbr.recovery import Recovery
from xenpbr.timeline import Timeline


class RecordingExtractor:
    """An extractor that notes when it ran (against the toolstack's calls) and can fail."""

    def __init__(self, xen: FakeXen, fail: BaseException | None = None) -> None:
        self.xen, self.fail = xen, fail
        self.seen: list[tuple[str, int, int]] = []

    def extract(self, name: str, domid: int, timeline: Timeline) -> None:
        self.seen.append((name, domid, len(self.xen.calls)))
        if self.fail is not None:
            raise self.fail
        timeline.mark("extracted", "1 app")


@pytest.fixture
def setup(tmp_path: Path):
    state = domain_with_an_image_per_phase(tmp_path)
    xen = FakeXen()
    clock = itertools.count(100.0, 0.5)
    return state, xen, lambda ex: Recovery(state, xen, xen, xen, clock=lambda: next(clock),
                                           extractor=ex)


@pytest.mark.parametrize("trigger", ["crash", "watchdog"])
def test_extraction_runs_before_the_crashed_domain_is_destroyed(setup, trigger: str) -> None:
    state, xen, make = setup
    extractor = RecordingExtractor(xen)
    t = make(extractor).recover("g", trigger, domid=42).timeline
    assert extractor.seen == [("g", 42, 0)]  # no toolstack call before it
    names = [m.name for m in t.marks]
    assert names.index("image_chosen") < names.index("extracted") < names.index("destroyed")
    assert state.latest_history("g").at("extracted") is not None  # saved with the timeline


def test_no_extraction_for_an_operator_reboot_or_without_a_domid(setup) -> None:
    _, xen, make = setup
    extractor = RecordingExtractor(xen)
    recovery = make(extractor)
    recovery.recover("g", "operator", domid=42)
    recovery.recover("g", "crash")
    recovery.recover("g", "resume", domid=42)
    assert extractor.seen == []


@pytest.mark.parametrize("failure", [RuntimeError("bug in extraction"), MemoryError(),
                                     OSError(5, "I/O error")])
def test_an_extractor_failure_is_logged_marked_and_recovery_goes_on(
        setup, failure: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    state, xen, make = setup
    result = make(RecordingExtractor(xen, fail=failure)).recover("g", "crash", domid=42)
    assert result.timeline.outcome == "recovered" and result.path == "phase:app"
    assert ("destroy", "g") in xen.calls and ("unpause", result.domid) in xen.calls
    [mark] = [m for m in result.timeline.marks if m.name == "extracted"]
    assert mark.detail.startswith("failed: ")
    assert "resurrection failed" in caplog.text


def test_without_an_extractor_recovery_is_unchanged(setup) -> None:
    _, xen, make = setup
    t = make(None).recover("g", "crash", domid=42).timeline
    assert "extracted" not in [m.name for m in t.marks]
    assert xen.calls[0] == ("destroy", "g")


def test_the_resurrection_summary_survives_the_timeline_json_round_trip() -> None:
    from xenpbr.timeline import AppResurrection
    t = Timeline("g", "crash")
    t.mark("crash_seen", now=1.0)
    t.mark("extracted", "kv", now=1.25)
    t.resurrection = [AppResurrection("kv", 1, 12, {"crc": 2, "torn": 1}, 8192, 0.004)]
    back = Timeline.from_json(t.to_json())
    assert back.resurrection == t.resurrection
    assert back.since_crash()["extracted"] == 0.25
    assert back.resurrection[0].brief() == ("kv: 1 region, 12 records, rejected crc x2, "
                                            "torn x1, 8192 B, 0.004 s")
    assert Timeline.from_json({"domain": "g", "trigger": "crash"}).resurrection == []
