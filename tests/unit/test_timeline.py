"""Recovery timelines: marks, breakdown, downtime, JSON round trip."""

from __future__ import annotations

import json

import pytest

from xenpbr.timeline import Timeline


def test_breakdown_and_downtime_are_relative_to_the_crash() -> None:
    t = Timeline("g1", "crash")
    t.mark("crash_seen", now=100.0)
    t.mark("image_chosen", "app", now=100.2)
    t.mark("restore_finished", now=103.5)
    t.mark("guest_ack", now=104.0)
    assert t.since_crash() == {"crash_seen": 0.0, "image_chosen": 0.2,
                               "restore_finished": 3.5, "guest_ack": 4.0}
    assert t.downtime() == 4.0


def test_unknown_mark_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown timeline mark"):
        Timeline("g", "crash").mark("lunch")


def test_json_round_trip() -> None:
    t = Timeline("g1", "watchdog", method="phase:app", outcome="recovered",
                 attempts=["phase:app"], skipped=["x: stale"])
    t.mark("crash_seen", now=1.0)
    t.mark("restore_finished", now=2.5)
    data = json.loads(json.dumps(t.to_json()))
    back = Timeline.from_json(data)
    assert back == t and data["downtime_s"] == 1.5


def test_downtime_unknown_until_something_finished() -> None:
    t = Timeline("g", "crash")
    assert t.downtime() is None
    t.mark("crash_seen", now=5.0)
    assert t.downtime() is None
