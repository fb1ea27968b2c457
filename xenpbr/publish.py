"""Publish each registered domain's xenpbr state in xenstore, for automation.

Monitoring and orchestration in dom0 already speak xenstore (``xenstore-read``,
``xenstore-watch``, libxenstore bindings), so xenpbrd mirrors what it knows there, under
one documented subtree (contract: ``docs/xenstore.md``, "Published state")::

    /xenpbr/domains/<name>/status              watching | capturing | recovering |
                                               down | stopped
    /xenpbr/domains/<name>/domid               current domid ("" when none)
    /xenpbr/domains/<name>/phases              declared phases, space separated
    /xenpbr/domains/<name>/generation          phase-based reboots so far
    /xenpbr/domains/<name>/images/<phase>/id       image id
    /xenpbr/domains/<name>/images/<phase>/created  Unix time it was captured
    /xenpbr/domains/<name>/images/<phase>/valid    1, or 0 once it failed verification
    /xenpbr/domains/<name>/last-recovery/{trigger,method,outcome,downtime,finished}
    /xenpbr/domains/<name>/last-recovery/resurrection/<app>
                                               regions=1 records=12 rejected=crc:2
                                               bytes=8192 seconds=0.004
    /xenpbr/domains/<name>/resurrected/waiting applications whose resurrected data
                                               waits for the guest's confirmation
    /xenpbr/domains/<name>/resurrected/apps/<app>  waiting generation=3 |
                                               bad generation=3 reason=crc
    /xenpbr/domains/<name>/refusals/<reason>   the current domid's refused requests
                                               (reason with ':' as '-')
    /xenpbr/domains/<name>/updated             Unix time of this snapshot

Image *ages* are left to the reader (now - created): a published age would be stale the
moment it was written. Each domain's subtree is replaced in one transaction, so a reader
never sees half an update. The nodes are created by dom0 below the root, which only dom0
may read: guests cannot see other domains' state. Publishing is best effort: xenstore
trouble is logged and never stops a capture or a recovery.
"""

from __future__ import annotations

import logging
import re
import time

from xenpbr.errors import XenpbrError
from xenpbr.guestproto.resurrection import APP_NAME
from xenpbr.phases import DomainPhases
from xenpbr.state import StateDir
from xenpbr.timeline import AppResurrection, Timeline
from xenpbr.xenstore import NoSuchKey
from xenpbr.xenstore.client import Transaction, XenstoreClient

log = logging.getLogger(__name__)

ROOT = "/xenpbr/domains"
STATUSES = ("watching", "capturing", "recovering", "down", "stopped")
#: Application names come from the guest: published only if they follow the region
#: format's name rule, and at most this many (the rest: ``xenpbr history``).
_APP = APP_NAME
MAX_PUBLISHED_APPS = 32


def domain_root(name: str) -> str:
    return f"{ROOT}/{name}"


def snapshot(state: StateDir, name: str, status: str, domid: int | None,
             now: float | None = None,
             refusals: dict[str, int] | None = None,
             phases: DomainPhases | None = None,
             delivery: dict[str, str] | None = None) -> dict[str, str]:
    """The keys (relative to the domain's root) and values to publish for ``name``;
    ``phases``: its phase state if the caller holds it current (else read here);
    ``delivery``: per application, its resurrected data waiting for confirmation."""
    if status not in STATUSES:
        raise ValueError(f"unknown published status {status!r}; known: {STATUSES}")
    if phases is None:
        phases = state.phases(name)
    keys = {"status": status, "domid": "" if domid is None else str(int(domid)),
            "phases": " ".join(phases.phases), "generation": str(phases.generation),
            "updated": f"{time.time() if now is None else now:.0f}"}
    for phase, image in phases.images.items():
        keys.update({f"images/{phase}/id": image.image_id,
                     f"images/{phase}/created": f"{image.created_at:.0f}",
                     f"images/{phase}/valid": "1" if image.verified else "0"})
    for reason, count in sorted((refusals or {}).items()):
        keys[f"refusals/{refusal_key(reason)}"] = str(count)
    keys.update(delivery_keys(delivery or {}))
    last = state.latest_history(name)
    if last is not None:
        finished = last.marks[-1].wall if last.marks else 0.0
        downtime = last.downtime()
        keys.update({"last-recovery/trigger": last.trigger,
                     "last-recovery/method": last.method or "-",
                     "last-recovery/outcome": last.outcome,
                     "last-recovery/downtime": "" if downtime is None else f"{downtime:.3f}",
                     "last-recovery/finished": f"{finished:.0f}"})
        keys.update(resurrection_keys(last))
    return keys


def resurrection_line(app: AppResurrection) -> str:
    """One application's extraction in brief, ``key=value`` words (docs/xenstore.md)."""
    rejected = ",".join(f"{reason}:{n}" for reason, n in sorted(app.rejected.items()))
    return (f"regions={app.regions} records={app.records} rejected={rejected or '-'} "
            f"bytes={app.bytes} seconds={app.seconds:.3f}")


def resurrection_keys(timeline: Timeline) -> dict[str, str]:
    """``last-recovery/resurrection/<app>`` of the recovery's extraction."""
    apps = [a for a in timeline.resurrection if _APP.fullmatch(a.app)][:MAX_PUBLISHED_APPS]
    return {f"last-recovery/resurrection/{a.app}": resurrection_line(a) for a in apps}


def delivery_keys(delivery: dict[str, str]) -> dict[str, str]:
    """``resurrected/waiting`` (always) and ``resurrected/apps/<app>`` (at most
    :data:`MAX_PUBLISHED_APPS`, names checked) of the data waiting for confirmation."""
    apps = [app for app in sorted(delivery) if _APP.match(app)][:MAX_PUBLISHED_APPS]
    keys = {"resurrected/waiting": str(len(delivery))}
    keys.update({f"resurrected/apps/{app}": delivery[app] for app in apps})
    return keys


def read_delivery(xs: XenstoreClient, name: str) -> dict[str, str]:
    """The per-application delivery lines xenpbrd published for ``name`` ({} if none or
    unreadable): for ``xenpbr status`` and for :func:`refresh`, which must not drop them."""
    root = f"{domain_root(name)}/resurrected/apps"
    found: dict[str, str] = {}
    try:
        for key in xs.ls(root):
            if _APP.match(key):
                found[key] = (xs.read_or(f"{root}/{key}", b"") or b"").decode("ascii",
                                                                              "replace")
    except (XenpbrError, OSError) as exc:
        log.debug("%s: no published deliveries: %s", name, exc)
    return found


def publish(xs: XenstoreClient, state: StateDir, name: str, status: str,
            domid: int | None = None, refusals: dict[str, int] | None = None,
            phases: DomainPhases | None = None,
            delivery: dict[str, str] | None = None) -> bool:
    """Replace ``name``'s published subtree; False (and a log line) if it failed."""
    try:
        keys = snapshot(state, name, status, domid, refusals=refusals, phases=phases,
                        delivery=delivery)
    except XenpbrError as exc:
        log.warning("%s: state not published: %s", name, exc)
        return False
    root = domain_root(name)

    def work(t: Transaction) -> None:
        try:
            t.rm(root)
        except NoSuchKey:
            pass  # the first publication: /xenpbr/domains does not exist yet
        for key, value in sorted(keys.items()):
            t.write(f"{root}/{key}", value)

    try:
        xs.run_transaction(work)
    except (XenpbrError, OSError) as exc:
        log.warning("%s: could not publish its state in xenstore: %s", name, exc)
        return False
    return True


def unpublish(xs: XenstoreClient, name: str) -> None:
    """Remove ``name``'s published subtree (the domain was unregistered)."""
    try:
        xs.rm(domain_root(name))
    except (XenpbrError, OSError) as exc:
        log.warning("%s: could not remove its published state: %s", name, exc)


def running_domid(xs: XenstoreClient, name: str) -> int | None:
    """The domid a domain named ``name`` runs as now (xenstore's ``/local/domain/*/name``;
    the newest if several), None if none: what was published earlier may be a domid
    that a recovery or a reboot has replaced since."""
    found: list[int] = []
    try:
        for child in xs.ls("/local/domain"):
            if child.isdigit() and child != "0" and \
                    xs.read_or(f"/local/domain/{child}/name", b"") == name.encode():
                found.append(int(child))
    except (XenpbrError, OSError) as exc:
        log.debug("%s: running domains not readable: %s", name, exc)
    return max(found, default=None)


def refusal_key(reason: str) -> str:
    """The published key of a refusal reason (``:`` is not a xenstore path character)."""
    return reason.replace(":", "-")


def reason_of_key(key: str) -> str:
    """The reason a published refusal key stands for (:func:`refusal_key` reversed: only
    ``bad-request:<field>`` reasons contain a ``:``)."""
    prefix = "bad-request-"
    return f"bad-request:{key[len(prefix):]}" if key.startswith(prefix) else key


def read_refusals(xs: XenstoreClient, name: str) -> dict[str, int]:
    """The refusal counters xenpbrd published for ``name`` ({} if none or unreadable), by
    reason: for ``xenpbr status`` and for :func:`refresh`, which must not drop them."""
    root = f"{domain_root(name)}/refusals"
    found: dict[str, int] = {}
    try:
        for key in xs.ls(root):
            value = (xs.read_or(f"{root}/{key}", b"") or b"").decode("ascii", "replace")
            if value.isdigit():
                found[reason_of_key(key)] = int(value)
    except (XenpbrError, OSError) as exc:
        log.debug("%s: no published refusals: %s", name, exc)
    return found


def refresh(xs: XenstoreClient, state: StateDir, name: str) -> bool:
    """Republish ``name`` keeping its published status (for the CLI, which changes images
    but does not know what the daemon last saw); the domid is the one running now, not
    the published one, which could be stale or empty. The refusal counters and the
    deliveries waiting for confirmation are kept (refreshing once dropped the counters
    until the guest's next refusal)."""
    root = domain_root(name)
    try:
        status = (xs.read_or(f"{root}/status", b"stopped") or b"stopped").decode()
    except (XenpbrError, OSError) as exc:
        log.debug("%s: published state not readable: %s", name, exc)
        return False
    return publish(xs, state, name, status if status in STATUSES else "stopped",
                   running_domid(xs, name), read_refusals(xs, name),
                   delivery=read_delivery(xs, name))
