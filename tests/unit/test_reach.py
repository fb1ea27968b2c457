"""Reach counts: the shared format, the guest's kprobe counter over a directory standing in
for tracefs, and dom0's request, over the fake xenstore (the real run: the fault
campaign's silent text and operand faults, docs/faults.md)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpbr.faults import reach
from xenpbr.guestproto.reach import (
    ANSWER_KEY,
    READY_KEY,
    REQUEST_KEY,
    Reach,
    ReachMalformed,
    ReachRequest,
    ReachState,
    parse_answer,
    parse_request,
)
from tests.unit.xenstore_waits import InThread, prepared_server, wait_for
from xenpbr.xenstore.errors import PermissionDenied
from xenpbr.xenstore.fake import FakeXenstore, FakeXenstoreServer
from xenpbr_agent import cli as agent_cli
from xenpbr_agent.reach import GROUP, Counter, Kprobes, count, find_tracefs

DOMID = 7
HOME = f"/local/domain/{DOMID}"
ADDRESS = 0xFFFFFFFF8156B150


# -- the format --------------------------------------------------------------------------


def test_requests_and_answers_round_trip() -> None:
    request = ReachRequest(42, ADDRESS)
    assert request.encode() == "42 0xffffffff8156b150"
    assert parse_request(request.encode().encode()) == request
    for answer in (Reach(42, ReachState.COUNTING, hits=0),
                   Reach(42, ReachState.COUNTING, hits=2**64 - 1),
                   Reach(42, ReachState.REFUSED, reason="EILSEQ")):
        assert parse_answer(answer.encode().encode()) == answer


@pytest.mark.parametrize("raw, what", [
    (b"1 0x1000", "not a kernel address"),
    (b"1 ffffffff8156b150", "expected"),
    (b"0 0xffffffff8156b150", "id"),
    (b"1 0xffffffff8156b150 x", "expected"),
    (b"1 0xFFFFFFFF8156B150", "expected"),
    (b"1 0x1ffffffff8156b150", "expected"),
    (b"9" * 100, "more than"),
])
def test_a_malformed_request_is_refused(raw: bytes, what: str) -> None:
    with pytest.raises(ReachMalformed, match=what):
        parse_request(raw)


@pytest.mark.parametrize("raw, what", [
    (b"1 counting -1", "not a count"),
    (b"1 counting 18446744073709551616", "not a count"),
    (b"1 counting", "expected"),
    (b"1 lying 3", "expected"),
    (b"1 refused \x1b[2J", "reason"),
    ("1 refused ÉÉ".encode(), "not ASCII"),
    (b"1 refused " + b"E" * 41, "reason"),
])
def test_a_hostile_answer_is_refused_with_what_was_wrong(raw: bytes, what: str) -> None:
    with pytest.raises(ReachMalformed, match=what):
        parse_answer(raw)


# -- the guest's counter -----------------------------------------------------------------


class FakeTracefs:
    """A directory standing in for tracefs: a probe line appended to kprobe_events makes
    its ``enable`` file (as the kernel does); the test sets the hits kprobe_profile shows.
    An address in *refuse* is refused as the kernel refuses an instruction it cannot
    step (EILSEQ)."""

    def __init__(self, root: Path, refuse: tuple[int, ...] = ()) -> None:
        self.root = root
        self.refuse = refuse
        self.hits: dict[str, int] = {}
        (root / "kprobe_profile").write_text("")
        (root / "kprobe_events").write_text("")

    def kernel_reacts(self) -> None:
        for line in (self.root / "kprobe_events").read_text().splitlines():
            if line.startswith("p:"):
                name = line.split()[0][2:].split("/")[1]
                (self.root / "events" / GROUP / name).mkdir(parents=True, exist_ok=True)
                (self.root / "events" / GROUP / name / "enable").touch()
                self.hits.setdefault(name, 0)
        (self.root / "kprobe_profile").write_text("".join(
            f"  {name:<44} {hits:>15} {0:>15}\n" for name, hits in self.hits.items()))


class ReactingKprobes(Kprobes):
    """Kprobes over a FakeTracefs that reacts to each write as the kernel would."""

    def __init__(self, fake: FakeTracefs) -> None:
        super().__init__(fake.root)
        self.fake = fake

    def _append(self, line: str) -> None:
        if line.startswith("p:") and int(line.split()[1], 16) in self.fake.refuse:
            raise OSError(84, "Invalid or incomplete multibyte or wide character")
        super()._append(line)
        self.fake.kernel_reacts()


@pytest.fixture
def tracefs(tmp_path: Path) -> FakeTracefs:
    return FakeTracefs(tmp_path, refuse=(ADDRESS + 1,))


def test_a_counter_is_armed_and_enabled_and_replaced_by_the_next(tracefs) -> None:
    probes = ReactingKprobes(tracefs)
    assert probes.arm(ReachRequest(5, ADDRESS)) is None
    assert f"p:{GROUP}/r5 {ADDRESS:#x}" in (tracefs.root / "kprobe_events").read_text()
    assert (tracefs.root / "events" / GROUP / "r5" / "enable").read_text() == "1\n"
    tracefs.hits["r5"] = 3
    tracefs.kernel_reacts()
    assert probes.hits() == 3
    assert probes.arm(ReachRequest(6, ADDRESS)) is None
    events = (tracefs.root / "kprobe_events").read_text()
    assert f"-:{GROUP}/r5" in events  # the old one removed, after being disabled
    assert (tracefs.root / "events" / GROUP / "r5" / "enable").read_text() == "0\n"
    assert probes.event == "r6"


def test_a_probe_the_kernel_refuses_is_answered_with_its_errno_name(tracefs) -> None:
    probes = ReactingKprobes(tracefs)
    assert probes.arm(ReachRequest(5, ADDRESS + 1)) == "EILSEQ"
    assert probes.event is None and probes.hits() is None


def test_tracefs_is_found_where_kprobe_events_is(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "kprobe_events").touch()
    assert find_tracefs((str(tmp_path / "a"), str(tmp_path / "b"))) == tmp_path / "b"
    assert find_tracefs((str(tmp_path / "a"),)) is None


@pytest.fixture
def server() -> FakeXenstoreServer:
    return prepared_server(DOMID)


class Running(InThread):
    """A counter in a thread, as domain DOMID, until the block ends."""

    def __init__(self, server: FakeXenstoreServer, counter: Counter) -> None:
        self.counter = counter
        super().__init__(lambda stop: self._serve(server, stop))

    def _serve(self, server: FakeXenstoreServer, stop) -> None:  # type: ignore[no-untyped-def]
        with FakeXenstore(server, domid=DOMID) as xs:
            self.counter.serve(xs, stop)


@pytest.fixture
def counting(server, tracefs) -> Iterator[Running]:
    with Running(server, Counter(ReactingKprobes(tracefs))) as running:
        wait_for(server, f"{HOME}/{READY_KEY}", b"kprobes")
        yield running


def test_the_counter_answers_with_its_count_as_it_changes(server, tracefs,
                                                          counting) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", ReachRequest(9, ADDRESS).encode())
    wait_for(server, f"{HOME}/{ANSWER_KEY}", b"9 counting 0")
    tracefs.hits["r9"] = 12
    tracefs.kernel_reacts()
    wait_for(server, f"{HOME}/{ANSWER_KEY}", b"9 counting 12")
    assert counting.counter.armed == 1


def test_a_refused_probe_is_answered_refused(server, counting) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", ReachRequest(9, ADDRESS + 1).encode())
    wait_for(server, f"{HOME}/{ANSWER_KEY}", b"9 refused EILSEQ")


def test_a_request_there_before_the_counter_started_is_never_armed(server,
                                                                   tracefs) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", ReachRequest(3, ADDRESS).encode())
    with Running(server, Counter(ReactingKprobes(tracefs))) as running:
        wait_for(server, f"{HOME}/{READY_KEY}")
    assert running.counter.armed == 0
    assert (tracefs.root / "kprobe_events").read_text() == ""


def test_a_malformed_request_arms_nothing(server, tracefs, counting) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", "1 0x1000")
        dom0.write(f"{HOME}/{REQUEST_KEY}", ReachRequest(2, ADDRESS).encode())
    wait_for(server, f"{HOME}/{ANSWER_KEY}", b"2 counting 0")
    assert counting.counter.armed == 1


def test_without_tracefs_the_counter_says_so_and_refuses(server, tmp_path) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=count, args=(
        lambda: FakeXenstore(server, domid=DOMID), (str(tmp_path / "none"),), stop.is_set))
    thread.start()
    try:
        wait_for(server, f"{HOME}/{READY_KEY}", b"no-tracefs")
        with server.connect(0) as dom0:
            dom0.write(f"{HOME}/{REQUEST_KEY}", ReachRequest(4, ADDRESS).encode())
        wait_for(server, f"{HOME}/{ANSWER_KEY}", b"4 refused no-tracefs")
    finally:
        stop.set()
        thread.join(10)


def test_no_guest_process_can_forge_a_request(server) -> None:
    with server.connect(DOMID) as guest, pytest.raises(PermissionDenied):
        guest.write(REQUEST_KEY, ReachRequest(1, ADDRESS).encode())


def test_the_agent_command_is_there() -> None:
    with pytest.raises(SystemExit):
        agent_cli._parser().parse_args(["reach-counter", "--help"])


# -- dom0's request ----------------------------------------------------------------------


def test_dom0_asks_nothing_of_a_guest_without_a_counter(server) -> None:
    with server.connect(0) as dom0:
        got = reach.request(dom0, DOMID, ADDRESS)
        assert dom0.read_or(f"{HOME}/{REQUEST_KEY}", None) is None
    assert got["state"] == "not-counted" and "reach-counter" in got["reason"]


def test_dom0_asks_nothing_of_a_kernel_that_cannot_count(server) -> None:
    with server.connect(DOMID) as guest:
        guest.write(READY_KEY, "no-tracefs")
    with server.connect(0) as dom0:
        got = reach.request(dom0, DOMID, ADDRESS)
        assert dom0.read_or(f"{HOME}/{REQUEST_KEY}", None) is None
    assert got["state"] == "not-counted" and "kprobe_events" in got["reason"]


def test_dom0_records_the_counter_and_reads_its_count_later(server, tracefs,
                                                            counting) -> None:
    with server.connect(0) as dom0:
        asked = reach.request(dom0, DOMID, ADDRESS)
        assert asked["state"] == "counting" and asked["hits"] == 0
        assert asked["address"] == f"{ADDRESS:#x}" and asked["reason"] is None
        tracefs.hits[f"r{asked['id']}"] = 7
        tracefs.kernel_reacts()
        wait_for(server, f"{HOME}/{ANSWER_KEY}", f"{asked['id']} counting 7".encode())
        assert reach.current(dom0, DOMID, asked) == {**asked, "hits": 7, "stale": False}


def test_a_request_not_answered_in_time_is_withdrawn(server) -> None:
    with server.connect(DOMID) as guest:
        guest.write(READY_KEY, "kprobes")
    now = iter(range(0, 1000, 10))
    with server.connect(0) as dom0:
        got = reach.request(dom0, DOMID, ADDRESS, wait=30, clock=lambda: float(next(now)),
                            sleep=lambda s: None)
        assert dom0.read_or(f"{HOME}/{REQUEST_KEY}", None) is None
    assert got["state"] == "not-counted" and "within 30 s" in got["reason"]


def test_a_garbled_answer_is_not_counted_and_named(server) -> None:
    with server.connect(DOMID) as guest:
        guest.write(READY_KEY, "kprobes")
        guest.write(ANSWER_KEY, "1 counting many")
    with server.connect(0) as dom0:
        got = reach.request(dom0, DOMID, ADDRESS, wait=1, sleep=lambda s: None)
    assert got["state"] == "not-counted" and "malformed" in got["reason"]


def test_an_answer_to_another_request_leaves_the_count_stale(server) -> None:
    asked = {"id": 5, "address": f"{ADDRESS:#x}", "state": "counting", "hits": 2,
             "reason": None}
    with server.connect(DOMID) as guest:
        guest.write(ANSWER_KEY, "6 counting 0")
    with server.connect(0) as dom0:
        assert reach.current(dom0, DOMID, asked) == {**asked, "stale": True}


@pytest.mark.parametrize("change, why", [
    ({"kind": "stack", "symbol": "init_thread_union+0x3e60", "old": "00"}, "stack"),
    ({"kind": "text", "symbol": "ping_queue_rcv_skb+0x0", "old": "0f1f440000"}, "ftrace"),
])
def test_what_must_not_be_counted_is_said(change, why) -> None:
    assert why in (reach.uncountable(change) or "")


def test_an_instruction_past_the_ftrace_site_may_be_counted() -> None:
    assert reach.uncountable({"kind": "operand", "symbol": "f+0x5", "old": "4885d2"}) is None
    assert reach.uncountable({"kind": "text", "symbol": "f+0x0", "old": "55"}) is None


def test_probes_are_appended_without_a_seek(tracefs, monkeypatch) -> None:
    """tracefs refuses a seek on kprobe_events (EINVAL): Python's open(..., "a") seeks to
    the end first, and so made every probe look refused in the lab. Here an open in
    append mode fails the same way; the counter must still arm."""
    import builtins
    real_open = builtins.open

    def tracefs_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if "a" in mode:
            raise OSError(22, "Invalid argument")  # what the seek to the end gets
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", tracefs_open)
    probes = ReactingKprobes(tracefs)
    assert probes.arm(ReachRequest(5, ADDRESS)) is None
    assert f"p:{GROUP}/r5" in (tracefs.root / "kprobe_events").read_text()
