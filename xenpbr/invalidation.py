"""temporary: removed when the controller branch is merged.

Re-exports, under their old names, only what ``xenpbr/daemon.py`` uses of the old
``xenpbr.invalidation`` (the daemon is being rewritten on another branch). The wire
format is now :mod:`xenpbr.guestproto.invalidation`, dom0's xenstore I/O for it
:mod:`xenpbr.guestproto.control`.
"""

from xenpbr.guestproto.control import domid_from_invalidation_token as domid_from_token
from xenpbr.guestproto.control import invalidation_path as request_path
from xenpbr.guestproto.control import invalidation_watch as watch
from xenpbr.guestproto.control import last_invalidation_answered as last_answered
from xenpbr.guestproto.control import write_invalidation_answer as write_answer
from xenpbr.guestproto.invalidation import Answer, Invalidation, parse_request

__all__ = ["Answer", "Invalidation", "domid_from_token", "last_answered", "parse_request",
           "request_path", "watch", "write_answer"]
