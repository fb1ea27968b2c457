"""dom0's liveness check (xenpbr/controller/liveness.py), the agent's heartbeat and the
config key, over the FakeHypervisor and a fake clock (the real run:
tests/lab/test_faults_real.py::test_a_silent_hang_is_caught_by_the_liveness_check)."""

from __future__ import annotations

import pytest

from xenpbr import domconfig
from xenpbr.controller.liveness import Liveness
from xenpbr.ctypes_libxc.xenctrl_structs import ShutdownReason
from xenpbr.hypervisor.fake import FakeHypervisor
from xenpbr.xenstore import XenstoreError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    hv, clock, beats = FakeHypervisor(), Clock(), {}
    domid = hv.create_domain()
    live = Liveness(hv, lambda d: beats.get(d), clock)
    live.watch(domid, "web", 30.0)
    return hv, clock, beats, domid, live


def run_for(live: Liveness, clock: Clock, seconds: float, step: float = 1.0) -> list[int]:
    hung: list[int] = []
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        hung += live.check()
    return hung


def test_a_heartbeat_that_stops_is_a_hang_after_the_timeout(setup) -> None:
    hv, clock, beats, domid, live = setup
    beats[domid] = b"1"
    assert run_for(live, clock, 30) == []  # 30 s of stillness: not yet
    assert run_for(live, clock, 2) == [domid]
    state = hv.domain_state(domid)
    assert state.shutdown and state.shutdown_reason == ShutdownReason.WATCHDOG
    assert live.watching == []


def test_a_changing_heartbeat_keeps_the_guest_alive(setup) -> None:
    hv, clock, beats, domid, live = setup
    for n in range(100):
        beats[domid] = str(n).encode()
        assert run_for(live, clock, 2) == []
    assert not hv.domain_state(domid).shutdown


def test_a_guest_that_never_beat_is_never_judged(setup) -> None:
    hv, clock, beats, domid, live = setup
    assert run_for(live, clock, 600) == [] and not hv.domain_state(domid).shutdown


def test_paused_time_and_dom0_busy_time_do_not_count(setup) -> None:
    hv, clock, beats, domid, live = setup
    beats[domid] = b"1"
    run_for(live, clock, 20)
    hv.pause(domid)
    assert run_for(live, clock, 100) == []  # a capture holds it paused
    hv.unpause(domid)
    assert run_for(live, clock, 20) == []  # the clock restarted at the unpause
    clock.now += 40  # xenpbrd was busy 40 s: nobody looked
    assert live.check() == []
    assert run_for(live, clock, 25) == []
    assert run_for(live, clock, 10) == [domid]


def test_a_vanished_domain_is_forgotten(setup) -> None:
    hv, clock, beats, domid, live = setup
    hv.destroy(domid)
    assert live.check() == [] and live.watching == []


def test_the_timeout_setting_is_checked() -> None:
    assert domconfig.liveness_timeout(domconfig.parse('name = "g"\n')) is None
    ok = 'name = "g"\non_watchdog = "phasereboot"\n'
    cfg = domconfig.parse(ok + 'xenpbr_liveness_timeout = 45\n')
    assert domconfig.liveness_timeout(cfg) == 45.0
    with pytest.raises(domconfig.ConfigError, match='needs on_watchdog = "phasereboot"'):
        domconfig.parse('name = "g"\nxenpbr_liveness_timeout = 45\n')
    for bad in ("5", '"30"', "-1", "100000"):
        with pytest.raises(domconfig.ConfigError, match="xenpbr_liveness_timeout"):
            domconfig.liveness_timeout(
                domconfig.parse(f'{ok}xenpbr_liveness_timeout = {bad}\n'))
    with pytest.raises(domconfig.ConfigError, match="xenpbr_liveness_timeout = 5"):
        domconfig.parse(ok + 'xenpbr_liveness_timeout = 5\n')  # at create/check
    with pytest.raises(domconfig.ConfigError, match="did you mean xenpbr_liveness_timeout"):
        domconfig.parse('name = "g"\nxenpbr_liveness_timout = 30\n')


class FlakyXenstore:
    """Writes succeed except the ones listed (by beat number)."""

    def __init__(self, fail: set[int], log: list[tuple[str, str]]) -> None:
        self.fail, self.log = fail, log

    def __enter__(self) -> FlakyXenstore:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, path: str, value: str) -> None:
        if int(value) in self.fail:
            raise XenstoreError(f"write {path} failed")
        self.log.append((path, value))


def test_the_agent_beats_and_reconnects_after_a_xenstore_error() -> None:
    from xenpbr_agent.heartbeat import beat
    log: list[tuple[str, str]] = []
    sleeps: list[float] = []
    opened: list[int] = []

    def factory() -> FlakyXenstore:
        opened.append(1)
        return FlakyXenstore({3}, log)

    assert beat(factory, 2.0, count=5, sleep=sleeps.append) == 4
    assert [v for _, v in log] == ["1", "2", "4", "5"]
    assert {p for p, _ in log} == {"data/xenpbr/heartbeat"}
    assert sleeps == [2.0] * 4 and len(opened) == 2


def test_the_agent_refuses_a_bad_interval(capsys) -> None:
    from xenpbr_agent.cli import main
    assert main(["heartbeat", "--interval", "0"]) == 2
    assert "--interval must be 0.5 to 60.0" in capsys.readouterr().err
