"""The values resurrection passes between its steps: caps, registrations, records, verdicts.

Separate so extraction (reading a crashed guest), the vault (dom0's durable copy), delivery
(back into the guest) and the operator's views (history, status, CLI) share one vocabulary
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20


@dataclass(frozen=True)
class Caps:
    """The operator's limits for one domain's extraction (``xenpbr_resurrect`` in its
    config): a guest can make dom0 read at most ``regions`` regions, ``bytes`` bytes in all,
    for at most ``seconds``; whatever is not done by then is given up, and recovery goes on.

    ``bytes`` is what bounds the work a guest can cause (reading 256 pages took 0.05-0.12 s
    under emulation). ``seconds`` is a backstop for a dom0 too starved to read at all, so
    it defaults to the largest allowed: at 2 s it cut the application's region off in 2
    of 38 crashes of the LKDTM campaign (docs/faults.md), on a machine busy recovering
    other guests, although nothing was wrong with the region."""

    regions: int = 8
    bytes: int = 16 * MIB
    seconds: float = 30.0


@dataclass(frozen=True)
class Registration:
    """One application's registration, as parsed from ``data/xenpbr/resurrect/<app>``."""

    app: str
    generation: int
    page_count: int
    header_pfn: int
    dir_pfns: tuple[int, ...]


@dataclass(frozen=True)
class Record:
    """The winning version of one key: the valid record with the largest ``seq``."""

    key: bytes
    seq: int
    value: bytes
    tombstone: bool = False


@dataclass(frozen=True)
class Rejection:
    """Something dom0 refused, with a reason token an operator can look up
    (docs/resurrection.md): a whole registration or region (``slot is None``) or one record.
    ``seq`` and ``key`` are given where they could still be read, so the application can be
    told what it lost."""

    app: str
    reason: str
    detail: str = ""
    slot: int | None = None
    seq: int | None = None
    key: bytes | None = None


@dataclass
class AppExtraction:
    """What extraction got from one application's region."""

    app: str
    generation: int
    records: list[Record] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def kept(self) -> bool:
        """True if the region itself was valid (records may still have been rejected)."""
        return not any(r.slot is None for r in self.rejections)


@dataclass
class Extraction:
    """One crashed domain's extraction: per application, plus what was refused before any
    region was read (bad registrations, over the caps) and whether the time cap cut it."""

    domid: int
    apps: list[AppExtraction] = field(default_factory=list)
    refused: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    timed_out: bool = False
