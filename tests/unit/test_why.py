"""``xenpbr status`` says why a domain has no image (xenpbr/why.py), from what dom0
can read in xenstore: the guest's own notes and xenpbrd's published refusals."""

from __future__ import annotations

import pytest

from tests.unit.test_guest_agent import DOMID
from xenpbr import why
from xenpbr.guestproto.wire import AgentProblem
from xenpbr.xenstore import FakeXenstore, FakeXenstoreServer


@pytest.fixture
def server() -> FakeXenstoreServer:
    server = FakeXenstoreServer()
    server.create_domain(DOMID, name="web")
    return server


def guest_writes(server: FakeXenstoreServer, key: str, value: str | bytes) -> None:
    with FakeXenstore(server, domid=DOMID) as guest:
        guest.write(key, value)


def reason(server: FakeXenstoreServer, name: str = "web",
           refusals: dict[str, int] | None = None) -> str:
    with server.connect(0) as dom0:
        return why.no_image_reason(dom0, name, refusals or {})


def test_a_domain_that_is_not_running(server) -> None:
    assert reason(server, "db") == why.NOT_RUNNING


def test_a_guest_whose_agent_never_spoke(server) -> None:
    assert reason(server) == why.SILENT
    assert "not installed" in why.SILENT and "xenpbr-phase@" in why.SILENT


def test_a_broken_agent_config_is_named_with_its_first_error(server) -> None:
    note = AgentProblem("config", "app", "/etc/xenpbr/agent.conf: unknown key 'step_timout'")
    guest_writes(server, "data/xenpbr/problem", note.encode())
    guest_writes(server, "data/xenpbr/agent", "0.9.0 812")  # the problem wins
    text = reason(server, refusals={"hazard": 1})
    assert text.startswith("its agent config does not validate (phase app: ")
    assert "unknown key" in text and "salvaged without images" in text


def test_a_guest_without_python(server) -> None:
    guest_writes(server, "data/xenpbr/problem", "no-python kernel python3 not found")
    assert reason(server).startswith("Python cannot run the agent (phase kernel: ")


def test_refused_captures_and_a_running_agent(server) -> None:
    guest_writes(server, "data/xenpbr/agent", "0.9.0 812")
    assert reason(server, refusals={"hazard": 2}) == why.REFUSED
    assert reason(server) == "agent 0.9.0 (pid 812) runs; no capture has finished yet"


@pytest.mark.parametrize("hostile", [b"config app \x1b[31mred", b"config ../x detail",
                                     b"panic app detail", b"config app " + b"x" * 300])
def test_malformed_guest_notes_are_ignored(server, hostile: bytes) -> None:
    guest_writes(server, "data/xenpbr/problem", hostile)
    assert reason(server) == why.SILENT
