"""Why a registered domain has no image: what dom0 can tell its operator.

A guest without images is recovered by a normal reboot, so ``xenpbr status`` must not
leave the operator guessing. Dom0 knows three things about a running guest: whether its
captures were refused (xenpbrd's published counters), whether this boot's agent spoke at
all (``data/xenpbr/agent``, written by each ``phase`` run), and whether it said why it
cannot mark (``data/xenpbr/problem``: a config that does not validate, or no Python,
written by the agent's salvage or the packaged unit's shell fallback). Guest text is
shown ASCII-escaped: it is the guest's word, never acted on.
"""

from __future__ import annotations

import logging

from xenpbr.errors import XenpbrError
from xenpbr.guestproto import control
from xenpbr.guestproto.wire import escape_for_log
from xenpbr.publish import running_domid
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)

NOT_RUNNING = "the domain is not running"
SILENT = ("no agent has spoken in this boot: xenpbr-agent is not installed, its "
          "xenpbr-phase@ units are not enabled, or the guest is still booting")
REFUSED = "its captures were refused (see refusals, and xenpbrd's log for each reason)"


def no_image_reason(xs: XenstoreClient, name: str, refusals: dict[str, int]) -> str:
    """One sentence for a domain with no valid image."""
    domid = running_domid(xs, name)
    if domid is None:
        return NOT_RUNNING
    presence, problem = control.read_agent_notes(xs, domid)
    if problem is not None:
        what = ("its agent config does not validate" if problem.kind == "config"
                else "Python cannot run the agent")
        return (f"{what} (phase {problem.phase}: {escape_for_log(problem.detail, 160)}); "
                "the boot was salvaged without images")
    if refusals:
        return REFUSED
    if presence is None:
        return SILENT
    return (f"agent {presence.version} (pid {presence.pid}) runs; no capture has finished "
            "yet")


def no_image_reasons(names_without_images: list[str],
                     refusals: dict[str, dict[str, int]]) -> dict[str, str]:
    """:func:`no_image_reason` for each name ({} outside dom0 or without xenstored)."""
    if not names_without_images:
        return {}
    try:
        with XenstoreClient() as xs:
            return {n: no_image_reason(xs, n, refusals.get(n, {}))
                    for n in names_without_images}
    except (XenpbrError, OSError) as exc:
        log.debug("guest notes not readable: %s", exc)
        return {}
