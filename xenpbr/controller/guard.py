"""Run one domain's handler so that its failure never stops the others being served.

Separate because both the event loop (:mod:`xenpbr.daemon`) and the controller's steps
(a warm-up after a recovery) need the same rule: a deliberate error is logged in one
line, a bug with its traceback, and serving goes on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

from xenpbr.errors import XenpbrError

log = logging.getLogger(__name__)
T = TypeVar("T")


def guard(handler: Callable[[T], Any], arg: T) -> None:
    """Call ``handler(arg)``; log, never raise, what it raises."""
    try:
        handler(arg)
    except XenpbrError as exc:
        log.error("%s(%s) failed: %s", getattr(handler, "__name__", handler), arg, exc)
    except Exception:  # a bug: log it with its traceback and keep serving
        log.exception("%s(%s) crashed", getattr(handler, "__name__", handler), arg)
