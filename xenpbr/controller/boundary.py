"""Judge an admitted phase boundary and, if it is to be imaged, capture it.

Separate because it is the controller's one write path into the image store: the
replacement rules (:meth:`~xenpbr.phases.DomainPhases.replacement`), the disk safety
rules (:mod:`xenpbr.consistency`), the memory capture (``xl save -c``), the snapshots of
``snapshot`` disks (taken while xl holds the guest paused at the instant its memory was
saved) and the store quota all decide here, under the domain's lock, with
the domain's context loaded once. Every accepted request gets a verdict: a failure in
dom0 becomes a ``capture-failed`` refusal, never an unanswered guest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from xenpbr import consistency, disksnap, domconfig
from xenpbr import phases as phases_mod
from xenpbr.controller.context import DomainContext
from xenpbr.errors import XenpbrError
from xenpbr.hypervisor.base import Hypervisor, ShutdownReason
from xenpbr.images import disks
from xenpbr.images.capture import CaptureResult, WhilePaused, capture
from xenpbr.images.store import ImageStore
from xenpbr.phases import DomainPhases, ImageInfo
from xenpbr.guestproto.wire import BoundaryRequest, Verdict
from xenpbr.state import StateDir, domain_lock

log = logging.getLogger(__name__)

class Capture(Protocol):
    """Saves a running domain as a new image of a phase (``images.capture.capture``)."""

    def __call__(self, domain: str, store: ImageStore, phase: str, *, seq: int = ...,
                 fingerprint: str = ..., extra: dict[str, Any] | None = ...,
                 crashed: Callable[[], bool] | None = ...,
                 frozen: Callable[[], bool] | None = ...,
                 while_paused: WhilePaused | None = ..., live: bool = ...) -> CaptureResult: ...


#: A verdict and, for a refusal, why (for the guest's log).
Judgement = tuple[Verdict, str]


@dataclass(frozen=True)
class Judged:
    """A boundary's verdict and why, with the domain context it was judged in (None if
    dom0 failed before loading it): the phase state after the boundary."""

    verdict: Verdict
    detail: str
    context: DomainContext | None


class Boundaries:
    """Boundary decisions, with what each domid's run has passed through."""

    def __init__(self, state: StateDir, store: ImageStore, hypervisor: Hypervisor,
                 capture_fn: Capture = capture) -> None:
        self.state, self.store, self.hv = state, store, hypervisor
        self.capture = capture_fn
        self.passed: dict[int, set[str]] = {}  # domid -> phases its run went through
        self.restored_runs: set[int] = set()  # domids a recovery restored from an image

    def restored_from(self, domid: int, phases: DomainPhases, phase: str) -> None:
        """A recovery restored ``domid`` from ``phase``'s image: its run has passed that
        phase and the earlier ones."""
        self.restored_runs.add(domid)
        order = list(phases.phases)
        self.passed[domid] = set(order[:order.index(phase) + 1]) if phase in order \
            else {phase}

    def forget(self, domid: int) -> None:
        self.passed.pop(domid, None)
        self.restored_runs.discard(domid)

    def judged(self, name: str, request: BoundaryRequest, domid: int) -> Judged:
        """:meth:`judge_and_capture` under the domain's lock, but a failure (a bug, an
        unusable config, a store error) is a ``capture-failed`` answer: an accepted
        request is always answered (it once stayed unanswered, published as
        ``capturing``)."""
        ctx: DomainContext | None = None
        try:
            with domain_lock(self.state, name):
                ctx = DomainContext.load(self.state, name, domid)
                return Judged(*self.judge_and_capture(ctx, request), ctx)
        except Exception as exc:  # noqa: BLE001 - the guest waits for an answer
            log.exception("%s (domid %d): boundary %s (seq %d) failed in dom0", name, domid,
                          request.phase, request.seq)
            return Judged(Verdict.refused("capture-failed"),
                          f"dom0 failed on this boundary: {type(exc).__name__}: {exc}", None)

    def judge_and_capture(self, ctx: DomainContext, request: BoundaryRequest) -> Judgement:
        """The verdict for an admitted boundary, and why if it is a refusal."""
        assert ctx.domid is not None
        phases = ctx.phases
        fingerprint = domconfig.fingerprint(ctx.config, request.phases,
                                            request.identity).digest()
        phases.health = ctx.health_policy()
        restored_run = ctx.domid in self.restored_runs
        if phases.boundary_decision(request.phase, fingerprint, restored_run) == "capture":
            refusal = self._replacement_refused(ctx, request)
            if refusal is not None:
                if refusal[0].reason != "out-of-order":  # a later run: its claim stands,
                    phases.phases, phases.fingerprint = request.phases, fingerprint
                    self.state.save_phases(phases)  # so its older images are stale now
                return refusal
        self.passed.setdefault(ctx.domid, set()).add(request.phase)
        phases.phases, phases.fingerprint = request.phases, fingerprint
        unsafe = consistency.judge(ctx.config, request)
        if unsafe is not None:
            self.state.save_phases(phases)
            log.warning("%s: boundary %s refused (%s): %s", ctx.name, request.phase,
                        unsafe.reason, unsafe.detail)
            return Verdict.refused(unsafe.reason), unsafe.detail
        if phases.boundary_decision(request.phase, fingerprint, restored_run) == "skip":
            self.state.save_phases(phases)
            _log_kept_abandoned(ctx.name, phases, request.phase)
            return Verdict.skipped(), ""
        return self._capture(ctx, request, fingerprint)

    def _replacement_refused(self, ctx: DomainContext,
                             request: BoundaryRequest) -> Judgement | None:
        """The refusal of a capture that would replace a usable image against the rules
        of :meth:`~xenpbr.phases.DomainPhases.replacement`, or None."""
        assert ctx.domid is not None
        phases = ctx.phases
        passed = self.passed.setdefault(ctx.domid, set())
        reason = phases.replacement(request.phase, request.phase in passed, time.time())
        passed.add(request.phase)
        if reason is None:
            return None
        existing = phases.images[request.phase]
        detail = (f"phase {request.phase} already has image {existing.image_id}; "
                  + ("this run passed that phase already: an image is replaced only by "
                     "a later run" if reason == "out-of-order" else
                     f"it is replaced at most once per {phases_mod.REPLACE_MIN_AGE_S:.0f} s"))
        log.warning("%s (domid %d): boundary %s (seq %d) refused (%s): %s", ctx.name,
                    ctx.domid, request.phase, request.seq, reason, detail)
        return Verdict.refused(reason), detail

    def _capture(self, ctx: DomainContext, request: BoundaryRequest,
                 fingerprint: str) -> Judgement:
        """Capture the boundary with its ``snapshot`` disks and record the image."""
        assert ctx.domid is not None
        name, phases = ctx.name, ctx.phases
        log.info("%s: capturing phase %s (seq %d)", name, request.phase, request.seq)
        snap_disks = domconfig.snapshot_disks(ctx.config)
        taken: list[disks.DiskSnapshot] = []
        if snap_disks:
            self.state.begin_held_pause(name, ctx.domid)
        try:
            result = self.capture(
                name, self.store, request.phase, seq=request.seq, fingerprint=fingerprint,
                crashed=self._crash_check(ctx.domid), frozen=self._frozen_check(ctx.domid),
                live=ctx.live_capture_wanted(),
                extra={disks.EXTRA_KEY: sorted(snap_disks)} if snap_disks else None,
                while_paused=self._snapshotter(name, snap_disks, taken) if snap_disks
                else None)
        except disksnap.SnapshotError as exc:
            log.error("%s: disk snapshot for phase %s failed: %s", name, request.phase, exc)
            return Verdict.refused("snapshot-failed"), f"disk snapshot failed in dom0: {exc}"
        except XenpbrError as exc:
            log.error("%s: capture of phase %s failed: %s", name, request.phase, exc)
            return Verdict.refused("capture-failed"), f"capture failed in dom0: {exc}"
        finally:
            self.state.end_held_pause(name)  # the capture unpaused it, whatever happened
        meta = result.meta
        refusal = self._over_quota(name, meta.image_id) if taken else None
        if refusal is not None:
            return refusal
        paused = getattr(result, "paused_s", None)
        why = _replacing(phases, request.phase, fingerprint)
        phases.record_image(ImageInfo(
            meta.image_id, request.phase, fingerprint, time.time(), seq=request.seq,
            capture_s=round(result.total_s, 3),
            paused_s=None if paused is None else round(paused, 3),
            disks_s=round(sum(t.seconds for t in taken), 3) if taken else None,
            disk_mechanisms=",".join(f"{t.vdev}={t.mechanism}" for t in taken)))
        self.state.save_phases(phases)
        replaced = phases.images[request.phase].replaced
        if replaced:
            log.warning("%s: image %s replaces %s as phase %s's image (%s); the old one "
                        "is deleted", name, meta.image_id, replaced, request.phase, why)
            self.drop_image(name, replaced)  # never planned again: only its bytes remain
        log.info("%s: captured phase %s (%s) %sin %.2f s, guest paused ~%s s%s", name,
                 request.phase, meta.image_id,
                 "live " if getattr(result, "live", False) else "", result.total_s,
                 "?" if paused is None else f"{paused:.2f}",
                 "".join(f", disk {t.vdev} by {t.mechanism} in {t.seconds:.2f} s"
                         for t in taken))
        return Verdict.captured(), ""

    def _crash_check(self, domid: int) -> Callable[[], bool]:
        """For the capture's guard: has ``domid`` crashed (or its watchdog fired)?"""
        def crashed() -> bool:
            state = self.hv.domain_state(domid)
            return state.crashed or state.shutdown_reason == ShutdownReason.WATCHDOG
        return crashed

    def _frozen_check(self, domid: int) -> Callable[[], bool]:
        """For the capture's pause measurement: is ``domid`` suspended or paused?"""
        def frozen() -> bool:
            state = self.hv.domain_state(domid)
            return state.paused or (state.shutdown
                                    and state.shutdown_reason == ShutdownReason.SUSPEND)
        return frozen

    def _snapshotter(self, name: str, snap_disks: dict[str, str],
                     taken: list[disks.DiskSnapshot]) -> WhilePaused:
        """The capture's ``while_paused`` hook: snapshot the ``snapshot`` disks into
        ``taken`` while the guest is held at the instant its memory was saved, so disks
        and memory match without the guest freezing anything. A failure removes what was
        taken and raises :class:`~xenpbr.disksnap.SnapshotError`: nothing is stored (a
        memory image without its disks must never be restored)."""
        def snapshot(image_id: str) -> None:
            try:  # take() removes what it made when it fails
                taken.extend(disks.take(self.store, name, image_id, snap_disks))
            except OSError as exc:
                raise disksnap.SnapshotError(str(exc)) from exc
        return snapshot

    def _over_quota(self, name: str, image_id: str) -> Judgement | None:
        """Past the quota with its disk snapshots, the image is dropped."""
        usage = self.store.usage(name)
        if not usage.over_quota:
            return None
        self.drop_image(name, image_id)
        return (Verdict.refused("quota"),
                f"image with disk snapshots takes {name} to {usage.total} bytes, "
                f"over its quota of {usage.quota}: raise [images] default_quota "
                "in /etc/xenpbr/xenpbr.conf (or $XENPBR_IMAGE_QUOTA) or use a "
                "reflink/thin-capable disk store")

    def release_held_pause(self, held: tuple[str, int]) -> None:
        """At start: unpause a guest a killed xenpbrd left paused for its disk snapshots
        (the record names the domid; a domain that is gone, or not paused because xl
        failed before pausing it, is left alone)."""
        name, domid = held
        try:
            if self.hv.domain_state(domid).paused:
                self.hv.unpause(domid)
                log.warning("%s (domid %d): unpaused; a previous xenpbrd was stopped while "
                            "its capture held the guest paused (no image was published)",
                            name, domid)
        except XenpbrError as exc:
            log.info("%s (domid %d): no held pause to release (%s)", name, domid, exc)
        finally:
            self.state.end_held_pause(name)

    def drop_image(self, name: str, image_id: str) -> None:
        """Delete an image with its disk snapshots; failures are logged (GC finishes)."""
        for step in (self.store.delete, lambda n, i: disks.remove(self.store, n, i)):
            try:
                step(name, image_id)
            except XenpbrError as exc:
                log.error("%s: could not delete image %s: %s", name, image_id, exc)


def _replacing(phases: DomainPhases, phase: str, fingerprint: str) -> str:
    """Why a capture of ``phase`` replaces its image, for the log."""
    old = phases.images.get(phase)
    if old is None:
        return "none"
    if old.abandoned(phases.health[1]):
        return f"abandoned after {old.failures} restores crashed before healthy"
    if not old.verified:
        return "it failed verification"
    return "another fingerprint" if old.fingerprint != fingerprint else "recaptured"


def _log_kept_abandoned(name: str, phases: DomainPhases, phase: str) -> None:
    image = phases.images.get(phase)
    if image is not None and image.abandoned(phases.health[1]):
        log.warning("%s: phase %s skipped: its image %s is abandoned and this run was "
                    "restored from an earlier one; the next fresh boot re-images it",
                    name, phase, image.image_id)
