"""xenpbrd's readiness notification (sd_notify protocol) over a real AF_UNIX socket."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from xenpbr import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def messages(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_and_stopping(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("serving 2 registered domain(s)")
    assert sdnotify.stopping()
    assert messages(notify_socket) == ["READY=1\nSTATUS=serving 2 registered domain(s)",
                                       "STOPPING=1\nSTATUS=stopping"]


def test_abstract_socket(monkeypatch) -> None:
    name = f"xenpbr-test-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_without_systemd_nothing_is_sent(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready("x")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sdnotify.ready("x")  # logged, never raised
    monkeypatch.setenv("NOTIFY_SOCKET", "relative")
    assert not sdnotify.ready("x")


def test_daemon_notifies_ready_once_serving_and_stopping_on_sigterm(
        notify_socket: socket.socket, tmp_path: Path) -> None:
    import os
    import signal

    from xenpbr.daemon import Daemon
    from xenpbr.hypervisor.fake import FakeHypervisor
    from xenpbr.images.store import ImageStore
    from xenpbr.state import StateDir
    from xenpbr.xenstore import FakeXenstoreServer

    server = FakeXenstoreServer()
    state = StateDir(tmp_path / "state")
    daemon = Daemon(state, ImageStore(state.images_root), FakeHypervisor(server),
                    server.connect(0), server.connect(0))
    seen: list[str] = []
    turn = daemon.turn

    def first_turn(ready=None) -> None:  # serving: READY=1 was sent; now a SIGTERM
        seen.extend(messages(notify_socket))
        os.kill(os.getpid(), signal.SIGTERM)
        turn(ready)

    daemon.turn = first_turn  # type: ignore[method-assign]
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        daemon.run()  # returns once the SIGTERM handler stopped the loop
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    seen.extend(messages(notify_socket))
    assert seen[0] == "READY=1\nSTATUS=serving 0 registered domain(s)"
    assert seen[1].startswith("STOPPING=1\n")
