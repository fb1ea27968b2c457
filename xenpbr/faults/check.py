"""``xenpbr fault-check DOMAIN``: what became of the last fault injected into a domain.

A fault that shows nothing within the campaign's window still needs explaining
(docs/faults.md). Two facts explain most of them and can be read before the guest is
rejuvenated:

* its bytes now: still the injected ones (``in-place``), back to the original
  (``original``: the kernel rewrote them, as ftrace or static keys do), or something
  else (``overwritten``: a stack word whose frame returned and was reused); ``gone``
  when the domain is no longer the one the fault went into (recovered since). A
  counted instruction carries the counter's kprobe: an ``int3`` on its first byte
  (the fault's other bytes still read as written: ``in-place``), or a jump once
  kprobes optimised it (``probed``: nothing to tell from the bytes);
* for a text or operand fault injected with ``--count-runs``, how often the altered
  instruction ran (:mod:`xenpbr.faults.reach`).

Reading the bytes pauses the guest for one page-table walk; nothing is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from xenpbr.errors import XenpbrError
from xenpbr.faults import reach
from xenpbr.xenstore import XenstoreClient

#: ``read(name, domid, address, size)``: kernel bytes now (:func:`xenpbr.faults.inject.read_now`).
Reader = Callable[[str, int, int, int], bytes]


class NothingToCheck(XenpbrError):
    """No fault with bytes to check was injected into the domain."""


def last_memory_fault(faults: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The newest record of *faults* that changed kernel memory."""
    for record in reversed(faults):
        if record.get("change"):
            return record
    raise NothingToCheck(f"no fault that changed {name}'s kernel memory is on record "
                         "(xenpbr inject --fault stack|text|operand|hang records one)")


#: What a kprobe puts at the address it probes: ``int3``, or once kprobes optimised the
#: probe, a ``jmp rel32`` to its detour.
KPROBE_OPCODES = (0xCC, 0xE9)


def bytes_state(now: bytes | None, change: dict[str, Any], probed: bool = False) -> str:
    """``in-place``, ``original``, ``overwritten``, ``probed`` (the counter's kprobe
    covers the bytes: cannot tell), or ``gone`` (*now* None). With *probed* (a counter
    armed on the address) an ``int3`` on the first byte over the fault's other bytes is
    the fault still in place: kprobes keeps the byte it replaced."""
    if now is None:
        return "gone"
    new = bytes.fromhex(change["new"])
    if now == new or (probed and now[0] == 0xCC and now[1:] == new[1:]):
        return "in-place"
    if probed and now[0] in KPROBE_OPCODES:
        return "probed"
    return "original" if now.hex() == change["old"] else "overwritten"


def check(record: dict[str, Any], domid_now: int | None, read: Reader,
          xs_factory: Callable[[], XenstoreClient] | None = None) -> dict[str, Any]:
    """The report for one fault *record* of a domain whose domid is *domid_now* (None:
    not running). The bytes are read only from the domain the fault went into."""
    change = record["change"]
    # the domain the fault went into, if it still runs (None: recovered since, or down)
    domid = domid_now if record.get("domid") == domid_now else None
    now = (None if domid is None else
           read(record["domain"], domid, int(change["address"], 16), len(change["new"]) // 2))
    counted = record.get("reach")
    probed = counted is not None and counted.get("state") == "counting"
    if counted and domid is not None:
        with (xs_factory or XenstoreClient)() as xs:
            counted = reach.current(xs, domid, counted)
    return {"domain": record["domain"], "fault": record["fault"],
            "injected_at": record["injected_at"], "domid": record.get("domid"),
            "domid_now": domid_now, "address": change["address"],
            "symbol": change["symbol"], "old": change["old"], "new": change["new"],
            "now": None if now is None else now.hex(),
            "bytes": bytes_state(now, change, probed),
            "reach": counted}
