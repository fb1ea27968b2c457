"""temporary: removed when the controller branch is merged.

Re-exports, under their old names, only what ``xenpbr/daemon.py`` uses of the old
``xenpbr.protocol`` (the daemon is being rewritten on another branch). Everything else
imports :mod:`xenpbr.guestproto.wire`, :mod:`~xenpbr.guestproto.request`,
:mod:`~xenpbr.guestproto.gate` or :mod:`~xenpbr.guestproto.control`.
"""

from xenpbr.guestproto.control import (
    PhaseProtocol,
    domid_from_status_token,
    domid_from_token,
    request_watch,
    status_watch,
)
from xenpbr.guestproto.gate import Outcome, RateLimit, TokenBucket
from xenpbr.guestproto.wire import BoundaryRequest, Verdict, parse_guest_status

__all__ = ["BoundaryRequest", "Outcome", "PhaseProtocol", "RateLimit", "TokenBucket",
           "Verdict", "domid_from_status_token", "domid_from_token", "parse_guest_status",
           "request_watch", "status_watch"]
