"""Extraction: read a crashed guest's resurrection regions out of its memory, under caps.

Runs in dom0 between the crash and the domain's destruction. The guest is hostile: its
registrations, headers, directories and records are checked by
:mod:`xenpbr.guestproto.resurrection`; here are the rules across them (the operator's caps
on regions, bytes and seconds, pfns unique within and across regions, the region unchanged
while read) and the reading itself, through a :class:`FrameReader` so tests feed synthetic
memory. Nothing a guest writes makes :func:`extract` raise: every problem becomes a
:class:`~xenpbr.resurrection.model.Rejection` and recovery goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from xenpbr.ctypes_libxc._errcheck import XenCallError
from xenpbr.errors import XenpbrError
from xenpbr.guestproto.resurrection import (
    APP_NAME,
    PAGE_SIZE,
    REGISTRATION_DIR,
    RegionFormatError,
    RegionHeader,
    parse_directory,
    parse_header,
    parse_registration,
    parse_slots,
)
from xenpbr.hypervisor.guest_memory import GuestMemory, GuestMemoryError
from xenpbr.resurrection.model import AppExtraction, Caps, Extraction, Registration, Rejection
from xenpbr.xenstore import XenstoreClient, XenstoreError

log = logging.getLogger(__name__)

#: Pages read per call while reading a record area: the time cap is checked between calls.
READ_BATCH = 256


class FrameReader(Protocol):
    """Copies of a guest's pages by pfn; raises ``PfnNotPresent`` (or another
    ``GuestMemoryError``) for a pfn the guest does not own."""

    def read_pfns(self, pfns: Sequence[int]) -> list[bytes]: ...


class FramesUnreadable(GuestMemoryError):
    """Xen refused to map frames the guest's P2M names (the domain vanished, or a frame
    is not the guest's to give)."""


class GuestMemoryFrames:
    """:class:`FrameReader` over :class:`~xenpbr.hypervisor.guest_memory.GuestMemory`:
    only the domain's own frames (its P2M), mapped in one batch per call."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def read_pfns(self, pfns: Sequence[int]) -> list[bytes]:
        if not pfns:
            return []
        try:
            with self.memory.map_pfns(pfns) as mapping:
                view = mapping.memoryview
                return [bytes(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
                        for i in range(len(pfns))]
        except XenCallError as exc:
            raise FramesUnreadable(f"domain {self.memory.domid}: cannot map "
                                   f"{len(pfns)} frame(s): {exc}") from exc


class RegistrationSet(dict[str, bytes]):
    """Registrations read from xenstore (app -> raw value), and those refused on the way."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[Rejection] = []


def read_registrations(xs: XenstoreClient, domid: int, limit: int) -> RegistrationSet:
    """The raw registrations under the guest's ``data/xenpbr/resurrect``: at most ``limit``
    (in name order); the rest are refused together, as one ``too-many`` refusal named
    ``<n>-more``."""
    base = f"/local/domain/{domid}/{REGISTRATION_DIR}"
    found = RegistrationSet()
    try:
        names = sorted(xs.ls(base))
    except XenstoreError as exc:
        log.debug("domain %d: no resurrection registrations (%s)", domid, exc)
        return found
    rest = names[limit:]
    if rest:  # one refusal for all of them: a guest may hold a thousand names
        found.refused.append(Rejection(f"{len(rest)}-more", "too-many",
                                       f"{len(rest)} registrations past the first {limit} "
                                       f"(from {rest[0][:64]!r}) were not read"))
    for name in names[:limit]:
        try:
            found[name] = xs.read(f"{base}/{name}")
        except XenstoreError as exc:
            found.refused.append(Rejection(name[:64], "registration", f"unreadable: {exc}"))
    return found


class _Refused(XenpbrError):
    """Internal: a region is given up for ``rejection`` (never leaves this module)."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.reason)
        self.rejection = rejection


class _Budget:
    """The per-domain caps as they are spent: bytes read and the deadline."""

    def __init__(self, caps: Caps, clock: Callable[[], float]) -> None:
        self.caps = caps
        self.clock = clock
        self.start = clock()
        self.bytes_read = 0
        self.timed_out = False

    def check_time(self, app: str) -> None:
        if self.clock() - self.start > self.caps.seconds:
            self.timed_out = True
            raise _Refused(Rejection(app, "timeout", f"over the {self.caps.seconds} s cap"))

    def reserve(self, app: str, pages: int) -> None:
        """Refuse up front a region whose reading would pass the byte cap, so that a huge
        region costs nothing and the regions after it still get their share."""
        wanted = pages * PAGE_SIZE
        if self.bytes_read + wanted > self.caps.bytes:
            raise _Refused(Rejection(app, "cap-bytes", f"{wanted} bytes to read would pass "
                                                       f"the {self.caps.bytes}-byte cap "
                                                       f"({self.bytes_read} already read)"))

    def spend(self, pages: int) -> None:
        """Count pages read (:meth:`reserve` checked the cap for the whole region)."""
        self.bytes_read += pages * PAGE_SIZE


class _RegionReader:
    """Reads one region, page batches at a time, charging the budget before each read."""

    def __init__(self, memory: FrameReader, budget: _Budget, registration: Registration,
                 claimed: set[int]) -> None:
        self.memory = memory
        self.budget = budget
        self.reg = registration
        self.claimed = claimed

    def refuse(self, reason: str, detail: str) -> _Refused:
        return _Refused(Rejection(self.reg.app, reason, detail))

    def read(self, pfns: Sequence[int]) -> list[bytes]:
        self.budget.check_time(self.reg.app)
        self.budget.spend(len(pfns))
        try:
            pages = self.memory.read_pfns(pfns)
        except GuestMemoryError as exc:
            raise self.refuse("pfn", str(exc)) from exc
        if len(pages) != len(pfns) or any(len(p) != PAGE_SIZE for p in pages):
            raise self.refuse("pfn", "the frame reader returned short pages")
        return pages

    def claim(self, pfns: Sequence[int]) -> None:
        taken = self.claimed.intersection(pfns)
        if taken:
            raise self.refuse("overlap", f"pfn {min(taken):#x} belongs to another region")

    def header(self) -> tuple[bytes, RegionHeader]:
        reg = self.reg
        raw = self.read([reg.header_pfn])[0]
        header = parse_header(raw)
        if (header.app, header.generation, header.page_count) != (
                reg.app, reg.generation, reg.page_count):
            raise self.refuse("mismatch", f"header says {header.app} generation "
                                          f"{header.generation}, {header.page_count} pages")
        return raw, header

    def area(self, pfns: Sequence[int], header: RegionHeader) -> bytes:
        chunks: list[bytes] = []
        area_pfns = pfns[header.first_record_page:]
        for start in range(0, len(area_pfns), READ_BATCH):
            chunks.extend(self.read(area_pfns[start:start + READ_BATCH]))
        return b"".join(chunks)

    def extract(self) -> AppExtraction:
        reg = self.reg
        result = AppExtraction(reg.app, reg.generation)
        # free checks first: pfns another region holds, then the byte cap for every page
        # once plus the header and directory again (the ``changed`` check)
        self.claim([reg.header_pfn, *reg.dir_pfns])
        self.budget.reserve(reg.app, reg.page_count + 1 + len(reg.dir_pfns))
        raw_header, header = self.header()
        raw_dir = self.read(list(reg.dir_pfns))
        pfns = parse_directory(raw_dir, header, reg.header_pfn, reg.dir_pfns)
        self.claim(pfns[1 + header.dir_pages:])
        area = self.area(pfns, header)
        if self.read([reg.header_pfn, *reg.dir_pfns]) != [raw_header, *raw_dir]:
            raise self.refuse("changed", "the header or directory changed while read")
        self.claimed.update(pfns)
        result.records, result.rejections = parse_slots(area, header)
        return result


def _registrations(raw: Mapping[str, bytes], caps: Caps,
                   refused: list[Rejection]) -> list[Registration]:
    parsed: list[Registration] = []
    for app in sorted(raw):
        if not APP_NAME.match(app):
            refused.append(Rejection(app[:64], "registration", "bad application name"))
            continue
        if len(parsed) >= caps.regions:
            refused.append(Rejection(app, "cap-regions", f"over the cap of {caps.regions}"))
            continue
        try:
            parsed.append(parse_registration(app, raw[app]))
        except RegionFormatError as exc:
            refused.append(Rejection(app, exc.reason, exc.detail))
    return parsed


def _extract_one(reader: _RegionReader, budget: _Budget) -> AppExtraction:
    reg = reader.reg
    started, bytes_before = budget.clock(), budget.bytes_read
    try:
        result = reader.extract()
    except _Refused as exc:
        result = AppExtraction(reg.app, reg.generation, rejections=[exc.rejection])
    except RegionFormatError as exc:
        result = AppExtraction(reg.app, reg.generation,
                               rejections=[Rejection(reg.app, exc.reason, exc.detail)])
    result.bytes_read = budget.bytes_read - bytes_before
    result.seconds = budget.clock() - started
    return result


def extract(memory: FrameReader, registrations: Mapping[str, bytes], caps: Caps, *,
            domid: int, clock: Callable[[], float] = time.monotonic) -> Extraction:
    """Read every registered region of crashed domain ``domid`` within ``caps``.

    Never raises for anything the guest wrote: refusals before a region is read go to
    ``Extraction.refused``, problems with a region or record to its ``AppExtraction``.
    """
    budget = _Budget(caps, clock)
    result = Extraction(domid, refused=list(getattr(registrations, "refused", [])))
    claimed: set[int] = set()
    for reg in _registrations(registrations, caps, result.refused):
        if budget.timed_out:
            result.refused.append(Rejection(reg.app, "timeout", "the time cap ran out first"))
            continue
        app = _extract_one(_RegionReader(memory, budget, reg, claimed), budget)
        result.apps.append(app)
        log.info("domain %d: %s generation %d: %d record(s), %d rejection(s), %d bytes",
                 domid, app.app, app.generation, len(app.records), len(app.rejections),
                 app.bytes_read)
    result.seconds = clock() - budget.start
    result.timed_out = budget.timed_out
    return result
