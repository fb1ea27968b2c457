"""Per-domain phase bookkeeping: which images are valid and what to restore after a crash.

Pure logic (no Xen, no disk): the daemon feeds it facts (an image was captured, a
recovery happened, the guest crashed at time t) and asks it for decisions (is this
boundary worth a capture, which recovery plan to follow). Keeping it free of I/O makes
every rule of DESIGN.md's ``phases`` bullet unit-testable with a fake clock:

* **Validity**: an image is only restored if its fingerprint equals the domain's current
  one (kernel, ramdisk, command line, memory, vCPUs, disks and their policies, the
  guest's declared phase list and identity). Anything else is stale and says why.
* **Fallback chain**: deepest valid image, then each earlier valid image, then a normal
  reboot, so the domain is never left down.
* **Crash-loop guard**: a guest that crashes again within ``loop_window`` seconds of a
  phase-based reboot is recovered from one phase earlier than last time; after
  ``max_quick_crashes`` such crashes in a row it gets a normal reboot.
* **Image health**: the guard only sees crashes close together; a poisoned image (or one
  holding a latent fault) re-crashes at its own pace. So each image-based restore is put
  on *trial* until the guest proves healthy (reported ``ready`` for that generation and
  then stayed up ``healthy_after`` seconds, judged at its next crash); ``image_failures``
  restores in a row that crashed before that abandon the image for the earlier phases,
  whatever the time between crashes. A fresh image of the phase starts with no failures.
* **Replacement**: a guest may replace an image it already has (another fingerprint,
  e.g. a new ``identity``) only from a run that has not yet passed that phase, and not
  sooner than ``REPLACE_MIN_AGE_S`` after the image was captured (:meth:`replacement`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

NORMAL_REBOOT = "normal-reboot"

#: ``(healthy_after_s, image_failures)`` when the domain config sets neither: see
#: :func:`xenpbr.domconfig.health_policy` for why.
HEALTH_DEFAULTS = (120.0, 2)
#: A valid image younger than this is never replaced by a capture with another
#: fingerprint: a guest flipping its identity cannot make dom0 save it again and again.
REPLACE_MIN_AGE_S = 300.0


@dataclass(frozen=True)
class Fingerprint:
    """What makes a fresh boot reproduce the state an image holds.

    ``kernel`` and ``ramdisk`` are content digests (not paths: a package upgrade that
    replaces the file in place must invalidate images); ``disks`` lists
    ``(vdev, identity, policy)`` where identity names the backing object.
    """

    kernel: str
    ramdisk: str
    cmdline: str
    memory_mib: int
    vcpus: int
    disks: tuple[tuple[str, str, str], ...]
    phases: tuple[str, ...]
    identity: str

    def digest(self) -> str:
        """A stable short digest, stored with each image and compared on restore."""
        canonical = json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"),
                               default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def differences(self, other: "Fingerprint") -> list[str]:
        """Names of the fields that differ, for a message saying why an image is stale."""
        return [name for name in self.__dataclass_fields__
                if getattr(self, name) != getattr(other, name)]


@dataclass(frozen=True)
class ImageInfo:
    """What the phase logic needs to know about one stored image."""

    image_id: str
    phase: str
    fingerprint: str
    created_at: float
    verified: bool = True  # False if the store found it corrupt
    seq: int = 0  # the boundary seq the image's agent waits on (the ack after restore)
    capture_s: float | None = None  # boundary request accepted -> image committed
    paused_s: float | None = None  # how long the guest stood still for it (estimate)
    disks_s: float | None = None  # snapshotting its ``snapshot`` disks (guest frozen)
    disk_mechanisms: str = ""  # "xvda=reflink,xvdc=copy"
    failures: int = 0  # restores in a row that crashed before the guest proved healthy
    replaced: str = ""  # id of the image of this phase it replaced (another fingerprint)

    def abandoned(self, limit: int) -> bool:
        """True once ``limit`` restores of this image in a row ended in a crash before
        the guest proved healthy: restoring it again would re-run what crashed it."""
        return self.failures >= limit


@dataclass
class Trial:
    """The last image-based restore, until the guest proves healthy (or crashes).

    Times are monotonic seconds; ``ready_at`` is when the restored guest reported
    ``ready`` for ``generation`` (None: not yet, or its post-restore steps failed).
    """

    image_id: str
    phase: str
    generation: int
    restored_at: float
    ready_at: float | None = None

    def healthy(self, now: float, healthy_after: float) -> bool:
        """Did the guest prove healthy before ``now`` (its crash)? A negative gap means
        the clock restarted (dom0 rebooted): not held against the image."""
        if self.ready_at is None:
            return now < self.restored_at
        return now - self.ready_at >= healthy_after or now < self.ready_at


@dataclass(frozen=True)
class Candidate:
    """One step of a recovery plan: an image to restore, or a normal reboot."""

    image: ImageInfo | None
    reason: str

    @property
    def is_normal_reboot(self) -> bool:
        return self.image is None


@dataclass(frozen=True)
class RecoveryPlan:
    """Ordered candidates; the daemon tries each until one brings the domain back."""

    candidates: tuple[Candidate, ...]
    skipped: tuple[str, ...] = ()  # why images were not considered (shown in history)

    @property
    def first(self) -> Candidate:
        return self.candidates[0]


@dataclass
class CrashLoopGuard:
    """Tracks quick re-crashes after phase-based reboots.

    ``depth_penalty`` is how many of the deepest phases to skip on the next recovery;
    it grows by one for each crash within ``loop_window`` of the previous recovery and
    resets when the guest survives longer than that.
    """

    loop_window: float = 60.0
    max_quick_crashes: int = 3
    last_recovery_at: float | None = None
    quick_crashes: int = 0

    def on_crash(self, now: float) -> None:
        """Record a crash at ``now`` (monotonic seconds)."""
        # A negative gap means the clock restarted (dom0 rebooted): not a quick crash.
        quick = (self.last_recovery_at is not None
                 and 0 <= now - self.last_recovery_at < self.loop_window)
        self.quick_crashes = self.quick_crashes + 1 if quick else 0

    def on_recovered(self, now: float) -> None:
        """Record that a recovery finished at ``now``."""
        self.last_recovery_at = now

    @property
    def force_normal_reboot(self) -> bool:
        return self.quick_crashes >= self.max_quick_crashes

    @property
    def depth_penalty(self) -> int:
        return self.quick_crashes


def order_by_phase(images: Iterable[ImageInfo], phases: Sequence[str]) -> list[ImageInfo]:
    """Images of known phases, deepest phase first (newest first within a phase)."""
    rank = {name: i for i, name in enumerate(phases)}
    known = [img for img in images if img.phase in rank]
    return sorted(known, key=lambda img: (rank[img.phase], img.created_at), reverse=True)


def plan_recovery(images: Iterable[ImageInfo], phases: Sequence[str], current: str,
                  guard: CrashLoopGuard, max_phase: str | None = None,
                  image_failures: int = HEALTH_DEFAULTS[1]) -> RecoveryPlan:
    """Which images to try, in order, ending with a normal reboot.

    ``current`` is the domain's current fingerprint digest: images with another one are
    skipped (with the reason kept for the operator), as are images the store could not
    verify, and images abandoned after ``image_failures`` unhealthy restores. The
    crash-loop guard drops the deepest ``depth_penalty`` usable phases, or
    everything when it forces a normal reboot.
    """
    skipped: list[str] = []
    usable: list[ImageInfo] = []
    limit = phases.index(max_phase) if max_phase in phases else len(phases)
    for img in order_by_phase(images, phases):
        if phases.index(img.phase) > limit:
            skipped.append(f"{img.image_id} ({img.phase}): deeper than the requested "
                           f"phase {max_phase}")
        elif not img.verified:
            skipped.append(f"{img.image_id} ({img.phase}): failed verification")
        elif img.fingerprint != current:
            skipped.append(f"{img.image_id} ({img.phase}): stale fingerprint")
        elif img.abandoned(image_failures):
            skipped.append(f"{img.image_id} ({img.phase}): abandoned: {img.failures} "
                           f"restores crashed before healthy")
        elif img.phase not in {u.phase for u in usable}:
            usable.append(img)  # one image per phase: the newest valid one
    candidates: list[Candidate] = []
    if guard.force_normal_reboot:
        skipped.append(f"crash loop: {guard.quick_crashes} crashes within "
                       f"{guard.loop_window:.0f} s of a recovery; rebooting normally")
    else:
        penalty = guard.depth_penalty
        if penalty:
            skipped += [f"{img.image_id} ({img.phase}): crash-loop guard skips it"
                        for img in usable[:penalty]]
        candidates = [Candidate(img, "deepest valid image" if i == 0 else "fallback")
                      for i, img in enumerate(usable[penalty:])]
    candidates.append(Candidate(None, "no usable image left" if not candidates
                                else "last resort"))
    return RecoveryPlan(tuple(candidates), tuple(skipped))


@dataclass
class DomainPhases:
    """The phase state of one registered domain (persisted by the daemon as JSON)."""

    name: str
    phases: tuple[str, ...] = ()
    fingerprint: str = ""
    generation: int = 0
    images: dict[str, ImageInfo] = field(default_factory=dict)  # phase -> newest image
    guard: CrashLoopGuard = field(default_factory=CrashLoopGuard)
    trial: Trial | None = None  # the last image restore, until proven healthy
    health: tuple[float, int] = HEALTH_DEFAULTS  # (healthy_after_s, image_failures)

    def boundary_decision(self, phase: str, fingerprint: str,
                          restored_run: bool = False) -> str:
        """``capture`` or ``skip`` for a boundary the guest just reached.

        A valid image of this phase with the same fingerprint makes a capture pointless
        (the result of the phase is already known); anything else is captured. An
        abandoned image is replaced only by a fresh boot's capture: a run restored from
        an earlier image (``restored_run``) is the fallback on trial, and re-imaging the
        phase from it would put the same state back at the top of the next plan.
        """
        existing = self.images.get(phase)
        if existing is None or existing.fingerprint != fingerprint or not existing.verified:
            return "capture"
        if existing.abandoned(self.health[1]):
            return "skip" if restored_run else "capture"
        return "skip"

    def replacement(self, phase: str, passed: bool, now: float) -> str | None:
        """Why a capture of ``phase`` may not replace the image the domain has, or None.

        Only a usable image (verified, not abandoned) is protected. ``passed`` says the
        requesting run already went through this phase (it was judged in this run, or
        the run was restored from this phase's image or a later one): a run reaches a
        boundary once, so a second request with another fingerprint is a guest
        rewriting what it already proved, refused as ``out-of-order``. Otherwise the
        image must be at least ``REPLACE_MIN_AGE_S`` old (wall clock), ``rate-limited``.
        """
        existing = self.images.get(phase)
        if existing is None or not existing.verified or existing.abandoned(self.health[1]):
            return None
        if passed:
            return "out-of-order"
        if 0 <= now - existing.created_at < REPLACE_MIN_AGE_S:
            return "rate-limited"
        return None

    def passed_by_restore(self, phase: str) -> bool:
        """True if the current run was restored from ``phase``'s image or a later one
        (so it has passed ``phase`` without asking dom0 in this run)."""
        if self.trial is None or self.trial.phase not in self.phases or phase not in self.phases:
            return False
        return self.phases.index(phase) <= self.phases.index(self.trial.phase)

    def record_image(self, image: ImageInfo) -> None:
        """Remember ``image`` as the newest of its phase (with no failures: it is another
        image than the one it replaces, whatever that one's history)."""
        old = self.images.get(image.phase)
        if old is not None and old.image_id != image.image_id and not image.replaced:
            image = replace(image, replaced=old.image_id)
        self.images[image.phase] = replace(image, failures=0)

    def forget(self, phase: str | None = None) -> list[ImageInfo]:
        """Drop the image of ``phase`` and every later phase (all if None); return them.

        Later phases are dropped too: their images were taken on top of the earlier
        phase's state, so invalidating one phase invalidates what follows it.
        """
        if phase is None:
            dropped = list(self.images.values())
            self.images.clear()
            return dropped
        order = list(self.phases) or sorted(self.images)
        start = order.index(phase) if phase in order else len(order)
        doomed = set(order[start:]) | ({phase} if phase not in order else set())
        dropped = [img for p, img in self.images.items() if p in doomed]
        self.images = {p: img for p, img in self.images.items() if p not in doomed}
        return dropped

    def plan(self, now: float, max_phase: str | None = None,
             crash_loop: tuple[float, int] | None = None, crashed: bool = True,
             health: tuple[float, int] | None = None) -> RecoveryPlan:
        """Record a crash at ``now`` and return the recovery plan for it (no deeper than
        ``max_phase`` if given: an operator's ``xenpbr reboot --phase``). ``crash_loop``
        is the domain's configured ``(window_s, limit)`` for the guard, ``health`` its
        ``(healthy_after_s, image_failures)``; an operator's reboot (``crashed=False``)
        is not a crash: it feeds neither the guard nor the image's failure count."""
        if crash_loop is not None:
            self.guard.loop_window, self.guard.max_quick_crashes = crash_loop
        if health is not None:
            self.health = health
        notes: list[str] = []
        if crashed:
            self.guard.on_crash(now)
            notes = self._judge_trial(now)
        self.trial = None
        plan = plan_recovery(self.images.values(), self.phases, self.fingerprint, self.guard,
                             max_phase, self.health[1])
        return replace(plan, skipped=(*notes, *plan.skipped))

    def _judge_trial(self, now: float) -> list[str]:
        """Count the crash against the image last restored if the guest had not proven
        healthy yet (reset its count if it had); what happened, for the history."""
        trial = self.trial
        image = self.images.get(trial.phase) if trial is not None else None
        if trial is None or image is None or image.image_id != trial.image_id:
            return []  # a normal boot, or the image was replaced meanwhile
        healthy_after, limit = self.health
        if trial.healthy(now, healthy_after):
            self.images[trial.phase] = replace(image, failures=0)
            return []
        image = self.images[trial.phase] = replace(image, failures=image.failures + 1)
        ready = ("never reported ready" if trial.ready_at is None
                 else f"crashed {now - trial.ready_at:.0f} s after ready, before "
                      f"{healthy_after:.0f} s")
        note = (f"{image.image_id} ({image.phase}): restore {image.failures} of "
                f"{limit} crashed before healthy ({ready})")
        if image.abandoned(limit):
            note += "; image abandoned"
        return [note]

    def guest_ready(self, generation: int, now: float) -> bool:
        """The restored guest reported ``ready`` for ``generation``: start its healthy
        clock (True if this changed the trial; a note for another generation is not)."""
        trial = self.trial
        if trial is None or trial.generation != generation or trial.ready_at is not None:
            return False
        trial.ready_at = now
        return True

    def mark_unusable(self, image_id: str) -> None:
        """The store or xl rejected ``image_id``: never plan it again."""
        for phase, img in self.images.items():
            if img.image_id == image_id:
                self.images[phase] = replace(img, verified=False)

    def recovered(self, now: float, via_image: bool, image: ImageInfo | None = None) -> None:
        """A recovery finished; bump the generation if it was phase-based, and put the
        restored ``image`` on trial until the guest proves healthy."""
        self.guard.on_recovered(now)
        self.trial = None
        if via_image:
            self.generation += 1
            if image is not None:
                self.trial = Trial(image.image_id, image.phase, self.generation, now)
        else:
            self.guard = replace(self.guard, quick_crashes=0, last_recovery_at=None)
