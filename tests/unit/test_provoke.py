"""Provoked (LKDTM) faults: the shared format, the guest's listener and dom0's request,
over the fake xenstore and a file standing in for LKDTM's DIRECT (the real run:
tests/lab/test_provoke_real.py)."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpbr import cli
from xenpbr.faults.provoke import (
    ProvokeNotTaken,
    ProvokeRefused,
    offered,
    provoke,
)
from xenpbr.guestproto.provoke import (
    MAX_OFFER_BYTES,
    OFFER_KEY,
    REQUEST_KEY,
    TAKEN_KEY,
    ProvokeMalformed,
    ProvokeRequest,
    Taken,
    TakenState,
    encode_offer,
    parse_offer,
    parse_request,
    parse_taken,
)
from tests.unit.xenstore_waits import InThread, prepared_server, wait_for
from xenpbr.xenstore.errors import PermissionDenied
from xenpbr.xenstore.fake import FakeXenstore, FakeXenstoreServer
from xenpbr_agent import AgentError
from xenpbr_agent import cli as agent_cli
from xenpbr_agent.provoke import LIST_HEADER, Listener, listen, offered_types

DOMID = 7
HOME = f"/local/domain/{DOMID}"
TYPES = ["PANIC", "BUG", "WARNING", "SOFTLOCKUP"]


# -- the format --------------------------------------------------------------------------


def test_an_offer_round_trips_and_drops_repeats() -> None:
    assert parse_offer(encode_offer(TYPES).encode()) == tuple(TYPES)
    assert parse_offer(b"BUG BUG  WARNING\n") == ("BUG", "WARNING")


@pytest.mark.parametrize("raw, what", [
    (b"bug", "no LKDTM type name"),
    (b"BUG; rm -rf /", "no LKDTM type name"),
    ("BÜG".encode(), "not ASCII"),
    (b"A" * (MAX_OFFER_BYTES + 1), "more than"),
    (b" ".join(b"T%d" % i for i in range(161)), "161 types"),
    (b"X" * 41, "no LKDTM type name"),
])
def test_a_hostile_offer_is_refused_with_what_was_wrong(raw: bytes, what: str) -> None:
    with pytest.raises(ProvokeMalformed, match=what):
        parse_offer(raw)


def test_requests_and_answers_round_trip() -> None:
    request = ProvokeRequest(42, "BUG")
    assert parse_request(request.encode().encode()) == request
    taken = Taken(42, "BUG", TakenState.RETURNED)
    assert parse_taken(taken.encode().encode()) == taken


@pytest.mark.parametrize("raw", [b"BUG", b"0 BUG", b"-1 BUG", b"2147483648 BUG", b"1 BUG x",
                                 b"1 bug", b"01x BUG", b"9" * 70])
def test_a_malformed_request_is_refused(raw: bytes) -> None:
    with pytest.raises(ProvokeMalformed):
        parse_request(raw)


@pytest.mark.parametrize("raw", [b"1 BUG", b"1 BUG done", b"x BUG started"])
def test_a_malformed_answer_is_refused(raw: bytes) -> None:
    with pytest.raises(ProvokeMalformed):
        parse_taken(raw)


# -- the guest's listener ----------------------------------------------------------------


@pytest.fixture
def server() -> FakeXenstoreServer:
    return prepared_server(DOMID)


@pytest.fixture
def direct(tmp_path: Path) -> Path:
    """A stand-in for DIRECT: lists the types when read; what the listener writes replaces
    the list (a real DIRECT runs it)."""
    path = tmp_path / "DIRECT"
    path.write_text(LIST_HEADER + "\n" + "\n".join(TYPES) + "\n")
    return path


def Running(server: FakeXenstoreServer, direct: Path) -> InThread:
    """The listener in a thread, as domain DOMID, until the block ends."""
    return InThread(lambda stop: listen(lambda: FakeXenstore(server, domid=DOMID), direct,
                                        stop))


@pytest.fixture
def listening(server: FakeXenstoreServer, direct: Path) -> Iterator[Running]:
    with Running(server, direct) as running:
        wait_for(server, f"{HOME}/{OFFER_KEY}")
        yield running


def test_the_listener_offers_what_lkdtm_lists(server, listening) -> None:
    assert wait_for(server, f"{HOME}/{OFFER_KEY}") == b"PANIC BUG WARNING SOFTLOCKUP"


def test_a_request_is_taken_then_written_to_direct(server, direct, listening) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", "5 WARNING")
    wait_for(server, f"{HOME}/{TAKEN_KEY}", b"5 WARNING returned")
    assert direct.read_text() == "WARNING"


def test_a_request_that_was_there_before_the_listener_is_never_run(server, direct) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", "5 BUG")
    with Running(server, direct):
        wait_for(server, f"{HOME}/{OFFER_KEY}")
        with server.connect(0) as dom0:
            dom0.write(f"{HOME}/{REQUEST_KEY}", "6 WARNING")
        wait_for(server, f"{HOME}/{TAKEN_KEY}", b"6 WARNING returned")
    assert direct.read_text() == "WARNING"


def test_a_type_not_offered_is_answered_failed_and_not_written(server, direct,
                                                                 listening) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", "9 HARDLOCKUP")
    wait_for(server, f"{HOME}/{TAKEN_KEY}", b"9 HARDLOCKUP failed")
    assert direct.read_text().startswith(LIST_HEADER)


def test_a_malformed_request_is_ignored(server, direct, listening) -> None:
    with server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", "BUG now")
        dom0.write(f"{HOME}/{REQUEST_KEY}", "10 WARNING")
    wait_for(server, f"{HOME}/{TAKEN_KEY}", b"10 WARNING returned")


def test_a_write_the_kernel_refuses_is_answered_failed(server, direct) -> None:
    listener = Listener(TYPES, direct.parent)  # a directory: open() fails
    with server.connect(DOMID) as guest, server.connect(0) as dom0:
        dom0.write(f"{HOME}/{REQUEST_KEY}", "11 BUG")
        listener.last = b""
        listener._handle(guest, b"11 BUG")
        assert guest.read(TAKEN_KEY) == b"11 BUG failed"


def test_no_guest_process_can_forge_a_request(server) -> None:
    with server.connect(DOMID) as guest, pytest.raises(PermissionDenied):
        guest.write(REQUEST_KEY, "1 BUG")


def test_a_kernel_without_lkdtm_is_an_error_that_says_what_to_load(tmp_path) -> None:
    with pytest.raises(AgentError, match=r"no LKDTM \(load the lkdtm module"):
        offered_types(tmp_path / "missing")
    other = tmp_path / "other"
    other.write_text("hello\n")
    with pytest.raises(AgentError, match="does not list"):
        offered_types(other)


def test_the_agent_command_exits_2_without_lkdtm(tmp_path, server, capsys) -> None:
    code = agent_cli.main(["provoke-listener", "--direct", str(tmp_path / "none")],
                          xs_factory=lambda: FakeXenstore(server, domid=DOMID))
    assert code == 2
    assert "no LKDTM" in capsys.readouterr().err


# -- dom0's request ----------------------------------------------------------------------


def test_dom0_refuses_a_guest_that_offers_nothing_and_writes_nothing(server) -> None:
    with server.connect(0) as dom0:
        with pytest.raises(ProvokeRefused, match="provoke-listener"):
            provoke(dom0, DOMID, "web", "BUG", alive=lambda: True)
        assert dom0.read_or(f"{HOME}/{REQUEST_KEY}", None) is None


def test_dom0_refuses_a_type_not_offered_naming_those_that_are(server) -> None:
    with server.connect(DOMID) as guest:
        guest.write(OFFER_KEY, "BUG WARNING")
    with server.connect(0) as dom0:
        with pytest.raises(ProvokeRefused, match="no SOFTLOCKUP: it offers BUG, WARNING"):
            provoke(dom0, DOMID, "web", "SOFTLOCKUP", alive=lambda: True)
        assert dom0.read_or(f"{HOME}/{REQUEST_KEY}", None) is None


def test_dom0_refuses_a_garbled_offer(server) -> None:
    with server.connect(DOMID) as guest:
        guest.write(OFFER_KEY, "BUG\x1b[2J")
    with server.connect(0) as dom0, pytest.raises(ProvokeRefused, match="not usable"):
        offered(dom0, DOMID, "web")


def test_dom0_waits_until_the_agent_takes_it(server, listening) -> None:
    with server.connect(0) as dom0:
        done = provoke(dom0, DOMID, "web", "WARNING", alive=lambda: True,
                       rng=random.Random(1))
    assert done.taken is not None and done.taken.id == done.request.id
    assert done.taken.state in (TakenState.STARTED, TakenState.RETURNED)
    assert done.taken_at >= done.requested_at


def test_a_request_not_taken_in_time_is_withdrawn(server) -> None:
    with server.connect(DOMID) as guest:
        guest.write(OFFER_KEY, "BUG")
    now = iter(range(0, 1000, 50))
    with server.connect(0) as dom0:
        with pytest.raises(ProvokeNotTaken, match="withdrawn"):
            provoke(dom0, DOMID, "web", "BUG", wait=120, alive=lambda: True,
                    clock=lambda: float(next(now)))
        assert dom0.read_or(f"{HOME}/{REQUEST_KEY}", None) is None


def test_a_domain_that_goes_away_first_ends_the_wait(server) -> None:
    with server.connect(DOMID) as guest:
        guest.write(OFFER_KEY, "BUG")
    with server.connect(0) as dom0:
        done = provoke(dom0, DOMID, "web", "BUG", alive=lambda: False)
    assert done.taken is None


@pytest.mark.parametrize("fault", ["lkdtm:bug", "lkdtm:", "lkdtm:BUG;x", "lkdtm"])
def test_the_cli_refuses_an_lkdtm_fault_that_is_no_type(fault: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--state-dir", str(tmp_path), "inject", "web", "--fault", fault])
    assert done.value.code == 2
    assert "is no fault kind" in capsys.readouterr().err


@pytest.fixture
def cli_state(tmp_path, monkeypatch, server):
    """``xenpbr inject`` wired to the fake xenstore, a fake xl that knows the domid and a
    registered domain ``web``."""
    import os
    import stat

    import xenpbr.xenstore
    from xenpbr.state import StateDir
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "xl").write_text(f'#!/bin/sh\n[ "$1" = domid ] && echo {DOMID}\nexit 0\n')
    (bindir / "xl").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(xenpbr.xenstore, "XenstoreClient",
                        lambda: FakeXenstore(server, domid=0))
    state = StateDir(tmp_path / "s")
    state.register("web", {"name": "web"}, "", "c")
    return state


def test_inject_lkdtm_json_matches_the_contract(cli_state, listening, capsys) -> None:
    import json

    from tests.unit.test_cli_json_contract import check, contract
    assert cli.main(["--state-dir", str(cli_state.root), "inject", "web",
                     "--fault", "lkdtm:WARNING", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    seen: set[str] = set()
    check(out, contract()["inject"][1], "", seen)
    assert {"provoked.id", "provoked.taken_after_s", "provoked.taken"} <= seen
    assert out["fault"] == "lkdtm:WARNING" and out["change"] is None
    assert cli_state.faults("web")[-1]["provoked"] == out["provoked"]  # on record


def test_inject_lkdtm_says_what_is_offered_when_refused(cli_state, listening,
                                                       capsys) -> None:
    code = cli.main(["--state-dir", str(cli_state.root), "inject", "web",
                     "--fault", "lkdtm:HARDLOCKUP"])
    assert code == 1
    assert "offers PANIC, BUG, WARNING, SOFTLOCKUP" in capsys.readouterr().err
    assert cli_state.faults("web") == []
