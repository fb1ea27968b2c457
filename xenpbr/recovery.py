"""Bring a crashed domain back: the deepest valid image first, a normal reboot last.

On a crash (or watchdog, or an operator's ``xenpbr reboot``) :meth:`Recovery.recover`
follows the plan of :mod:`xenpbr.phases`: destroy the crashed domain, restore the chosen
image paused, write ``restored:<generation>`` into the new domain's control dir (the
agent inside is waiting for exactly that ack), unpause. If the image turns out corrupt or
xl refuses it, the image is marked unusable and the next candidate is tried; the plan
always ends with a normal reboot (``xl create`` of the registered config), so the domain
is never left down unless even that fails, which raises :class:`RecoveryFailed` after the
timeline is saved. Xen, xl and the ack writer are reached through small injected
interfaces so the whole decision path is unit-tested; the lab tests run it against real
Xen. A recovery returns a :class:`RecoveryResult` (which domain it brought back, and
how): what the caller does next (the daemon's phase controller adopts and publishes it,
the CLI prints it) is decided from that, not from callbacks. Only the ack itself stays
an injected step: it must be in the restored domain's control dir before the unpause,
and a failed ack discards that domain and tries the next candidate.

**Resurrection.** For a crash or a watchdog (not an operator's reboot of a running
guest), an optional :class:`Extractor` reads the applications' resurrection regions out
of the crashed domain after the plan is made and *before* it is destroyed (the
``extracted`` mark). Anything it raises is logged and the recovery goes on: resurrection
never blocks getting the guest back.

**The crashed domain set aside.** Destroying a domain takes time that grows with its
memory (0.41 / 0.81 / 0.95 s at 128 / 1024 / 1740 MiB under TCG), and nothing needs the
crashed domain gone before the image is restored *if Xen has memory for both*. So when
the domain keeps a standby of the image the plan chose first (:mod:`xenpbr.images.
standby`, through the optional :class:`Standbys`: the standby's memory is already
allocated), or when the restorer says Xen has room for the image beside the crashed
domain (the optional :class:`Room`), the crashed domain is renamed out of the way
(``NAME--crashed``) and destroyed once the recovered guest runs, off the path to
service: right after the unpause by default (the CLI), or, with ``keep_aside``, by the
caller once the guest reports ready (the daemon: :mod:`xenpbr.controller.aftermath`).
Only a domain Xen has stopped (a crash or a watchdog) is set aside: an operator's
reboot is of a running guest, which must not run beside its successor on
the same disks. A ``snapshot`` disk needs the crashed domain's backends gone before it
is reverted, so such a domain is destroyed first as always. If a candidate fails while
the crashed domain is aside, it is destroyed before the next candidate, whose restore
may need its memory. The ``destroyed`` mark then says "set aside" and why.

**Surviving our own death.** A recovery writes an intent record before it destroys
anything and removes it when the timeline is saved. If xenpbrd is killed in between,
:meth:`Recovery.resume_interrupted` (run when xenpbrd starts) finds the record: a domain
that is up and unpaused was already handed back to its guest and is kept; anything else
(no domain, or one left paused mid-restore) is destroyed and recovered again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from xenpbr.errors import XenpbrError
from xenpbr.phases import Candidate, DomainPhases
from xenpbr.state import StateDir
from xenpbr.timeline import Timeline

log = logging.getLogger(__name__)


class RecoveryFailed(XenpbrError):
    """Every candidate failed, the normal reboot included: the domain is down."""


class CandidateFailed(XenpbrError):
    """One candidate could not be used (the next one is tried)."""


class Toolstack(Protocol):
    """The domain lifecycle operations recovery needs (xl in production)."""

    def destroy(self, name: str) -> None: ...
    def create(self, config: Path) -> int: ...
    def unpause(self, domid: int) -> None: ...
    def state(self, name: str) -> str | None: ...
    def rename(self, old: str, new: str) -> None: ...


class Restorer(Protocol):
    """Creates a paused domain from a stored image; returns its domid."""

    def restore(self, domain: str, image_id: str) -> int: ...


@runtime_checkable
class Standbys(Protocol):
    """Which image a domain's standby domain holds, if any (a restorer that keeps them)."""

    def standby_image(self, domain: str) -> str | None: ...


@runtime_checkable
class Room(Protocol):
    """Whether Xen has free memory for ``image_id`` restored beside the crashed domain
    (a restorer that can tell; a wrong "no" only costs the destroy's time)."""

    def room_beside(self, domain: str, image_id: str) -> bool: ...


#: What a crashed domain is renamed to while its successor takes over its name.
SET_ASIDE_SUFFIX = "--crashed"

#: The triggers whose domain Xen has already stopped (a crash, a watchdog's shutdown):
#: only such a domain may wait, set aside, beside its successor.
STOPPED_TRIGGERS = ("crash", "watchdog")


class Acknowledger(Protocol):
    """Writes ``<seq> restored:<generation>`` into a restored, still paused domain (see
    protocol); raising :class:`~xenpbr.errors.XenpbrError` fails that candidate."""

    def restored(self, domid: int, seq: int, generation: int) -> None: ...


class Extractor(Protocol):
    """Reads resurrection data out of the crashed domain ``domid`` before it is destroyed,
    keeps it, and marks ``extracted`` (with the per-application summary) on ``timeline``;
    it may do nothing (resurrection off). Its exceptions never stop a recovery."""

    def extract(self, name: str, domid: int, timeline: Timeline) -> None: ...


#: The triggers whose crashed memory is worth reading (an operator's reboot is of a
#: running guest; a resumed recovery's domain may be half gone).
EXTRACTING_TRIGGERS = ("crash", "watchdog")


@dataclass(frozen=True)
class RecoveryResult:
    """What a finished recovery brought back: its domain, the path taken (``phase:<p>``
    or ``normal-reboot``), and for a phase-based reboot the acked seq and generation."""

    timeline: Timeline
    domid: int | None
    path: str
    seq: int | None = None
    generation: int | None = None
    #: The crashed domain, renamed aside and still there (``keep_aside``): the caller
    #: destroys it (:meth:`Recovery.destroy_set_aside`).
    set_aside: str | None = None

    @property
    def restored_phase(self) -> str | None:
        """The phase whose image was restored, None after a normal reboot."""
        return self.path[len("phase:"):] if self.path.startswith("phase:") else None


def handed_back(state: str | None) -> bool:
    """True if xl's state letters say the domain runs its guest (not paused, not shut
    down, not crashed, not dying): a recovery that got that far had finished."""
    return state is not None and not set(state) & set("pscd")


class Recovery:
    """Executes recovery plans and records their timelines."""

    def __init__(self, state: StateDir, toolstack: Toolstack, restorer: Restorer,
                 ack: Acknowledger, clock: Callable[[], float] = time.monotonic,
                 extractor: Extractor | None = None, keep_aside: bool = False) -> None:
        """``keep_aside``: a recovered domain's crashed predecessor, set aside, is left
        to the caller (:attr:`RecoveryResult.set_aside`) instead of destroyed at once."""
        self.state, self.toolstack, self.restorer, self.ack = state, toolstack, restorer, ack
        self.clock, self.extractor, self.keep_aside = clock, extractor, keep_aside
        self.standbys = restorer if isinstance(restorer, Standbys) else None
        self.room = restorer if isinstance(restorer, Room) else None

    def recover(self, name: str, trigger: str, crash_seen: float | None = None,
                max_phase: str | None = None, domid: int | None = None) -> RecoveryResult:
        """Recover ``name`` after ``trigger`` (crash | watchdog | operator).

        ``crash_seen`` is the monotonic time the event was first seen (defaults to now),
        so the timeline starts at detection, not at the start of this call. ``domid`` is
        the crashed domain, whose memory the extractor reads (none: nothing is read).
        """
        timeline = Timeline(name, trigger)
        timeline.mark("crash_seen", now=crash_seen if crash_seen is not None else self.clock())
        phases = self.state.phases(name)
        if max_phase is not None and max_phase not in phases.phases:
            raise RecoveryFailed(f"{name} has no phase {max_phase!r}; its phases are "
                                 f"{', '.join(phases.phases) or 'not known yet'}")
        plan = phases.plan(self.clock(), max_phase, self._crash_loop_policy(name),
                           crashed=trigger != "operator", health=self._health_policy(name))
        timeline.skipped = [*plan.skipped, *self._undeclared(phases)]
        timeline.mark("image_chosen", self._describe(plan.first), now=self.clock())
        self._record(name, "its recovery intent", self.state.begin_recovery, name,
                     {"trigger": trigger})
        try:
            if trigger in EXTRACTING_TRIGGERS and domid is not None:
                self._extract(name, domid, timeline)
            aside = self._set_aside(name, trigger, plan.first, timeline)
            if aside is None:
                self._destroy_crashed(name, timeline)
            try:
                for candidate in plan.candidates:
                    if self._attempt(name, candidate, phases, timeline):
                        timeline.outcome = "recovered"
                        kept, aside = (aside, None) if self.keep_aside else (None, aside)
                        return self._result(candidate, timeline, kept)
                    if aside is not None:  # the next candidate may need its memory
                        self.destroy_set_aside(name, aside)
                        aside = None
            finally:
                if aside is not None:
                    self.destroy_set_aside(name, aside)
            timeline.outcome = "failed"
            raise RecoveryFailed(f"{name} could not be recovered: tried "
                                 f"{', '.join(timeline.attempts)}; see `xenpbr history {name}`")
        finally:
            self._record(name, "its phases", self.state.save_phases, phases)
            self._record(name, "this recovery's timeline", self.state.add_history, timeline)
            if timeline.outcome != "in-progress":  # interrupted: resume on next start
                self._record(name, "the end of its recovery", self.state.end_recovery, name)
            log.info("%s: recovery ended: %s via %s, downtime so far %s s", name,
                     timeline.outcome, timeline.method or "-", timeline.downtime())

    @staticmethod
    def _result(candidate: Candidate, timeline: Timeline,
                set_aside: str | None) -> RecoveryResult:
        image = candidate.image
        return RecoveryResult(timeline, timeline.domid, timeline.method,
                              seq=None if image is None else image.seq,
                              generation=None if image is None else timeline.generation,
                              set_aside=set_aside)

    def resume_interrupted(self, name: str) -> RecoveryResult | None:
        """Finish a recovery of ``name`` that a previous xenpbrd did not (it was killed).

        Returns the new recovery's result, or None if there was nothing to resume or
        the domain had already been handed back to its guest.
        """
        intent = self.state.recovery_intent(name)
        if intent is None:
            return None
        self.destroy_leftover_aside(name)
        state = self.toolstack.state(name)
        if handed_back(state):
            generation = intent.get("generation")
            if isinstance(generation, int):
                phases = self.state.phases(name)
                phases.generation = max(phases.generation, generation)
                self.state.save_phases(phases)
            log.warning("%s: the recovery interrupted by xenpbrd's restart had already "
                        "started the domain (%s); keeping it", name, state)
            self.state.end_recovery(name)
            return None
        log.warning("%s: resuming a recovery interrupted by xenpbrd's restart (domain %s)",
                    name, "absent" if state is None else f"left {state}")
        return self.recover(name, "resume")

    @staticmethod
    def _record(name: str, what: str, write: Callable[..., object], *args: Any) -> None:
        """Write recovery bookkeeping; a failure (a full or broken state file system) is
        logged, never raised: bringing the guest back matters more than the record (a
        full dom0 once left a crashed guest down because the intent could not be saved)."""
        try:
            write(*args)
        except (OSError, XenpbrError) as exc:
            log.critical("%s: could not record %s (%s); recovering anyway", name, what, exc)

    def _crash_loop_policy(self, name: str) -> tuple[float, int] | None:
        from xenpbr import domconfig
        return self.state.domain_setting(name, domconfig.crash_loop_policy,
                                         "using the default crash-loop guard")

    def _health_policy(self, name: str) -> tuple[float, int] | None:
        """The domain's ``(healthy_after_s, image_failures)``; None (the defaults) if its
        config is unusable: a recovery must not fail over a setting."""
        from xenpbr import domconfig
        return self.state.domain_setting(name, domconfig.health_policy,
                                         "using the default image health policy")

    @staticmethod
    def _undeclared(phases: DomainPhases) -> list[str]:
        """Images of phases the guest no longer declares: the plan never considers them,
        so say so in the history (an operator would otherwise wonder why a fresh image
        of a renamed phase was not used)."""
        declared = ", ".join(phases.phases) or "none yet"
        return [f"{img.image_id} ({img.phase}): phase not declared by the guest "
                f"(declared: {declared})"
                for img in phases.images.values() if img.phase not in phases.phases]

    @staticmethod
    def _describe(candidate: Candidate) -> str:
        img = candidate.image
        return "normal reboot" if img is None else f"{img.phase} ({img.image_id})"

    def _extract(self, name: str, domid: int, timeline: Timeline) -> None:
        """Run the extractor on the crashed ``domid``; whatever goes wrong is logged and
        marked, and the recovery goes on."""
        if self.extractor is None:
            return
        try:
            self.extractor.extract(name, domid, timeline)
        except Exception as exc:  # noqa: BLE001 - resurrection must never stop a recovery
            log.exception("%s: resurrection failed (recovering without it): %s", name, exc)
            if timeline.at("extracted") is None:
                timeline.mark("extracted", f"failed: {exc}", now=self.clock())

    def _why_aside(self, name: str, image_id: str) -> str | None:
        """Why the crashed domain may wait beside the restore of ``image_id`` (see the
        module's doc), or None: it goes first."""
        if self.standbys is not None and self.standbys.standby_image(name) == image_id:
            return "a standby takes over"
        if self.room is not None and self.room.room_beside(name, image_id):
            return "Xen has memory for both"
        return None

    def _set_aside(self, name: str, trigger: str, first: Candidate,
                   timeline: Timeline) -> str | None:
        """Rename the crashed domain out of the way of ``first``'s restore (see the
        module's doc); its new name, or None (destroy it first instead)."""
        if trigger not in STOPPED_TRIGGERS or first.image is None:
            return None
        from xenpbr import domconfig
        reverted = self.state.domain_setting(name, domconfig.snapshot_disks,
                                             "destroying the crashed domain first")
        if reverted is None or reverted:
            return None  # its backends must be gone before the disks are reverted
        why = self._why_aside(name, first.image.image_id)
        if why is None:
            return None
        aside = f"{name}{SET_ASIDE_SUFFIX}"
        try:
            self.toolstack.rename(name, aside)
        except XenpbrError as exc:  # CandidateFailed among them
            log.warning("%s: could not set the crashed domain aside (%s); destroying it",
                        name, exc)
            return None
        when = "once the guest reports ready" if self.keep_aside else "after the hand-over"
        timeline.mark("destroyed", f"set aside as {aside} ({why}), destroyed {when}",
                      now=self.clock())
        return aside

    def destroy_leftover_aside(self, name: str) -> None:
        """Destroy ``name``'s crashed domain if one is still set aside (a killed
        xenpbrd did not get to it)."""
        aside = f"{name}{SET_ASIDE_SUFFIX}"
        if self.toolstack.state(aside) is not None:
            log.warning("%s: destroying %s, a crashed domain left set aside", name, aside)
            self.destroy_set_aside(name, aside)

    def destroy_set_aside(self, name: str, aside: str) -> None:
        """Destroy the crashed domain a hand-over set aside; a failure is logged (the
        guest runs: nothing else depends on it)."""
        try:
            self.toolstack.destroy(aside)
        except XenpbrError as exc:
            log.error("%s: the crashed domain %s was not destroyed (%s): run `xl destroy "
                      "%s`", name, aside, exc, aside)

    def _destroy_crashed(self, name: str, timeline: Timeline) -> None:
        try:
            self.toolstack.destroy(name)
        except CandidateFailed as exc:
            log.error("%s: %s", name, exc)
            timeline.attempts.append(f"destroy failed: {exc}")
        timeline.mark("destroyed", now=self.clock())

    def _attempt(self, name: str, candidate: Candidate, phases: DomainPhases,
                 timeline: Timeline) -> bool:
        label = "normal-reboot" if candidate.image is None else f"phase:{candidate.image.phase}"
        timeline.attempts.append(label)
        log.info("%s: trying %s (%s)", name, label, candidate.reason)
        timeline.mark("restore_started", label, now=self.clock())
        try:
            if candidate.image is None:
                self._normal_reboot(name, timeline)
                phases.recovered(self.clock(), via_image=False)
            else:
                self._phase_reboot(name, candidate, phases, timeline)
        except (CandidateFailed, XenpbrError) as exc:
            log.warning("%s: %s failed: %s", name, label, exc)
            timeline.attempts[-1] = f"{label} failed: {exc}"
            if candidate.image is not None:
                phases.mark_unusable(candidate.image.image_id)
            return False
        timeline.method = label
        timeline.mark("restore_finished", now=self.clock())
        return True

    def _normal_reboot(self, name: str, timeline: Timeline) -> None:
        timeline.domid = self.toolstack.create(self.state.xl_config_path(name))

    def _phase_reboot(self, name: str, candidate: Candidate, phases: DomainPhases,
                      timeline: Timeline) -> None:
        image = candidate.image
        assert image is not None
        domid = timeline.domid = self.restorer.restore(name, image.image_id)
        generation = phases.generation + 1
        self._record(name, "its recovery stage", self.state.begin_recovery, name,
                     {"stage": "acknowledging", "generation": generation})
        timeline.generation = generation
        try:
            self.ack.restored(domid, image.seq, generation)
            self.toolstack.unpause(domid)
        except XenpbrError:
            timeline.domid = None
            self.toolstack.destroy(name)  # never leave a paused, half-recovered domain
            raise
        phases.recovered(self.clock(), via_image=True, image=image)
