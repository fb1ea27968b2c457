"""Helpers for tests of the agent's listeners over the fake xenstore: run one in a
thread until the block ends, and wait for a key to take a value."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from xenpbr.xenstore.fake import FakeXenstoreServer


class InThread:
    """``target(stop)`` in a thread until the ``with`` block ends (its return value in
    ``result``)."""

    def __init__(self, target: Callable[[Callable[[], bool]], Any]) -> None:
        self.stop = threading.Event()
        self.result: list[Any] = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(target(self.stop.is_set)))

    def __enter__(self) -> InThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def wait_for(server: FakeXenstoreServer, path: str, value: bytes | None = None) -> bytes:
    """The value of *path* once it exists (and equals *value*, if given)."""
    with server.connect(0) as xs:
        xs.watch(path, "t")
        for _ in range(100):
            raw = xs.read_or(path, None)
            if raw is not None and (value is None or raw == value):
                return raw
            xs.read_watch(timeout=0.1)
    raise AssertionError(f"{path} never became {value!r}")


def prepared_server(domid: int) -> FakeXenstoreServer:
    """A fake xenstored with domain *domid* and its ``control/xenpbr`` made by dom0."""
    from xenpbr.guestproto.control import prepare_domain
    server = FakeXenstoreServer()
    server.create_domain(domid)
    with server.connect(0) as dom0:
        prepare_domain(dom0, domid)
    return server
