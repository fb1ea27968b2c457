"""The host end of the lab's control channel: a request/response client over a socket.

One reader thread routes responses to waiting callers by request id (the shape of pyxs's
router), so callers in several threads can have requests in flight at once.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ChannelError, CommandFailed, LabTimeout
from .wire import FrameError, FrameReader, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """What a command run in dom0 returned."""

    argv: str | list[str]
    rc: int
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool

    def check(self) -> "RunResult":
        """Raise :class:`CommandFailed` unless the command exited 0."""
        if self.rc != 0 or self.timed_out:
            shown = self.argv if isinstance(self.argv, str) else " ".join(self.argv)
            rc = self.rc if not self.timed_out else -9
            raise CommandFailed(shown + (" (timed out)" if self.timed_out else ""), rc,
                                self.stdout, self.stderr)
        return self


class ControlChannel:
    """Requests to the dom0 control server over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ids = itertools.count(1)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._route, daemon=True, name="ctl-reader")
        self._reader.start()

    @classmethod
    def connect_unix(cls, path: Path, timeout: float = 10.0) -> "ControlChannel":
        """Connect to QEMU's chardev socket for the channel, retrying until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock)
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ChannelError(f"cannot connect to control socket {path}: {exc}") from exc
                time.sleep(0.1)

    def _route(self) -> None:
        reader = FrameReader(self._recv)
        try:
            while (frame := reader.next_frame()) is not None:
                header, payload = frame
                rid = header.get("id")
                with self._lock:
                    fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
                if fut is not None:
                    fut.set_result((header, payload))
        except (OSError, FrameError) as exc:
            log.debug("control channel reader stopped: %s", exc)
        self._fail_all(ChannelError("control channel to dom0 closed"))

    def _recv(self, n: int) -> bytes:
        try:
            return self._sock.recv(n)
        except OSError:
            return b""

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    def request(self, header: dict[str, Any], payload: bytes = b"",
                timeout: float = 60.0) -> tuple[dict[str, Any], bytes]:
        """Send one request and wait for its response (raising on a reported error)."""
        rid = next(self._ids)
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise ChannelError("control channel is closed")
            self._pending[rid] = fut
        try:
            self._sock.sendall(encode({"id": rid, **header}, payload))
            reply, data = fut.result(timeout=timeout)
        except FutureTimeout:
            with self._lock:
                self._pending.pop(rid, None)
            raise LabTimeout(f"dom0 did not answer {header.get('op')} within {timeout:.0f} s")
        except OSError as exc:
            raise ChannelError(f"control channel write failed: {exc}") from exc
        if "error" in reply:
            raise ChannelError(f"dom0 failed {header.get('op')}: {reply['error']}")
        return reply, data

    def ping(self, timeout: float = 5.0) -> float:
        """Dom0's uptime in seconds (proves the channel and the server work)."""
        return float(self.request({"op": "ping"}, timeout=timeout)[0]["uptime"])

    def run(self, argv: str | list[str], timeout: float = 120.0, stdin: bytes = b"",
            check: bool = True) -> RunResult:
        """Run ``argv`` in dom0 (a string runs under /bin/sh)."""
        reply, out = self.request({"op": "run", "argv": argv, "timeout": timeout}, stdin,
                                  timeout=timeout + 30)
        result = RunResult(argv, reply["rc"], out.decode(errors="replace"), reply["stderr"],
                           reply["elapsed"], reply["timed_out"])
        log.debug("dom0$ %s -> rc=%s in %.2f s", argv, result.rc, result.elapsed)
        return result.check() if check else result

    def put(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 300.0) -> None:
        """Write ``data`` to ``path`` in dom0 (atomically)."""
        self.request({"op": "put", "path": path, "mode": mode}, data, timeout=timeout)

    def get(self, path: str, timeout: float = 300.0) -> bytes:
        """Read the file ``path`` from dom0."""
        return self.request({"op": "get", "path": path}, timeout=timeout)[1]

    def close(self) -> None:
        """Close the socket; pending requests fail with :class:`ChannelError`."""
        with self._lock:
            self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
