"""The daemon's resurrection step: read a crashed domain's registered regions, keep them.

Separate from :mod:`xenpbr.recovery` (which only knows an :class:`~xenpbr.recovery.Extractor`
runs before the destroy) and from :mod:`xenpbr.resurrection.extract` (which only knows
frames and bytes): this is where the operator's config (``xenpbr_resurrect``, its caps),
the guest's xenstore registrations, the crashed domain's memory and the vault meet. It
summarises what happened in the recovery's timeline (the ``extracted`` mark and one
:class:`~xenpbr.timeline.AppResurrection` per application) for ``xenpbr history`` and the
published state.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from xenpbr import domconfig
from xenpbr.controller.context import DomainContext
from xenpbr.hypervisor.base import Hypervisor
from xenpbr.resurrection import extract as extract_mod
from xenpbr.resurrection.model import Caps, Extraction
from xenpbr.resurrection.vault import Vault
from xenpbr.state import StateDir
from xenpbr.timeline import AppResurrection, Timeline
from xenpbr.xenstore import XenstoreClient

log = logging.getLogger(__name__)


class FrameReader(Protocol):
    """What extraction reads a crashed guest's memory through (see
    :mod:`xenpbr.resurrection.extract`): copies of guest pages by pfn."""

    def read_pfns(self, pfns: Sequence[int]) -> list[bytes]: ...


#: ``extract(memory, registrations, caps, *, domid, clock) -> Extraction``
ExtractFn = Callable[..., Extraction]
#: ``read_registrations(xs, domid, limit) -> {app: raw value}``
RegistrationsFn = Callable[[XenstoreClient, int, int], dict[str, bytes]]
#: The crashed domid's memory.
FrameOpener = Callable[[int], FrameReader]


class HypervisorFrames:
    """A :class:`FrameReader` over :meth:`Hypervisor.read_pfns` of one domain (the fake
    hypervisor in tests; any hypervisor without a cached P2M)."""

    def __init__(self, hypervisor: Hypervisor, domid: int) -> None:
        self.hypervisor, self.domid = hypervisor, domid

    def read_pfns(self, pfns: Sequence[int]) -> list[bytes]:
        return self.hypervisor.read_pfns(self.domid, pfns)


def frames_opener(hypervisor: Hypervisor) -> FrameOpener:
    """How the daemon opens a crashed domain's memory: over libxc, one
    :class:`~xenpbr.hypervisor.guest_memory.GuestMemory` per extraction (its P2M walked
    once, not at every read); otherwise through the hypervisor interface."""
    from xenpbr.hypervisor.libxc import LibxcHypervisor

    def open_frames(domid: int) -> FrameReader:
        if isinstance(hypervisor, LibxcHypervisor):
            memory = hypervisor.guest_memory(domid)
            return extract_mod.GuestMemoryFrames(memory)
        return HypervisorFrames(hypervisor, domid)
    return open_frames


def shown_name(app: str) -> str:
    """An application name as the guest wrote it, safe for a terminal and a log: at most
    40 characters, anything unprintable escaped (refused registrations are unvalidated)."""
    safe = app.encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in safe)
    return safe if len(safe) <= 40 else safe[:37] + "..."


def summarise(extraction: Extraction) -> list[AppResurrection]:
    """One :class:`AppResurrection` per application read or refused, in that order."""
    apps = [AppResurrection(a.app, 1 if a.kept else 0, len(a.records),
                            dict(Counter(r.reason for r in a.rejections)), a.bytes_read,
                            round(a.seconds, 6))
            for a in extraction.apps]
    refused: dict[str, Counter[str]] = {}
    for rejection in extraction.refused:
        refused.setdefault(rejection.app, Counter())[rejection.reason] += 1
    apps += [AppResurrection(shown_name(app), 0, 0, dict(reasons))
             for app, reasons in refused.items()]
    return apps


def describe(extraction: Extraction, kept: list[str]) -> str:
    """The ``extracted`` mark's detail: one line for the whole domain."""
    records = sum(len(a.records) for a in extraction.apps)
    rejected = sum(len(a.rejections) for a in extraction.apps) + len(extraction.refused)
    return (f"{len(extraction.apps)} regions read, {records} records, {rejected} "
            f"rejected, kept {', '.join(kept) or 'nothing'} in {extraction.seconds:.3f} s"
            f"{' (time cap reached)' if extraction.timed_out else ''}")


class ResurrectionExtractor:
    """Recovery's :class:`~xenpbr.recovery.Extractor` in the daemon."""

    def __init__(self, state: StateDir, xs: XenstoreClient, open_frames: FrameOpener, *,
                 vault: Vault | None = None, extract_fn: ExtractFn | None = None,
                 registrations_fn: RegistrationsFn | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.state, self.xs, self.open_frames = state, xs, open_frames
        self.vault = vault or Vault.in_state(state.root)
        self.extract_fn, self.registrations_fn = extract_fn, registrations_fn
        self.clock, self.wall_clock = clock, wall_clock

    def caps(self, name: str, domid: int) -> Caps | None:
        """The domain's caps, None if resurrection is off (or its setting unusable)."""
        context = DomainContext.load(self.state, name, domid)
        try:
            return domconfig.resurrect_caps(context.config)
        except domconfig.ConfigError as exc:
            log.error("%s: %s; resurrection is off for this recovery", name, exc)
            return None

    def extract(self, name: str, domid: int, timeline: Timeline) -> None:
        """Read ``domid``'s regions within the caps, keep the result, summarise it."""
        caps = self.caps(name, domid)
        if caps is None:
            return
        extraction = self._run(domid, caps)
        kept = self.vault.keep(name, extraction, at=self.wall_clock())
        timeline.resurrection = summarise(extraction)
        timeline.mark("extracted", describe(extraction, kept), now=self.clock())
        for app in timeline.resurrection:
            log.info("%s: resurrection: %s", name, app.brief())

    def _run(self, domid: int, caps: Caps) -> Extraction:
        """The registrations of ``domid`` and their extraction (:mod:`.extract` is
        imported here, when a domain first needs it)."""
        extract_fn = self.extract_fn or extract_mod.extract
        registrations_fn = self.registrations_fn or extract_mod.read_registrations
        registrations: Mapping[str, bytes] = registrations_fn(self.xs, domid, caps.regions)
        if not registrations:
            return Extraction(domid=domid)
        return extract_fn(self.open_frames(domid), registrations, caps, domid=domid,
                          clock=self.clock)
