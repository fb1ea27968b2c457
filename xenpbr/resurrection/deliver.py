"""Dom0's side of delivery: hand one application's recovered records to the recovered guest.

One concern: the xenstore I/O of a delivery (docs/resurrection.md, "Delivery"). Dom0 writes
the payload (:mod:`xenpbr.guestproto.resurrection_delivery`) in base64 chunks under
``control/xenpbr/resurrected/<app>/`` and the manifest ``control/xenpbr/resurrected/<app>``
last, all owned by dom0 and read-only for the guest, so the guest can read but never forge
or alter a delivery; it reads the guest's confirmation strictly, and clears both when done.

A domain gets at most ``cap`` bytes of deliveries in all (the other applications' manifests
count): records that do not fit are not sent, and the application is told it lost them
(reason ``delivery-cap``). Separate from the vault and from extraction because it is the
only part that writes into a guest's xenstore, and from the wire format because the agent
must not load dom0's xenstore client.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Sequence

from xenpbr.errors import XenpbrError
from xenpbr.guestproto.resurrection_delivery import (
    CONFIRM_DIR,
    DELIVERY_DIR,
    Confirmation,
    ConfirmationMalformed,
    DeliveredRecord,
    DeliveryMalformed,
    LostRecord,
    Payload,
    app_key,
    encode_chunks,
    encode_payload,
    lost_size,
    manifest_for,
    parse_confirmation,
    parse_manifest,
    record_size,
)
from xenpbr.resurrection.model import MIB, Record, Rejection
from xenpbr.xenstore.client import Transaction, XenstoreClient
from xenpbr.xenstore.errors import NoSuchKey, XenstoreError
from xenpbr.xenstore.paths import domain_home, validate_domid
from xenpbr.xenstore.permissions import Access, Perm

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_DOMAIN_CAP", "DeliveryError", "DeliveryStats", "clear_delivery",
           "read_confirmation", "write_delivery"]

#: Bytes of payload a domain gets in all its deliveries, by default.
DEFAULT_DOMAIN_CAP = 4 * MIB
#: Chunks written per xenstore transaction (fewer commits, bounded transaction size).
CHUNKS_PER_TRANSACTION = 32
CAP_REASON = "delivery-cap"
HEADER_BYTES = len(encode_payload(Payload((), ())))


class DeliveryError(XenpbrError):
    """Dom0 could not write a delivery into the guest's xenstore (the domain went away, or
    xenstored refused): the records stay in the vault and the delivery can be retried."""


@dataclass(frozen=True)
class DeliveryStats:
    """What one :func:`write_delivery` sent."""

    app: str
    generation: int
    records: int          # records delivered
    over_cap: int         # records not delivered because of the domain's cap (told as lost)
    lost: int             # lost entries listed for the application (extraction + cap)
    bytes: int            # payload bytes
    chunks: int
    crc: int
    seconds: float


def _home(domid: int) -> str:
    return domain_home(validate_domid(domid))


def delivery_dir(domid: int) -> str:
    return f"{_home(domid)}/{DELIVERY_DIR}"


def manifest_path(domid: int, app: str) -> str:
    return f"{delivery_dir(domid)}/{app_key(app)}"


def confirmation_path(domid: int, app: str) -> str:
    return f"{_home(domid)}/{CONFIRM_DIR}/{app_key(app)}"


def _used_by_others(xs: XenstoreClient, domid: int, app: str) -> int:
    """Payload bytes the domain's other deliveries hold (a broken manifest counts as 0:
    it is dom0's own key, and will be overwritten or cleared)."""
    try:
        keys = xs.ls(delivery_dir(domid))
    except NoSuchKey:
        return 0
    used = 0
    for key in keys:
        if key == app_key(app):
            continue
        try:
            used += parse_manifest(xs.read_or(f"{delivery_dir(domid)}/{key}", None)).size
        except DeliveryMalformed:
            continue
    return used


def _lost_entry(rejection: Rejection) -> LostRecord:
    return LostRecord(rejection.reason, rejection.detail, rejection.seq, rejection.key)


def _cap_entry(record: Record, budget: int) -> LostRecord:
    return LostRecord(CAP_REASON, f"over the domain's delivery cap ({budget} bytes left)",
                      record.seq, record.key)


def _fit(records: Sequence[Record], lost: Sequence[Rejection], budget: int) -> Payload:
    """The payload within ``budget`` bytes. Extraction's lost list comes first (being told
    what was lost matters most); then the records in seq order, each kept only if the lost
    entries of all the records after it still fit, so that whatever is cut, the application
    is told which records it lost. Lost entries that cannot be listed are counted."""
    spent = HEADER_BYTES
    listed: list[LostRecord] = []
    for entry in (_lost_entry(r) for r in lost):
        if spent + lost_size(entry) <= budget:
            listed.append(entry)
            spent += lost_size(entry)
    omitted = len(lost) - len(listed)
    ordered = sorted(records, key=lambda r: r.seq)
    tails = [lost_size(_cap_entry(r, budget)) for r in ordered] + [0]
    for i in range(len(ordered) - 1, -1, -1):
        tails[i] += tails[i + 1]
    kept: list[DeliveredRecord] = []
    for i, record in enumerate(ordered):
        item = DeliveredRecord(record.key, record.seq, record.value, record.tombstone)
        if spent + record_size(item) + tails[i + 1] > budget:
            break
        kept.append(item)
        spent += record_size(item)
    for record in ordered[len(kept):]:
        entry = _cap_entry(record, budget)
        if spent + lost_size(entry) <= budget:
            listed.append(entry)
            spent += lost_size(entry)
        else:
            omitted += 1
    return Payload(tuple(kept), tuple(listed), omitted)


def _write_key(t: Transaction, domid: int, path: str, value: bytes | str) -> None:
    t.write(path, value)
    t.set_perms(path, owner=0, others=Access.NONE, acl=[Perm(domid, Access.READ)])


def _start(t: Transaction, domid: int, app: str) -> None:
    """Drop an earlier delivery of ``app`` and create its empty manifest: a guest that
    looks now sees no manifest value and waits."""
    t.mkdir(delivery_dir(domid))
    t.set_perms(delivery_dir(domid), owner=0, others=Access.NONE,
                acl=[Perm(domid, Access.READ)])
    t.rm(manifest_path(domid, app))
    _write_key(t, domid, manifest_path(domid, app), b"")


def _write_chunks(t: Transaction, base: str, first: int, batch: Sequence[bytes]) -> None:
    for i, chunk in enumerate(batch):
        t.write(f"{base}/{first + i}", chunk)


def write_delivery(xs: XenstoreClient, domid: int, app: str, generation: int,
                   records: Sequence[Record], lost: Sequence[Rejection], *,
                   cap: int = DEFAULT_DOMAIN_CAP) -> DeliveryStats:
    """Write ``app``'s records (and what it lost) for domain ``domid``; the manifest last.

    Raises :class:`DeliveryError` if xenstore refuses (e.g. the domain is gone)."""
    started = time.monotonic()
    budget = max(0, cap - _used_by_others(xs, domid, app))
    payload = _fit(records, lost, budget)
    data = encode_payload(payload)
    manifest = manifest_for(generation, data)
    chunks = encode_chunks(data)
    base = manifest_path(domid, app)
    try:
        _remove(xs, confirmation_path(domid, app))  # a new delivery: the old answer is void
        xs.run_transaction(lambda t: _start(t, domid, app))
        for first in range(0, len(chunks), CHUNKS_PER_TRANSACTION):
            batch = chunks[first:first + CHUNKS_PER_TRANSACTION]
            xs.run_transaction(functools.partial(_write_chunks, base=base, first=first,
                                                 batch=batch))
        xs.run_transaction(lambda t: _write_key(t, domid, base, manifest.encode()))
    except XenstoreError as exc:
        raise DeliveryError(f"domain {domid}: cannot deliver {app!r} generation {generation} "
                            f"({len(data)} bytes): {exc}; the records stay in dom0's vault "
                            "('xenpbr resurrected' lists them)") from exc
    over_cap = len(records) - len(payload.records)
    stats = DeliveryStats(app, generation, len(payload.records), over_cap,
                          len(payload.lost) + payload.lost_omitted, len(data), len(chunks),
                          manifest.crc, time.monotonic() - started)
    log.info("domain %d: delivered %s generation %d: %d records, %d lost, %d bytes in %d "
             "chunks, %.3f s", domid, app, generation, stats.records, stats.lost, stats.bytes,
             stats.chunks, stats.seconds)
    if over_cap:
        log.warning("domain %d: %s: %d records over the %d-byte delivery cap were not "
                    "delivered (the application is told it lost them)", domid, app, over_cap,
                    cap)
    return stats


def read_confirmation(xs: XenstoreClient, domid: int, app: str) -> Confirmation | None:
    """The guest's confirmation of ``app``'s delivery, or None if there is none yet or it
    is malformed (logged: dom0 then keeps the records, the safe side)."""
    raw = xs.read_or(confirmation_path(domid, app), None)
    if raw is None:
        return None
    try:
        return parse_confirmation(raw)
    except ConfirmationMalformed as exc:
        log.warning("domain %d: %s: ignoring the guest's confirmation: %s", domid, app, exc)
        return None


def _remove(xs: XenstoreClient, path: str) -> None:
    try:
        xs.rm(path)
    except NoSuchKey:  # its parent is missing too: nothing to remove
        pass


def clear_delivery(xs: XenstoreClient, domid: int, app: str) -> None:
    """Remove ``app``'s delivery and the guest's confirmation of it (absent is fine)."""
    for path in (manifest_path(domid, app), confirmation_path(domid, app)):
        _remove(xs, path)
    log.info("domain %d: delivery of %s cleared", domid, app)
