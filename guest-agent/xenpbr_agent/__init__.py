"""xenpbr's guest agent: marks boot-phase boundaries for phase-based reboot.

Runs inside a Xen PV guest (standard library plus xenpbr's xenstore client and wire
format, :mod:`xenpbr.guestproto.wire`). ``xenpbr-agent phase NAME`` writes a boundary
request to ``data/xenpbr/request``, waits for dom0's ack in ``control/xenpbr/ack`` and runs the
configured steps; see ``guest-agent/README.md`` and ``docs/phase-protocol.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

from xenpbr.errors import XenpbrError

__version__ = "0.3.0"

#: Exit codes of ``xenpbr-agent`` (docs/phase-protocol.md, "Guest agent").
EXIT_OK = 0          # captured, skipped, or restored (post-restore steps done)
EXIT_USAGE = 2       # bad command line, bad config (even when salvaged), no xenstore
EXIT_REFUSED = 3     # dom0 answered refused:<reason>
EXIT_TIMEOUT = 4     # no ack for our seq before the timeout
EXIT_STEP_FAILED = 5  # a configured command failed (the boundary verdict is still printed)


class AgentError(XenpbrError):
    """The agent cannot do what it was asked; the message says what to fix."""


class ConfigError(AgentError):
    """The agent's config file is missing or wrong.

    ``problems`` lists every error found (``xenpbr-agent check`` shows them all, so an
    operator fixes a file in one pass instead of one error per run); the message is
    the first one, followed by the count of the others.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
        more = len(self.problems) - 1
        super().__init__(message + (f" (and {more} more: run 'xenpbr-agent check')"
                                    if more else ""))

    @classmethod
    def of(cls, problems: Sequence[str]) -> ConfigError:
        """One error carrying all of ``problems`` (at least one)."""
        return cls(problems[0], problems)
