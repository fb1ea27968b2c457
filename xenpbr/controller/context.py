"""A domain as one event's handlers see it: name, domid, typed config and phase state.

Separate so every step reads a domain's registration once per event, in one typed form,
instead of rebuilding its config from the untyped state record in each handler (the
daemon once did so in three places). Policies that must never fail an event (a
boundary is always answered) fall back to their defaults here, with a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from xenpbr import domconfig
from xenpbr import phases as phases_mod
from xenpbr.domconfig import DomainConfig
from xenpbr.phases import DomainPhases
from xenpbr.state import StateDir

log = logging.getLogger(__name__)


@dataclass
class DomainContext:
    """One registered domain, loaded for one event."""

    name: str
    domid: int | None
    settings: dict[str, Any]
    config: DomainConfig
    phases: DomainPhases

    @classmethod
    def load(cls, state: StateDir, name: str, domid: int | None) -> DomainContext:
        """Read ``name``'s registration and phase state (under its lock when the event
        changes the phase state)."""
        settings = state.load_record(name).get("settings", {})
        return cls(name, domid, settings, DomainConfig(state.xl_config_path(name), settings),
                   state.phases(name))

    def health_policy(self) -> tuple[float, int]:
        """``(healthy_after_s, image_failures)``; the defaults if the config is unusable."""
        try:
            return domconfig.health_policy(self.config)
        except domconfig.ConfigError as exc:
            log.error("%s: %s; using the default image health policy", self.name, exc)
            return phases_mod.HEALTH_DEFAULTS

    def hot_stream_wanted(self) -> bool:
        """Whether the domain's images get a hot stream; no if the config is unusable."""
        try:
            return domconfig.hot_stream(self.config)
        except domconfig.ConfigError as exc:
            log.error("%s: %s; no hot stream", self.name, exc)
            return False

    def live_capture_wanted(self) -> bool:
        """Whether captures copy memory while the guest runs; no (the proven ``xl save
        -c``) if the config is unusable."""
        try:
            return domconfig.live_capture(self.config)
        except domconfig.ConfigError as exc:
            log.error("%s: %s; capturing with xl save -c", self.name, exc)
            return False

    def standby_wanted(self) -> bool:
        """Whether a paused standby of the newest image is kept ready; no if the config
        is unusable (it costs memory the operator did not grant)."""
        try:
            return domconfig.standby(self.config)
        except domconfig.ConfigError as exc:
            log.error("%s: %s; no standby", self.name, exc)
            return False

    def recovers_on(self, trigger: str) -> bool:
        """True if the operator asked for a phase-based reboot on ``trigger``
        (``crash`` | ``watchdog``)."""
        return self.settings.get(f"on_{trigger}") == domconfig.XENPBR_ACTION
