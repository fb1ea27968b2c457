"""The dom0 end of the lab's control channel: run commands, put and get files.

Started by the lab's dom0 init on the virtio-serial port named ``xenpbr.ctl``. Each
request runs in its own thread so a long ``xl restore`` does not block a ``ping``;
responses carry the request id. Standard library only.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .wire import FrameError, FrameReader, encode

log = logging.getLogger("ctl_server")


class Server:
    """Serve requests read from ``fd`` and write responses back to it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._wlock = threading.Lock()

    def _read(self, n: int) -> bytes:
        while True:
            data = os.read(self.fd, n)
            if data:
                return data
            time.sleep(0.05)  # host not connected: virtio-serial reads return EOF

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        frame = memoryview(encode(header, payload))
        with self._wlock:
            while frame:
                try:
                    written = os.write(self.fd, frame)
                except OSError as exc:
                    log.warning("dropping response %s: %s", header.get("id"), exc)
                    return
                frame = frame[written:]

    def serve(self) -> None:
        reader = FrameReader(self._read)
        while True:
            try:
                frame = reader.next_frame()
            except FrameError as exc:
                log.error("bad frame: %s", exc)
                continue
            if frame is None:
                return
            threading.Thread(target=self._handle, args=frame, daemon=True).start()

    def _handle(self, header: dict[str, Any], payload: bytes) -> None:
        rid = header.get("id")
        op = header.get("op")
        try:
            handler = getattr(self, f"op_{op}")
        except AttributeError:
            self.send({"id": rid, "error": f"unknown op {op!r}"})
            return
        try:
            reply, data = handler(header, payload)
        except Exception as exc:  # report every failure to the host, keep serving
            self.send({"id": rid, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.send({"id": rid, **reply}, data)

    def op_ping(self, header: dict[str, Any], payload: bytes) -> tuple[dict, bytes]:
        with open("/proc/uptime") as f:
            return {"uptime": float(f.read().split()[0])}, b""

    def op_run(self, header: dict[str, Any], payload: bytes) -> tuple[dict, bytes]:
        argv = header["argv"]
        timeout = float(header.get("timeout", 60))
        start = time.monotonic()
        proc = subprocess.Popen(argv, shell=isinstance(argv, str), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=header.get("cwd", "/"))
        timed_out = False
        try:
            out, err = proc.communicate(payload, timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return {"rc": proc.returncode, "stderr": err.decode(errors="replace"),
                "timed_out": timed_out, "elapsed": time.monotonic() - start}, out

    def op_put(self, header: dict[str, Any], payload: bytes) -> tuple[dict, bytes]:
        path = header["path"]
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        tmp = f"{path}.ctl-tmp"
        with open(tmp, "wb") as f:
            f.write(payload)
        os.chmod(tmp, int(header.get("mode", 0o644)))
        os.replace(tmp, path)
        return {"size": len(payload)}, b""

    def op_get(self, header: dict[str, Any], payload: bytes) -> tuple[dict, bytes]:
        with open(header["path"], "rb") as f:
            data = f.read()
        return {"size": len(data)}, data


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fd = os.open(sys.argv[1], os.O_RDWR)
    log.info("serving on %s", sys.argv[1])
    Server(fd).serve()


if __name__ == "__main__":
    main()
