"""A guest asks dom0 to drop its images from a phase on (xenpbr.guestproto.invalidation)."""

from __future__ import annotations

import threading

import pytest

from tests.unit.test_daemon import request, settle, world  # noqa: F401 (fixture)
from xenpbr.guestproto import control, invalidation
from xenpbr.guestproto.invalidation import Answer, Invalidation, parse_answer, parse_request
from xenpbr_agent.config import parse_config
from xenpbr_agent.invalidate import request_invalidation


@pytest.mark.parametrize("raw, parsed", [
    (b"1 app", Invalidation(1, "app")), (b"42 kernel", Invalidation(42, "kernel")),
    (b"0 app", None), (b"01 app", None), (b"1 App", None), (b"1 ../x", None),
    (b"1  app", None), (b"1 app\n", None), (b"9999999999 app", None), (b"1 " + b"a" * 60, None),
    (None, None)])
def test_requests_are_parsed_strictly(raw, parsed) -> None:
    assert parse_request(raw) == parsed


def test_answers_round_trip() -> None:
    for answer in (Answer(3, dropped=2), Answer(4, refused="unknown-phase")):
        assert parse_answer(answer.encode().encode()) == answer
    assert parse_answer(b"3 dropped:x") is None


def images(state) -> list[str]:
    return sorted(state.phases("web").images)


def booted_with_two_images(server, hv, daemon):
    """A guest whose kernel and app boundaries were captured: (domid, its connection)."""
    domid = hv.create_domain(name="web")
    settle(daemon)
    guest = server.connect(domid)
    for seq, phase in ((1, "kernel"), (2, "app")):
        guest.write("data/xenpbr/request", request(seq, phase))
        settle(daemon)
    return domid, guest


def test_dom0_drops_the_phase_and_later_ones_and_ignores_replays(world) -> None:  # noqa: F811
    server, hv, state, rec, daemon = world
    domid, guest = booted_with_two_images(server, hv, daemon)
    assert images(state) == ["app", "kernel"]
    dom0 = server.connect(0)
    guest.write(invalidation.REQUEST_KEY, b"1 app")
    settle(daemon)
    assert dom0.read(control.invalidation_answer_path(domid)) == b"1 dropped:1"
    assert images(state) == ["kernel"]
    guest.write(invalidation.REQUEST_KEY, b"1 kernel")  # a replay: ignored
    settle(daemon)
    assert images(state) == ["kernel"]
    guest.write(invalidation.REQUEST_KEY, b"2 nosuch")  # within a second: rate-limited
    settle(daemon)
    assert dom0.read(control.invalidation_answer_path(domid)) == b"2 refused:rate-limited"
    daemon.controller.invalidations.invalidated_at.clear()
    guest.write(invalidation.REQUEST_KEY, b"3 nosuch")
    settle(daemon)
    assert dom0.read(control.invalidation_answer_path(domid)) == b"3 refused:unknown-phase"
    guest.write(invalidation.REQUEST_KEY, b"4 kernel; rm -rf /")  # malformed: no answer
    settle(daemon)
    assert dom0.read(control.invalidation_answer_path(domid)) == b"3 refused:unknown-phase"
    assert images(state) == ["kernel"]


def test_the_agent_asks_and_reads_dom0s_answer(world) -> None:  # noqa: F811
    server, hv, state, rec, daemon = world
    domid, _ = booted_with_two_images(server, hv, daemon)
    stop = threading.Event()

    def dom0_loop() -> None:
        while not stop.is_set():
            daemon.turn()
            stop.wait(0.01)
    loop = threading.Thread(target=dom0_loop, daemon=True)
    loop.start()
    config = parse_config("[phase:kernel]\n[phase:app]\n")
    try:
        answer = request_invalidation(server.connect(domid), config, "kernel", timeout=10)
    finally:
        stop.set()
        loop.join(5)
    assert answer == Answer(1, dropped=2) and images(state) == []
