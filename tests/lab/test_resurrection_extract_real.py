"""Extraction from a really crashed PV guest (issue 15, step 2 in the lab).

In the guest a Python process creates a region with ``xenpbr_agent.resurrect`` and puts
records; the kernel is crashed with ``xl sysrq c`` (on_crash=preserve keeps the domain);
dom0 extracts over ``GuestMemoryFrames``: every record put before the crash comes back.
Then dom0 flips one byte of a record in the crashed memory: that record is rejected with
``crc`` and nothing wrong is returned.

The guest's shell reads its console (hvc0); dom0 types into it through the console's pty.
"""

from __future__ import annotations

import base64
import shlex

from xenpbr.resurrection.model import Caps

APP = "labkv"
PUTS = 300
KEYS = 50
DELETED = b"k007"
CORRUPTED = b"k010"

GUEST_PROGRAM = f"""
import sys, time
from xenpbr_agent.resurrect import Region
region = Region.create({APP!r}, 64 * 1024, 256)
for i in range({PUTS}):
    region.put(b"k%03d" % (i % {KEYS}), b"value-%d-" % i + b"x" * 100)
region.delete({DELETED!r})
print("RES-READY pfns=%d" % len(region.pfns), flush=True)
time.sleep(100000)
"""

EXTRACT = """
import json
from xenpbr.ctypes_libxc import XenCtrl, ForeignMemory
from xenpbr.hypervisor.guest_memory import GuestMemory
from xenpbr.resurrection.extract import GuestMemoryFrames, extract, read_registrations
from xenpbr.resurrection.model import Caps
from xenpbr.xenstore import XenstoreClient
from xenpbr.guestproto import resurrection as fmt

def flip(mem, regs, key):
    reg = fmt.parse_registration(APP, regs[APP])
    frames = GuestMemoryFrames(mem)
    header = fmt.parse_header(frames.read_pfns([reg.header_pfn])[0])
    pfns = fmt.parse_directory(frames.read_pfns(list(reg.dir_pfns)), header, reg.header_pfn,
                               reg.dir_pfns)
    area_pfns = pfns[header.first_record_page:]
    area = b"".join(frames.read_pfns(list(area_pfns)))
    for slot in range(header.slot_count):
        base = slot * header.slot_size
        if area[base:base + 4] == b"XREC" and area[base + 24:base + 24 + len(key)] == key:
            target = base + 24 + len(key) + 3  # a byte of the value
            with mem.map_pfns([area_pfns[target // 4096]], writable=True) as m:
                m.memoryview[target % 4096] ^= 0x5A
            return slot
    raise AssertionError("record not found")

out = {}
with XenCtrl() as xc, ForeignMemory() as fm, XenstoreClient() as xs:
    mem = GuestMemory(xc, fm, DOMID)
    for run in ("clean", "flipped"):
        regs = read_registrations(xs, DOMID, limit=16)
        result = extract(GuestMemoryFrames(mem), regs, Caps(), domid=DOMID)
        out[run] = {
            "apps": [{"app": a.app, "kept": a.kept, "bytes": a.bytes_read,
                      "records": [[r.key.hex(), r.value.hex(), r.seq, r.tombstone]
                                  for r in a.records],
                      "rejections": [[r.reason, r.slot, r.seq, (r.key or b"").hex()]
                                     for r in a.rejections]} for a in result.apps],
            "refused": [[r.app, r.reason] for r in result.refused],
            "seconds": result.seconds}
        if run == "clean":
            out["flipped_slot"] = flip(mem, regs, CORRUPTED)
print(json.dumps(out))
"""


def expected_records() -> dict[bytes, tuple[bytes, bool]]:
    latest: dict[bytes, tuple[bytes, bool]] = {}
    for i in range(PUTS):
        latest[b"k%03d" % (i % KEYS)] = (b"value-%d-" % i + b"x" * 100, False)
    latest[DELETED] = (b"", True)
    return latest


def type_into_console(xen_host, domid: int, lines: list[str]) -> None:
    """Send shell lines to the guest's console (its pty in dom0, raw so nothing is
    translated)."""
    tty = xen_host.run(["xenstore-read", f"/local/domain/{domid}/console/tty"]).stdout.strip()
    script = "".join(f"printf '%s\\n' {shlex.quote(line)} > {tty}; sleep 0.2\n" for line in lines)
    xen_host.run(f"stty -F {tty} raw -echo\n{script}", timeout=120)


def records_of(run: dict) -> dict[bytes, tuple[bytes, bool]]:
    (app,) = run["apps"]
    return {bytes.fromhex(k): (bytes.fromhex(v), t) for k, v, _, t in app["records"]}


def test_records_put_before_a_crash_are_extracted_and_a_flipped_byte_is_caught(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("res", mode="shell", on_crash="preserve")
    guest.create()
    guest.wait_for_console("XENPBR-GUEST: up")
    encoded = base64.b64encode(GUEST_PROGRAM.encode()).decode()
    chunks = [encoded[i:i + 600] for i in range(0, len(encoded), 600)]
    after = guest.console_size()
    type_into_console(xen_host, guest.domid, [
        "rm -f /tmp/r.b64",
        *[f"echo {chunk} >> /tmp/r.b64" for chunk in chunks],
        "python3 -c 'import base64; open(\"/tmp/r.py\", \"wb\").write(base64.b64decode("
        "open(\"/tmp/r.b64\").read()))'",
        "PYTHONPATH=/usr/lib/python3/dist-packages python3 /tmp/r.py &"])
    guest.wait_for_console(r"RES-READY pfns=\d+", timeout=90, after=after)
    domid = guest.domid
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    guest.wait_for_state(lambda e: e.crashed, "crashed")

    code = EXTRACT.replace("APP", repr(APP)).replace("DOMID", str(domid)).replace(
        "CORRUPTED", repr(CORRUPTED))
    result = dom0_python(code, timeout=180)

    clean = result["clean"]
    assert not clean["refused"] and clean["apps"][0]["kept"], clean
    assert clean["apps"][0]["rejections"] == [], clean["apps"][0]["rejections"]
    assert records_of(clean) == expected_records()
    assert clean["seconds"] < Caps().seconds

    flipped = result["flipped"]
    rejections = flipped["apps"][0]["rejections"]
    assert [(r[0], r[1], bytes.fromhex(r[3])) for r in rejections] == [
        ("crc", result["flipped_slot"], CORRUPTED)]
    assert rejections[0][2] == max(i for i in range(1, PUTS + 1)
                                   if (i - 1) % KEYS == int(CORRUPTED[1:]))
    wanted = expected_records()
    del wanted[CORRUPTED]
    assert records_of(flipped) == wanted


C_APP = "c-example"


def c_expected() -> dict[bytes, tuple[bytes, bool]]:
    """What guest-agent/examples/resurrect-example.c leaves: 40 puts over key-0..9, then
    key-3 deleted."""
    latest = {b"key-%d" % (i % 10): (b"value-%d" % i, False) for i in range(40)}
    latest[b"key-3"] = (b"", True)
    return latest


def test_a_c_programs_region_is_extracted_from_a_crashed_guest(xen_host, lab_domain,
                                                                dom0_python) -> None:
    """The C header (guest-agent/include/xenpbr-resurrect.h) in a real guest: its example,
    built into the images (xenpbr_lab/build.py), registers, puts and waits; dom0 reads
    every record back from the crashed memory and catches a flipped byte."""
    from xenpbr_lab.build import C_EXAMPLE
    guest = lab_domain("resc", mode="shell", on_crash="preserve")
    guest.create()
    guest.wait_for_console("XENPBR-GUEST: up")
    after = guest.console_size()
    type_into_console(xen_host, guest.domid, [f"{C_EXAMPLE} &"])
    guest.wait_for_console(r"resurrect-example: \d+ pages registered; waiting", timeout=90,
                           after=after)
    domid = guest.domid
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    guest.wait_for_state(lambda e: e.crashed, "crashed")

    code = EXTRACT.replace("APP", repr(C_APP)).replace("DOMID", str(domid)).replace(
        "CORRUPTED", repr(b"key-5"))
    result = dom0_python(code, timeout=180)
    clean = result["clean"]
    assert not clean["refused"] and clean["apps"][0]["kept"], clean
    assert clean["apps"][0]["rejections"] == []
    assert records_of(clean) == c_expected()
    flipped = result["flipped"]
    assert [(r[0], bytes.fromhex(r[3])) for r in flipped["apps"][0]["rejections"]] == [
        ("crc", b"key-5")]
    wanted = c_expected()
    del wanted[b"key-5"]
    assert records_of(flipped) == wanted
