"""The ctypes bindings against the real libxenctrl / libxenforeignmemory in dom0.

Each struct layout is proved by reading something independently known: ``xl list -v``
for getdomaininfo, the guest's own kallsyms for a vCPU's RIP, a string the guest keeps
in memory for foreign mapping.
"""

from __future__ import annotations

import re

import pytest


GETINFO = """
import json
from xenpbr.ctypes_libxc import XenCtrl
from xenpbr.hypervisor.libxc import domain_state_from_info
with XenCtrl() as xc:
    out = []
    for raw in xc.domain_getinfolist():  # the raw xc_domaininfo_t, decoded once here
        d = domain_state_from_info(raw)
        out.append({"domid": raw.domain, "mib": raw.tot_pages * 4 // 1024,
                    "vcpus": raw.nr_online_vcpus, "uuid": str(d.uuid),
                    "running": d.running, "blocked": d.blocked, "paused": d.paused,
                    "shutdown": d.shutdown, "dying": d.dying,
                    "reason": d.shutdown_reason.name if d.shutdown_reason is not None else None})
    print(json.dumps(out))
"""


def xl_list_v(xen_host) -> dict[int, dict]:
    rows = {}
    for line in xen_host.run(["xl", "list", "-v"]).stdout.splitlines()[1:]:
        f = line.split()
        rows[int(f[1])] = {"mib": int(f[2]), "vcpus": int(f[3]), "state": f[4], "uuid": f[6]}
    return rows


def test_getinfolist_matches_xl_list(xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("info", mode="shell", vcpus=2, memory_mib=160)
    guest.create()
    guest.wait_for_console("XENPBR-GUEST: up")
    xen_host.run(["xl", "pause", guest.name])
    ours = {d["domid"]: d for d in dom0_python(GETINFO)}
    theirs = xl_list_v(xen_host)
    assert set(ours) == set(theirs)
    for domid, row in theirs.items():
        mine = ours[domid]
        assert (mine["mib"], mine["vcpus"], mine["uuid"]) == (row["mib"], row["vcpus"],
                                                              row["uuid"]), domid
        assert mine["paused"] == ("p" in row["state"])
        assert mine["running"] == ("r" in row["state"])
    assert ours[guest.domid]["paused"] and ours[guest.domid]["vcpus"] == 2
    assert ours[0]["running"] and ours[0]["uuid"] == "00000000-0000-0000-0000-000000000000"


@pytest.mark.long  # make test-long (CI: test_hypervisor_real's h7)
def test_crashed_guest_reports_shutdown_reason_crash(xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("crashinfo", mode="crash", on_crash="preserve")
    guest.create()
    guest.wait_for_state(lambda e: e.crashed, "crashed")
    ours = {d["domid"]: d for d in dom0_python(GETINFO)}[guest.domid]
    assert ours["shutdown"] and ours["reason"] == "CRASH" and not ours["dying"]


@pytest.mark.long  # make test-long (CI: test_hypervisor_real's h13)
def test_paused_guest_rip_is_inside_its_kernel_text(xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("rip", mode="shell")
    guest.create()
    stext, etext = (int(x, 16) for x in guest.wait_for_console(r"text (\w+) (\w+)").groups())
    assert stext != 0, "guest kallsyms hid the addresses"
    samples = dom0_python(f"""
        import json
        from xenpbr.ctypes_libxc import XenCtrl
        out = []
        with XenCtrl() as xc:
            for _ in range(5):
                xc.domain_pause({guest.domid})
                ctx = xc.vcpu_getcontext({guest.domid}, 0)
                out.append([ctx.rip, ctx.rsp, ctx.cr3])
                xc.domain_unpause({guest.domid})
        print(json.dumps(out))
    """)
    for rip, rsp, cr3 in samples:
        assert stext <= rip < etext, f"rip {rip:#x} outside [{stext:#x}, {etext:#x})"
        assert rsp >= 0xFFFF800000000000 and cr3 % 4096 == 0


@pytest.mark.long  # make test-long (CI: test_hypervisor_real's h14)
def test_marker_in_guest_memory_is_found_by_mapping_its_frames(xen_host, lab_domain,
                                                               dom0_python) -> None:
    guest = lab_domain("mark", mode="memmark")
    guest.create()
    marker = "XENPBR-MEMMARK-" + guest.wait_for_console(r"memmark id=(\S+)").group(1)
    found = dom0_python(f"""
        import json
        from xenpbr.ctypes_libxc import XenCtrl, ForeignMemory
        from xenpbr.hypervisor.guest_memory import GuestMemory
        with XenCtrl() as xc, ForeignMemory() as fm:
            xc.domain_pause({guest.domid})
            try:
                mem = GuestMemory(xc, fm, {guest.domid})
                hits = mem.find({marker!r}.encode())
                pfn, off = hits[0]
                with mem.map_pfns([pfn]) as m:
                    text = bytes(m.memoryview[off:off + {len(marker)}]).decode()
            finally:
                xc.domain_unpause({guest.domid})
        print(json.dumps({{"hits": len(hits), "text": text}}))
    """, timeout=300)
    assert found["hits"] >= 1 and found["text"] == marker


def test_vanished_domain_and_unmappable_frame_raise_specific_errors(xen_host, lab_domain,
                                                                   dom0_python) -> None:
    guest = lab_domain("badmap", mode="shell")
    guest.create()
    result = dom0_python("""
        import json
        from xenpbr.ctypes_libxc import XenCtrl, ForeignMemory, DomainNotFound
        from xenpbr.ctypes_libxc import FrameMapError
        out = {}
        with XenCtrl() as xc, ForeignMemory() as fm:
            try:
                xc.domain_getinfo(31000)
            except DomainNotFound as exc:
                out["getinfo"] = str(exc)
            try:
                xc.domain_pause(31000)
            except DomainNotFound as exc:
                out["pause"] = str(exc)
            try:
                with fm.map(DOMID, [0xFFFFFFFFF]) as m:
                    pass
            except FrameMapError as exc:
                out["map"] = str(exc)
        print(json.dumps(out))
    """.replace("DOMID", str(guest.domid)))
    assert "31000" in result["getinfo"] and "31000" in result["pause"]
    assert re.search(r"0xfffffffff", result["map"], re.I), result["map"]


def test_not_root_gets_an_actionable_error(xen_host, dom0_python) -> None:
    result = dom0_python("""
        import json
        from xenpbr.ctypes_libxc import XenCtrl
        try:
            XenCtrl().close()
            print(json.dumps({"error": None}))
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    """, user=65534)
    assert result["error"] is not None, "an unprivileged process must not get a handle"
    assert "root" in result["message"] or "privcmd" in result["message"], result


@pytest.mark.long  # make test-long (CI: test_hypervisor_real, through the same bindings)
def test_handles_and_mappings_do_not_leak(xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("leak", mode="shell")
    guest.create()
    guest.wait_for_console("XENPBR-GUEST: up")
    result = dom0_python(f"""
        import json, os
        from xenpbr.ctypes_libxc import XenCtrl, ForeignMemory
        from xenpbr.hypervisor.guest_memory import GuestMemory
        def counts():
            return (len(os.listdir("/proc/self/fd")),
                    sum(1 for _ in open("/proc/self/maps")))
        def cycle():
            with XenCtrl() as xc, ForeignMemory() as fm:
                mem = GuestMemory(xc, fm, {guest.domid})
                pfns = [p for p, mfn in enumerate(mem.p2m()[:64])]
                with mem.map_pfns(pfns) as m:
                    m.memoryview[0]
                try:
                    with mem.map_pfns(pfns[:4]) as m:
                        raise RuntimeError("inside the mapping")
                except RuntimeError:
                    pass
        cycle()
        before = counts()
        for _ in range(50):
            cycle()
        print(json.dumps({{"before": before, "after": counts()}}))
    """, timeout=300)
    assert result["after"] == result["before"], result
