"""The timeline of one recovery: what happened when, kept on disk, shown by the CLI.

Each recovery (a crash, a watchdog, or an operator's ``xenpbr reboot``) records named
marks with both clocks: monotonic time for durations (immune to clock steps) and wall
time for the operator. The mark names are fixed so tools can compare recoveries:
``crash_seen``, ``image_chosen``, ``extracted``, ``destroyed``, ``restore_started``,
``restore_finished``, ``devices_ready``, ``guest_ack``, ``service_ready``, ``delivered``.
``extracted`` (resurrection read the crashed memory, before the destroy) comes with a
per-application summary, :class:`AppResurrection`, kept in :attr:`Timeline.resurrection`;
``delivered`` (one per application, detail ``<app> generation <g>``) is added when the
recovered guest confirmed it received that application's data.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

MARKS = ("crash_seen", "image_chosen", "extracted", "destroyed", "restore_started",
         "restore_finished",
         "devices_ready", "guest_ack", "service_ready", "delivered")


@dataclass
class Mark:
    """One point of the timeline."""

    name: str
    monotonic: float
    wall: float
    detail: str = ""


@dataclass
class AppResurrection:
    """What one recovery's extraction got for one application: regions read and kept
    (0 or 1: one region per registration), records kept, rejections by reason (the region
    or its records), bytes read from the crashed memory, seconds spent on it."""

    app: str
    regions: int = 0
    records: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0

    def brief(self) -> str:
        """One line: ``kv: 1 region, 120 records, rejected crc x2, 8192 B, 0.004 s``."""
        rejected = ", ".join(f"{reason} x{n}" for reason, n in sorted(self.rejected.items()))
        return (f"{self.app}: {self.regions} region{'s' if self.regions != 1 else ''}, "
                f"{self.records} records, rejected {rejected or 'none'}, {self.bytes} B, "
                f"{self.seconds:.3f} s")


@dataclass
class Timeline:
    """The marks and outcome of one recovery of one domain."""

    domain: str
    trigger: str  # crash | watchdog | operator | resume (after xenpbrd's restart)
    marks: list[Mark] = field(default_factory=list)
    method: str = ""  # phase:<name> | normal-reboot
    outcome: str = "in-progress"  # recovered | failed
    attempts: list[str] = field(default_factory=list)  # what was tried, in order
    skipped: list[str] = field(default_factory=list)  # images not used, and why
    generation: int | None = None  # the generation a phase-based reboot acknowledged
    domid: int | None = None  # the domain it brought back (published as the domid)
    resurrection: list[AppResurrection] = field(default_factory=list)  # per application

    def mark(self, name: str, detail: str = "", now: float | None = None) -> Mark:
        """Record ``name`` now (or at monotonic time ``now``)."""
        if name not in MARKS:
            raise ValueError(f"unknown timeline mark {name!r}; known: {', '.join(MARKS)}")
        mono = time.monotonic() if now is None else now
        entry = Mark(name, mono, time.time() - (time.monotonic() - mono), detail)
        self.marks.append(entry)
        return entry

    def note_guest(self, state: str, generation: int, now: float) -> bool:
        """Mark what a restored guest's agent reported (``acked``, ``ready`` or
        ``steps-failed`` for ``generation``); True if a mark was added. Reports for another
        generation (an older restore, or a lying guest) are ignored."""
        if self.generation != generation or self.outcome != "recovered":
            return False
        added = False
        if self.at("guest_ack") is None:
            self.mark("guest_ack", now=now)
            added = True
        if state != "acked" and self.at("service_ready") is None:
            self.mark("service_ready", "" if state == "ready" else state, now=now)
            added = True
        return added

    def note_delivered(self, app: str, generation: int, now: float) -> bool:
        """Mark that the guest confirmed ``app``'s data (``generation``) arrived; True if a
        mark was added. Only for an application this recovery extracted, once each."""
        detail = f"{app} generation {generation}"
        if app not in {a.app for a in self.resurrection}:
            return False
        if any(m.name == "delivered" and m.detail.split(" ")[0] == app for m in self.marks):
            return False
        self.mark("delivered", detail, now=now)
        return True

    def at(self, name: str) -> float | None:
        """Monotonic time of the first mark ``name``, if recorded."""
        return next((m.monotonic for m in self.marks if m.name == name), None)

    def since_crash(self) -> dict[str, float]:
        """Seconds from ``crash_seen`` to each later mark (the recovery breakdown)."""
        start = self.at("crash_seen")
        if start is None:
            return {}
        return {m.name: round(m.monotonic - start, 3) for m in self.marks}

    def downtime(self) -> float | None:
        """Crash seen to the last of guest ack / service ready / restore finished."""
        start = self.at("crash_seen")
        ends = [t for n in ("service_ready", "guest_ack", "restore_finished")
                if (t := self.at(n)) is not None]
        return None if start is None or not ends else round(max(ends) - start, 3)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["since_crash"] = self.since_crash()
        data["downtime_s"] = self.downtime()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Timeline":
        marks = [Mark(**m) for m in data.get("marks", [])]
        fields = {k: data[k] for k in ("domain", "trigger", "method", "outcome", "attempts",
                                       "skipped", "generation", "domid") if k in data}
        apps = [AppResurrection(**a) for a in data.get("resurrection", [])]
        return cls(marks=marks, resurrection=apps, **fields)
