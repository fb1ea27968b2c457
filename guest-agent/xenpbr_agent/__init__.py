"""xenpbr's guest agent: marks boot-phase boundaries for phase-based reboot.

Runs inside a Xen PV guest (standard library plus xenpbr's xenstore client and wire
format, :mod:`xenpbr.protocol`). ``xenpbr-agent phase NAME`` writes a boundary request
to ``data/xenpbr/request``, waits for dom0's ack in ``control/xenpbr/ack`` and runs the
configured steps; see ``guest-agent/README.md`` and ``docs/phase-protocol.md``.
"""

from xenpbr.errors import XenpbrError

__version__ = "0.2.0"

#: Exit codes of ``xenpbr-agent`` (docs/phase-protocol.md, "Guest agent").
EXIT_OK = 0          # captured, skipped, or restored (post-restore steps done)
EXIT_USAGE = 2       # bad command line, bad config, no xenstore
EXIT_REFUSED = 3     # dom0 answered refused:<reason>
EXIT_TIMEOUT = 4     # no ack for our seq before the timeout
EXIT_STEP_FAILED = 5  # a configured command failed (the boundary verdict is still printed)


class AgentError(XenpbrError):
    """The agent cannot do what it was asked; the message says what to fix."""


class ConfigError(AgentError):
    """The agent's config file is missing or wrong."""
