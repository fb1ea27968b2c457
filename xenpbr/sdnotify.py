"""systemd's readiness protocol (sd_notify(3)) with the standard library only.

Why: with ``Type=notify`` systemd starts the units ordered after xenpbrd only once it
really serves (its watches are set and interrupted recoveries finished), and
``systemctl status`` shows what it does. The protocol is one datagram of ``KEY=VALUE``
lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` names an
abstract socket); no new dependency is needed for that. Outside systemd the variable is
unset and every call is a no-op. A failed send is logged, never raised: readiness
reporting must not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

ENV = "NOTIFY_SOCKET"
log = logging.getLogger(__name__)


def _address(value: str) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET`` (abstract: '@' becomes a NUL byte)."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``READY=1``, ``STATUS=...``; newline separated) to systemd.
    Returns True if it was sent, False without a socket or if the send failed."""
    env = os.environ if environ is None else environ
    value = env.get(ENV, "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("%s=%r is neither a path nor an abstract name: not notified", ENV, value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", value, exc)
        return False
    return True


def ready(status: str) -> bool:
    """The service serves (``Type=notify`` start-up is complete)."""
    return notify(f"READY=1\nSTATUS={status}")


def stopping(status: str = "stopping") -> bool:
    """The service begins to shut down (SIGTERM received)."""
    return notify(f"STOPPING=1\nSTATUS={status}")
