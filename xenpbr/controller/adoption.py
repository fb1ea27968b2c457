"""Which registered domain a domid runs as: adoption by name and UUID.

Separate because it is the one place that decides whether xenpbrd manages a domain at
all: a domain that merely reuses a registered name (a plain ``xl create``) under another
UUID is never adopted, captured or recovered. Every event starts here.
"""

from __future__ import annotations

import logging

from xenpbr.errors import XenpbrError
from xenpbr.hypervisor.base import Hypervisor
from xenpbr.state import StateDir
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)


class DomainNames:
    """domid -> registered name, for the domains xenpbr manages."""

    def __init__(self, state: StateDir, hypervisor: Hypervisor, xs: XenstoreClient) -> None:
        self.state, self.hv, self.xs = state, hypervisor, xs
        self.names: dict[int, str] = {}  # domid -> registered name
        self.restored_domids: set[int] = set()  # prepared by recovery, not a fresh boot
        self._strangers: set[int] = set()  # domids reusing a registered name, UUID differs

    def name_of(self, domid: int) -> str | None:
        """The registered name ``domid`` runs as, None for a domain xenpbr does not
        manage: unregistered, or registered under another UUID (a domain that merely
        reuses the name, e.g. a plain ``xl create``, is never adopted or recovered)."""
        name = self.names.get(domid)
        if name is not None:
            if self.state.is_registered(name):
                return name
            self.names.pop(domid)  # unregistered meanwhile (xenpbr unregister)
            return None
        raw = self.xs.read_or(f"/local/domain/{int(domid)}/name", None)
        name = raw.decode(errors="replace") if raw else None
        if name is None or name not in self.state.domains() or not self._uuid_matches(domid, name):
            return None
        self.names[domid] = name
        return name

    def _uuid_matches(self, domid: int, name: str) -> bool:
        """True if ``domid`` has the UUID ``xenpbr create`` gave ``name`` (or the
        registration predates recorded UUIDs). A mismatch is logged once per domid."""
        wanted = self.state.registered_uuid(name)
        if wanted is None or domid in self.restored_domids:
            return True  # legacy registration, or the domain our own recovery restored
        try:
            actual = str(self.hv.domain_state(domid).uuid)
        except XenpbrError as exc:  # gone already: nothing to adopt
            log.debug("%s (domid %d): no domain state: %s", name, domid, exc)
            return False
        if actual == wanted:
            return True
        if domid not in self._strangers:
            self._strangers.add(domid)
            log.warning("%s (domid %d): not adopted: its UUID %s is not the registered %s "
                        "(another domain reusing the name; it is left alone)", name, domid,
                        actual, wanted)
        return False

    def forget_stranger(self, domid: int) -> None:
        """An unmanaged domain was destroyed: its domid may come back as ours."""
        self._strangers.discard(domid)

    def known_as(self, domid: int, name: str) -> None:
        """``domid`` is ``name`` from now on (a recovery brought it back)."""
        self.names[domid] = name

    def forget(self, domid: int) -> None:
        self.names.pop(domid, None)

    def running(self, name: str) -> bool:
        """True if some known domid runs as ``name``."""
        return name in self.names.values()

    def take_restored(self, domid: int) -> bool:
        """True (once) if a recovery of ours prepared ``domid``'s control dir."""
        if domid in self.restored_domids:
            self.restored_domids.discard(domid)
            return True
        return False
