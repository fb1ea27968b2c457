"""``xenpbr-agent invalidate PHASE``: ask dom0 to drop this guest's images from PHASE on.

For a change that makes a phase's result different from what its image holds (an
upgraded application, a new service configuration) while the earlier phases are still
good: dom0 drops PHASE's image and every later one, and the next boot captures them
again. Bumping ``identity`` instead drops all of them. Wire: :mod:`xenpbr.guestproto.invalidation`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

from xenpbr.guestproto.invalidation import (
    ANSWER_KEY,
    REQUEST_KEY,
    Answer,
    Invalidation,
    parse_answer,
)
from xenpbr.xenstore import XenstoreClient, XenstoreError
from xenpbr_agent import AgentError
from xenpbr_agent.boundary import dom0_enabled
from xenpbr_agent.config import AgentConfig

log = logging.getLogger(__name__)


def request_invalidation(xs: XenstoreClient, config: AgentConfig, phase: str, timeout: float,
                         clock: Callable[[], float] = time.monotonic) -> Answer | None:
    """Ask dom0 to drop the images of ``phase`` and later phases; its answer, or None if
    none came within ``timeout`` seconds."""
    config.phase(phase)  # ConfigError if undeclared: dom0 would refuse it anyway
    if not dom0_enabled(xs):
        raise AgentError("dom0 has not enabled phase-based reboot for this domain: there "
                         "are no images to invalidate")
    last = parse_answer(xs.read_or(ANSWER_KEY, None))
    request = Invalidation((last.seq if last else 0) + 1, phase)
    token = f"xenpbr-agent-invalidate-{os.getpid()}-{request.seq}"
    xs.watch(ANSWER_KEY, token)  # before the write: an answer at once cannot be missed
    try:
        xs.write(REQUEST_KEY, request.encode())
        deadline = clock() + timeout
        while True:
            answer = parse_answer(xs.read_or(ANSWER_KEY, None))
            if answer is not None and answer.seq == request.seq:
                return answer
            if (remaining := deadline - clock()) <= 0:
                return None
            xs.read_watch(timeout=remaining)
    finally:
        with contextlib.suppress(XenstoreError):
            xs.unwatch(ANSWER_KEY, token)
