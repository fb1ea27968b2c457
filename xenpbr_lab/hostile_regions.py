"""A hostile guest's resurrection registrations (tests/lab/test_resurrection_hostile_real.py).

Runs in a lab guest beside the real key-value application (``kvdemo``,
:mod:`xenpbr_lab.resurrect_app`) and registers, under the guest's own
``data/xenpbr/resurrect``, everything issue 15 lists as hostile, each under its own name
so dom0's verdict on each can be read from ``xenpbr history``:

``farpfn``    a valid header and directory whose last record page is a pfn the guest does
              not own (far beyond its memory): ``pfn``
``foreign``   a registration whose header pfn the guest does not own: ``pfn``
``huge``      a real, locked 8 MiB region, over an operator cap of 4 MiB: ``cap-bytes``
``loop``      a directory whose record pages are the directory page itself: ``overlap``
``mover``     a region whose generation, header and registration are rewritten in a loop
              while the kernel is crashed: kept whole or refused (``mismatch``,
              ``changed``), never a record it did not write
``overlap``   kvdemo's own registration under a second name: ``overlap``
``scribble``  a good region with ten records, one of them then damaged in place (as a faulty
              kernel would): that record ``crc``, the nine others delivered, and the
              application told which key and seq it lost (``lost.json``)
``t0000``...  junk registrations until xenstored's quota refuses more (``thousands of
              regions``): the first few are read and refused, the rest ``too-many``

It first prints what the agent handed over for ``mover`` and ``scribble``
(``HOSTILE-REGIONS delivered {json}``, empty on the first boot), then ``HOSTILE-REGIONS ready {json}`` once all are in place (with the count of junk
registrations xenstored accepted), then keeps rewriting ``mover`` until killed. It is the
misbehaving guest on purpose: it reaches into :class:`~xenpbr_agent.resurrect.Region`'s
memory to rewrite a header behind the library's back.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from xenpbr.guestproto.resurrection import (
    PAGE_SIZE,
    REGISTRATION_DIR,
    encode_header,
    encode_registration,
)
from xenpbr.resurrection.model import Registration
from xenpbr.xenstore import XenstoreClient, XenstoreError
from xenpbr_agent.resurrect import Region, pagemap_pfns
from xenpbr_agent.resurrected import ROOT as RESURRECTED_ROOT
from xenpbr_agent.resurrected import load_resurrected

#: A pfn no lab guest owns (4 TiB into its pseudo-physical space).
FAR_PFN = 1 << 30
KV_APP = "kvdemo"
MOVER_VALUE = b"mover-%06d"


def mover_value(generation: int) -> bytes:
    """The only value ``mover`` ever writes for ``generation`` (so dom0 returning anything
    else would be a record it did not write)."""
    return MOVER_VALUE % generation


def _key(app: str) -> str:
    return f"{REGISTRATION_DIR}/{app}"


def farpfn(xs: XenstoreClient) -> Region:
    """Header and directory true, the last record page named as a far pfn."""
    def lookup(address: int, count: int) -> Sequence[int]:
        return [*pagemap_pfns(address, count)[:-1], FAR_PFN]
    region = Region.create("farpfn", 16 * PAGE_SIZE, register=False, pfn_lookup=lookup)
    region.put(b"k", b"never read")
    xs.write(_key("farpfn"), encode_registration(region.registration))
    return region


def foreign(xs: XenstoreClient) -> None:
    """A registration whose header pfn is not the guest's."""
    xs.write(_key("foreign"), encode_registration(
        Registration("foreign", 1, 3, FAR_PFN, (FAR_PFN + 1,))))


def loop(xs: XenstoreClient) -> Region:
    """A directory naming its own page as every record page."""
    def lookup(address: int, count: int) -> Sequence[int]:
        real = pagemap_pfns(address, count)
        return [real[0], real[1], *[real[1]] * (count - 2)]
    region = Region.create("loop", 4 * PAGE_SIZE, register=False, pfn_lookup=lookup)
    xs.write(_key("loop"), encode_registration(region.registration))
    return region


def overlap(xs: XenstoreClient) -> None:
    """kvdemo's registration again under another name (waits for kvdemo to register: the
    lab test's wait for ``ready`` is the hang detector)."""
    while True:
        try:
            xs.write(_key("overlap"), xs.read(_key(KV_APP)))
            return
        except XenstoreError:
            time.sleep(0.5)


def thousands(xs: XenstoreClient, limit: int) -> int:
    """Junk registrations ``t0000``... until xenstored refuses one; how many it took."""
    for n in range(limit):
        try:
            xs.write(_key(f"t{n:04d}"), b"1 1 3 1 2")
        except XenstoreError:
            return n
    return limit


SCRIBBLED = b"s3"


def scribble(xs: XenstoreClient) -> Region:
    """Ten records, then one byte of ``s3``'s value flipped behind the library's back."""
    region = Region.create("scribble", 16 * PAGE_SIZE, xenstore=xs)
    for i in range(10):
        region.put(b"s%d" % i, b"value-%d" % i)
    memory = region._memory  # the faulty kernel's store, on purpose
    value = region.get(SCRIBBLED)
    assert value is not None
    at = memory.find(b"\0" + SCRIBBLED + value)
    assert at > 0, "the record to damage is not in the region"
    memory[at + 1 + len(SCRIBBLED)] ^= 0x20
    return region


def delivered(app: str) -> dict[str, object]:
    """What the agent handed over for ``app`` after a recovery: its records, and the keys
    and seqs it was told were lost (empty before any recovery)."""
    loaded = {k.decode("ascii", "replace"): v.decode("ascii", "replace")
              for k, v in load_resurrected(app).items()}
    try:
        lost = json.loads((Path(RESURRECTED_ROOT) / app / "lost.json").read_text())["lost"]
    except FileNotFoundError:
        lost = []
    return {"records": loaded,
            "lost": [[x["reason"], x["seq"], x["key"] and
                      base64.b64decode(x["key"]).decode("ascii", "replace")] for x in lost]}


class Mover:
    """A region re-registered under a new generation over and over: header first, then
    the registration, then a record, so a crash lands between any two of them."""

    def __init__(self, xs: XenstoreClient) -> None:
        self.xs = xs
        self.region = Region.create("mover", 8 * PAGE_SIZE, register=False, generation=1)
        self.generation = 1

    def step(self) -> None:
        self.generation += 1
        header = encode_header("mover", self.generation, len(self.region.pfns),
                               self.region.slot_size)
        self.region._memory[:len(header)] = header  # behind the library's back, on purpose
        self.region.generation = self.generation
        self.xs.write(_key("mover"), encode_registration(self.region.registration))
        self.region.put(b"m", mover_value(self.generation))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenpbr_lab.hostile_regions")
    parser.add_argument("--junk", type=int, default=3000,
                        help="junk registrations to try (default 3000)")
    args = parser.parse_args(argv)
    xs = XenstoreClient().open()
    # after a recovery: what dom0 handed back (mover: only values it wrote; scribble: nine
    # records and the tenth reported lost)
    print("HOSTILE-REGIONS delivered " + json.dumps(
        {app: delivered(app) for app in ("mover", "scribble")}), flush=True)
    keep = [farpfn(xs), loop(xs), Region.create("huge", 8 << 20, xenstore=xs), scribble(xs)]
    foreign(xs)
    mover = Mover(xs)
    mover.step()
    overlap(xs)
    junk = thousands(xs, args.junk)
    print("HOSTILE-REGIONS ready " + json.dumps({"junk": junk, "regions": len(keep) + 1}),
          flush=True)
    while True:
        mover.step()
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
