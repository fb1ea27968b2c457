"""The boundary request parser: untrusted guest bytes in, a :class:`BoundaryRequest` out.

One concern: turning the bytes of a guest's ``data/xenpbr/request`` into a validated
:class:`~xenpbr.guestproto.wire.BoundaryRequest` or a typed
:class:`~xenpbr.guestproto.wire.RequestRefused` (and the reverse, for the agent). It is
separate from :mod:`xenpbr.guestproto.wire` because it is the one part of the wire format
with an attack surface of its own, and like the wire module it imports nothing that
touches xenstore or Xen, so the guest agent encodes with the code dom0 validates with.

Rules that keep dom0 safe, whatever the guest writes: the parser reads at most
:data:`~xenpbr.guestproto.wire.MAX_REQUEST_BYTES`, checks nesting depth before
``json.loads`` runs, rejects NaN/Infinity, duplicate keys, unknown keys, floats and
bools where integers are expected, and bounds every list and string; it raises nothing
but ``RequestRefused`` for bad input, and parsing is linear in at most 1900 bytes.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from xenpbr.guestproto.wire import (
    DEVICE,
    FIELDS,
    HAZARD,
    IDENTITY,
    MAX_DEPTH,
    MAX_DISKS,
    MAX_HAZARDS,
    MAX_PHASES,
    MAX_REQUEST_BYTES,
    MAX_SERVICES,
    MAX_WAIT_SECONDS,
    MOUNT,
    PHASE_NAME,
    PROTOCOL_VERSION,
    SEQ_LIMIT,
    SERVICE,
    BoundaryRequest,
    DiskState,
    RequestRefused,
    escape_for_log,
    is_strict_int,
)

log = logging.getLogger(__name__)

__all__ = ["encode_request", "parse_request"]

#: json.loads turns longer digit strings into this marker instead of converting them
#: (int() of thousands of digits is wasted work; no field needs more than 10 digits).
_MAX_INT_DIGITS = 20
_DISK_FIELDS = frozenset({"dev", "mount", "rw"})
#: Optional disk keys: ``frozen`` (the agent froze this file system for the boundary).
_DISK_OPTIONAL = frozenset({"frozen"})


class _BadInput(Exception):
    """Internal: ``json.loads`` hooks raise this; turned into :class:`RequestRefused`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def encode_request(request: BoundaryRequest) -> bytes:
    """The bytes an agent writes for ``request``; checked with :func:`parse_request` so an
    agent finds its own mistakes (e.g. too many services) before dom0 refuses them."""
    raw = json.dumps(request.to_json(), separators=(",", ":"), ensure_ascii=True).encode()
    parse_request(raw)
    return raw


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _BadInput("duplicate-key",
                        f"a JSON object repeats a key among {escape_for_log(keys)}")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise _BadInput("json", f"{name} is not JSON")


class _HugeInt:
    """Stands for an integer literal too long to be any field's value."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


def _parse_int(text: str) -> int | _HugeInt:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        return _HugeInt(len(text))
    return int(text)


def _nesting_ok(text: str, limit: int = MAX_DEPTH) -> bool:
    """True if arrays/objects nest at most ``limit`` deep (brackets inside strings don't
    count). Runs before ``json.loads`` so a ``[[[[...`` bomb costs one linear scan."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _decode_json(raw: bytes) -> Any:
    if len(raw) > MAX_REQUEST_BYTES:
        raise _BadInput("size", f"{len(raw)} bytes, at most {MAX_REQUEST_BYTES} are read")
    try:
        text = raw.decode("utf-8")  # strict; json.loads(bytes) would also guess UTF-16/32
    except UnicodeDecodeError as exc:
        raise _BadInput("encoding", f"not UTF-8 at byte {exc.start}") from None
    if not _nesting_ok(text):
        raise _BadInput("json", f"arrays/objects nest deeper than {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_pairs_without_duplicates,
                          parse_constant=_reject_constant, parse_int=_parse_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _BadInput("json", f"not JSON: {escape_for_log(str(exc), 80)}") from None


def _seq_of(doc: Any) -> int | None:
    """The request's seq if it is valid, whatever else is wrong (so the ack can name it)."""
    if isinstance(doc, dict):
        seq = doc.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and 1 <= seq < SEQ_LIMIT:
            return seq
    return None


def _need(doc: dict[str, Any], name: str) -> Any:
    if name not in doc:
        raise _BadInput(name, f"{name!r} is missing")
    return doc[name]


def _int_field(doc: dict[str, Any], name: str, low: int, high: int) -> int:
    value = _need(doc, name)
    if not is_strict_int(value) or not low <= value <= high:
        raise _BadInput(name, f"{name!r} must be an integer in {low}..{high}, "
                              f"got {escape_for_log(value)}")
    return value


def _name(value: Any, pattern: re.Pattern[str], field_name: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _BadInput(field_name, f"{field_name!r} must match {pattern.pattern!r}, "
                                    f"got {escape_for_log(value)}")
    return value


def _list_field(doc: dict[str, Any], name: str, most: int, least: int = 0) -> list[Any]:
    value = _need(doc, name)
    if not isinstance(value, list):
        raise _BadInput(name, f"{name!r} must be a list, got {type(value).__name__}")
    if not least <= len(value) <= most:
        raise _BadInput(name, f"{name!r} must hold {least}..{most} items, got {len(value)}")
    return value


def _phases(doc: dict[str, Any]) -> tuple[str, ...]:
    names = tuple(_name(p, PHASE_NAME, "phases")
                  for p in _list_field(doc, "phases", MAX_PHASES, least=1))
    if len(set(names)) != len(names):
        raise _BadInput("phases", f"'phases' repeats a name: {escape_for_log(names)}")
    return names


def _disk(value: Any) -> DiskState:
    if not isinstance(value, dict) or not _DISK_FIELDS <= set(value) <= (
            _DISK_FIELDS | _DISK_OPTIONAL):
        raise _BadInput("disks", "each disk must be an object with 'dev', 'mount', 'rw' and "
                                 f"optionally 'frozen', got {escape_for_log(value)}")
    for flag in ("rw", "frozen"):
        if not isinstance(value.get(flag, False), bool):
            raise _BadInput("disks", f"a disk's {flag!r} must be true or false, got "
                                     f"{escape_for_log(value[flag])}")
    return DiskState(_name(value["dev"], DEVICE, "disks"), _name(value["mount"], MOUNT, "disks"),
                     value["rw"], value.get("frozen", False))


def _build(doc: Any) -> BoundaryRequest:
    if not isinstance(doc, dict):
        raise _BadInput("not-object", f"the request must be a JSON object, got "
                                      f"{type(doc).__name__}")
    unknown = set(doc) - set(FIELDS)
    if unknown:
        raise _BadInput("unknown-key", f"unknown keys {escape_for_log(sorted(unknown))}")
    v = _int_field(doc, "v", PROTOCOL_VERSION, PROTOCOL_VERSION)
    seq = _int_field(doc, "seq", 1, SEQ_LIMIT - 1)
    phase = _name(_need(doc, "phase"), PHASE_NAME, "phase")
    phases = _phases(doc)
    identity = _name(_need(doc, "identity"), IDENTITY, "identity")
    wait = _int_field(doc, "wait", 1, MAX_WAIT_SECONDS)
    disks = tuple(_disk(d) for d in _list_field(doc, "disks", MAX_DISKS))
    services = tuple(_name(s, SERVICE, "services")
                     for s in _list_field(doc, "services", MAX_SERVICES))
    hazards = tuple(_name(h, HAZARD, "hazards") for h in _list_field(doc, "hazards", MAX_HAZARDS))
    if phase not in phases:
        raise RequestRefused("unknown-phase", f"phase {phase!r} is not in {list(phases)}", seq)
    return BoundaryRequest(seq, phase, phases, identity, wait, disks, services, hazards, v)


def parse_request(raw: bytes | bytearray | memoryview) -> BoundaryRequest:
    """Validate a guest's request bytes.

    Returns a :class:`BoundaryRequest` or raises :class:`RequestRefused`; for any input
    bytes, never anything else (a bug in this parser is logged and reported as
    ``bad-request:json`` rather than taking dom0 down)."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_request takes the bytes read from xenstore, got "
                        f"{type(raw).__name__}")
    data = bytes(raw)
    doc: Any = None
    try:
        doc = _decode_json(data)
        return _build(doc)
    except _BadInput as exc:
        raise RequestRefused(f"bad-request:{exc.reason}", exc.detail, _seq_of(doc)) from None
    except RequestRefused:
        raise
    except Exception:  # pragma: no cover - a parser bug must not crash dom0
        log.exception("phase-protocol parser bug on a %d-byte request; refusing it",
                      len(data))
        raise RequestRefused("bad-request:json", "internal parser error", None) from None
