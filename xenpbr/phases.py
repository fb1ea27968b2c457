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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

NORMAL_REBOOT = "normal-reboot"


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
                  guard: CrashLoopGuard, max_phase: str | None = None) -> RecoveryPlan:
    """Which images to try, in order, ending with a normal reboot.

    ``current`` is the domain's current fingerprint digest: images with another one are
    skipped (with the reason kept for the operator), as are images the store could not
    verify. The crash-loop guard drops the deepest ``depth_penalty`` usable phases, or
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

    def boundary_decision(self, phase: str, fingerprint: str) -> str:
        """``capture`` or ``skip`` for a boundary the guest just reached.

        A valid image of this phase with the same fingerprint makes a capture pointless
        (the result of the phase is already known); anything else is captured.
        """
        existing = self.images.get(phase)
        if existing is not None and existing.fingerprint == fingerprint and existing.verified:
            return "skip"
        return "capture"

    def record_image(self, image: ImageInfo) -> None:
        """Remember ``image`` as the newest of its phase."""
        self.images[image.phase] = image

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
             crash_loop: tuple[float, int] | None = None, crashed: bool = True) -> RecoveryPlan:
        """Record a crash at ``now`` and return the recovery plan for it (no deeper than
        ``max_phase`` if given: an operator's ``xenpbr reboot --phase``). ``crash_loop``
        is the domain's configured ``(window_s, limit)`` for the guard; an operator's
        reboot (``crashed=False``) is not a crash and does not feed the guard."""
        if crash_loop is not None:
            self.guard.loop_window, self.guard.max_quick_crashes = crash_loop
        if crashed:
            self.guard.on_crash(now)
        return plan_recovery(self.images.values(), self.phases, self.fingerprint, self.guard,
                             max_phase)

    def mark_unusable(self, image_id: str) -> None:
        """The store or xl rejected ``image_id``: never plan it again."""
        for phase, img in self.images.items():
            if img.image_id == image_id:
                self.images[phase] = replace(img, verified=False)

    def recovered(self, now: float, via_image: bool) -> None:
        """A recovery finished; bump the generation if it was phase-based."""
        self.guard.on_recovered(now)
        if via_image:
            self.generation += 1
        else:
            self.guard = replace(self.guard, quick_crashes=0, last_recovery_at=None)
