"""H1-H14 of docs/hypervisor.md on real Xen 4.17: what ``FakeHypervisor`` models, checked
against ``LibxcHypervisor`` in the lab's dom0.

Each test runs its ``LibxcHypervisor`` code in dom0 (``hv_snippet``) and compares with
``xl list`` where xl has a view. Guests that never need to run are created paused with
64 MiB (the lab has about 900 MiB for guests); guests whose memory or registers are
inspected boot first.
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.lab.xen_real import (
    create_unmonitored,
    forget_in_xenstore,
    hv_snippet,
    install_watchdog_ramdisk,
    watchdog_guest_settings,
)

#: Keep every shutdown visible (xl's defaults destroy or restart the domain).
PRESERVE = {"on_poweroff": "preserve", "on_reboot": "preserve", "on_watchdog": "preserve",
            "on_soft_reset": "preserve"}
SMALL = {"memory_mib": 96}  # for guests that never run (64 MiB cannot hold the kernel)
UP = r"XENPBR-GUEST: up "


def test_h1_domains_listed_in_domid_order_dom0_first_with_config_uuids(
        xen_host, lab_domain, dom0_python) -> None:
    wanted = [uuid.uuid4(), uuid.uuid4()]
    guests = [lab_domain("h1u", uuid=str(u), **SMALL) for u in wanted]
    for guest in guests:
        guest.create(paused=True)
    domains = hv_snippet(dom0_python,
                         "print(json.dumps([st(s) for s in LibxcHypervisor().list_domains()]))")
    domids = [d["domid"] for d in domains]
    assert domids == sorted(set(domids)), domids
    assert domains[0]["domid"] == 0 and domains[0]["uuid"] == str(uuid.UUID(int=0))
    by_id = {d["domid"]: d for d in domains}
    for guest, wanted_uuid in zip(guests, wanted):
        assert by_id[guest.domid]["uuid"] == str(wanted_uuid)
    xl_ids = {int(line.split()[1]) for line in
              xen_host.run(["xl", "list"]).stdout.splitlines()[1:]}
    assert set(domids) == xl_ids


def test_h2_missing_or_destroyed_domain_raises_domain_not_found(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h2gone", **SMALL)
    guest.create(paused=True)
    gone = guest.domid
    guest.destroy()
    result = hv_snippet(dom0_python, f"""
        hv = LibxcHypervisor()
        out = {{}}
        for d in ({gone}, 31000):
            out[d] = {{
                "listed": bool(listed(hv, d)),
                "domain_state": err(hv.domain_state, d), "pause": err(hv.pause, d),
                "unpause": err(hv.unpause, d), "destroy": err(hv.destroy, d),
                "shutdown": err(hv.shutdown, d, ShutdownReason.POWEROFF),
                "vcpu_registers": err(hv.vcpu_registers, d, 0),
                "read_pfn": err(hv.read_pfn, d, 0)}}
        print(json.dumps(out))
    """)
    for domid, calls in result.items():
        assert calls.pop("listed") is False, domid
        assert calls == dict.fromkeys(calls, "DomainNotFound"), (domid, calls)


def test_h3_pauses_nest_unpause_without_pause_and_the_256th_pause_fail(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h3nest")
    guest.create()  # running (booting) with no toolstack pause
    d = guest.domid
    r = hv_snippet(dom0_python, f"""
        hv = LibxcHypervisor()
        out = {{"start": [hv.domain_state({d}).paused, xl({d})]}}
        hv.pause({d}); hv.pause({d}); hv.unpause({d})
        t0 = hv.domain_state({d}).cpu_time_ns; time.sleep(1)
        out["pp_u"] = [hv.domain_state({d}).paused, xl({d}),
                       hv.domain_state({d}).cpu_time_ns - t0]
        hv.unpause({d})
        t0 = hv.domain_state({d}).cpu_time_ns; time.sleep(1)
        out["pp_uu"] = [hv.domain_state({d}).paused, xl({d}),
                        hv.domain_state({d}).cpu_time_ns - t0]
        out["extra_unpause"] = err(hv.unpause, {d})
        held = 0
        for _ in range(255):
            hv.pause({d}); held += 1
        try:
            hv.pause({d}); out["256th"] = None
        except PauseLimitReached as exc:
            out["256th"] = [type(exc).__name__, exc.errno == errno.EOVERFLOW, exc.domid]
        out["at_limit"] = xl({d})
        for _ in range(held):
            hv.unpause({d})
        out["released"] = [hv.domain_state({d}).paused, xl({d}), err(hv.unpause, {d})]
        print(json.dumps(out))
    """)
    assert r["start"][0] is False and "p" not in r["start"][1]
    paused, xl, ran = r["pp_u"]
    assert paused is True and xl[2] == "p" and ran == 0, r["pp_u"]  # still paused: no CPU
    paused, xl, ran = r["pp_uu"]
    assert paused is False and "p" not in xl and ran > 0, r["pp_uu"]  # runs again
    assert r["extra_unpause"] == "NotPaused"
    assert r["256th"] == ["PauseLimitReached", True, d]
    assert r["at_limit"][2] == "p"
    assert r["released"] == [False, r["released"][1], "NotPaused"] and "p" not in r["released"][1]


PAUSED_THEN_ONE_UNPAUSE = """
hv = LibxcHypervisor()
out = {"before": [hv.domain_state(D).paused, xl(D)]}
hv.unpause(D)
out["after"] = [hv.domain_state(D).paused, xl(D), err(hv.unpause, D)]
print(json.dumps(out))
"""


def test_h4_create_paused_and_restore_paused_leave_exactly_one_pause(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h4pause", mode="count")
    guest.create(paused=True)
    first = hv_snippet(dom0_python, PAUSED_THEN_ONE_UNPAUSE.replace("D", str(guest.domid)))
    guest.wait_for_console(r"count=2 ")  # one unpause, and it runs
    image = f"/tmp/{guest.name}.chk"
    guest.save_checkpoint(image)
    offset = guest.console_size()
    guest.destroy()
    guest.restore(image, paused=True)
    second = hv_snippet(dom0_python, PAUSED_THEN_ONE_UNPAUSE.replace("D", str(guest.domid)))
    resumed = int(guest.wait_for_console(r"count=(\d+)", after=offset).group(1))
    xen_host.run(["rm", "-f", image])
    for what, r in (("xl create -p", first), ("xl restore -p", second)):
        assert r["before"][0] is True and r["before"][1][2] == "p", (what, r)
        paused, xl, again = r["after"]
        assert paused is False and "p" not in xl, (what, r)
        assert again == "NotPaused", (what, r)  # that one unpause was the only pause
    assert resumed > 1  # the restored guest went on counting, it did not reboot


@pytest.mark.long  # 1.3 min (six guests): make test-long (CI: h6, h7, h8 shut guests down)
def test_h5_remote_shutdown_sets_reason_and_code(xen_host, lab_domain, dom0_python) -> None:
    """SUSPEND and SOFT_RESET are safe on a paused PV guest: Xen records the code, xl
    logs "Domain has suspended" / applies on_soft_reset=preserve, nothing else runs."""
    reasons = ["POWEROFF", "REBOOT", "CRASH", "WATCHDOG", "SUSPEND", "SOFT_RESET"]
    guests = {}
    for reason in reasons:
        guests[reason] = lab_domain("h5rs", **SMALL, **PRESERVE)
        guests[reason].create(paused=True)
    ids = {reason: g.domid for reason, g in guests.items()}
    states = hv_snippet(dom0_python, f"""
        hv = LibxcHypervisor()
        ids = {ids!r}
        for reason, d in ids.items():
            hv.shutdown(d, ShutdownReason[reason])
        time.sleep(2)  # let xl's monitor act on each shutdown, as it would
        print(json.dumps({{r: dict(st(hv.domain_state(d)), xl=xl(d)) for r, d in ids.items()}}))
    """)
    codes = {"POWEROFF": 0, "REBOOT": 1, "SUSPEND": 2, "CRASH": 3, "WATCHDOG": 4,
             "SOFT_RESET": 5}
    for reason, s in states.items():
        assert s["shutdown"] and not s["dying"], (reason, s)
        assert (s["reason"], s["code"]) == (reason, codes[reason]), (reason, s)
        assert s["xl_state"] == s["xl"], (reason, s)  # xl's letters: - r s c w S


def test_h6_first_shutdown_reason_sticks(xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h6stick", **SMALL)
    guest.create(paused=True)
    d = guest.domid
    r = hv_snippet(dom0_python, f"""
        hv = LibxcHypervisor()
        hv.shutdown({d}, ShutdownReason.CRASH)
        first = st(hv.domain_state({d}))
        second_call = err(hv.shutdown, {d}, ShutdownReason.POWEROFF)
        print(json.dumps({{"first": first, "second_call": second_call,
                          "after": st(hv.domain_state({d}))}}))
    """)
    assert r["first"]["reason"] == "CRASH"
    assert r["second_call"] is None  # Xen returns 0 for a domain already shutting down
    assert (r["after"]["reason"], r["after"]["code"]) == ("CRASH", 3)


def test_h7_guest_panic_is_crash_and_xl_state_matches_xl(xen_host, lab_domain,
                                                         dom0_python) -> None:
    guest = lab_domain("h7panic")
    guest.create()
    guest.wait_for_console(UP)
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    guest.wait_for_console(r"Kernel panic - not syncing", after=offset)
    entry = guest.wait_for_state(lambda e: "s" in e.state, "shut down")
    s = hv_snippet(dom0_python, f"""
        s = st(LibxcHypervisor().domain_state({entry.domid}))
        print(json.dumps(dict(s, xl=xl({entry.domid}))))
    """)
    assert (s["reason"], s["code"]) == ("CRASH", 3)
    assert s["xl_state"] == s["xl"] == "---sc-"


def test_h7_expired_guest_watchdog_is_watchdog(xen_host, lab_domain, lab_images,
                                               dom0_python) -> None:
    ramdisk = install_watchdog_ramdisk(xen_host, lab_images.kernel_version)
    guest = lab_domain("h7dog", **watchdog_guest_settings(2, ramdisk))
    guest.create()
    guest.wait_for_console(r"arming watchdog timeout=2")
    entry = guest.wait_for_state(lambda e: "s" in e.state, "shut down by its watchdog")
    s = hv_snippet(dom0_python, f"""
        s = st(LibxcHypervisor().domain_state({entry.domid}))
        print(json.dumps(dict(s, xl=xl({entry.domid}))))
    """)
    assert (s["reason"], s["code"]) == ("WATCHDOG", 4)
    # xl's letter for watchdog is "w". The r/b columns are not compared: a guest idle when
    # its watchdog fired was seen as "-b-sw-" by xl and as "---sw-" moments later (U2).
    assert s["xl_state"][2:] == s["xl"][2:] == "-sw-", s
    assert "Watchdog timer fired for domain" in xen_host.run(["xl", "dmesg"]).stdout


def test_h8_undefined_shutdown_code_survives(xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h8code", **SMALL)
    create_unmonitored(guest)  # xl's monitor would destroy a domain with code 42
    d = guest.domid
    s = hv_snippet(dom0_python, f"""
        with XenCtrl() as xc:
            xc.domain_shutdown({d}, 42)
        print(json.dumps(dict(st(LibxcHypervisor().domain_state({d})), xl=xl({d}))))
    """)
    assert s["shutdown"] and s["code"] == 42 and s["reason"] is None
    assert s["xl_state"] == s["xl"] == "--ps?-"


def test_h9_checkpoint_leaves_guest_running_and_not_shut_down(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h9chk", mode="count")
    guest.create()
    guest.wait_for_console(r"count=2 ")
    image = f"/tmp/{guest.name}.chk"
    guest.save_checkpoint(image)
    s = hv_snippet(dom0_python, f"print(json.dumps(st(LibxcHypervisor().domain_state({guest.domid}))))")
    xen_host.run(["rm", "-f", image])
    assert not s["shutdown"] and s["reason"] is None and s["code"] is None, s
    assert not s["paused"] and not s["dying"], s
    last = int(re.findall(r"count=(\d+)", guest.console())[-1])
    guest.wait_for_console(rf"count={last + 2} ")  # and it keeps running


def test_h10_destroyed_domain_lingers_dying_while_a_frame_is_mapped(
        xen_host, lab_domain, dom0_python) -> None:
    held, plain = lab_domain("h10held", **SMALL), lab_domain("h10plain", **SMALL)
    held.create(paused=True)
    plain.create(paused=True)
    h, p = held.domid, plain.domid
    r = hv_snippet(dom0_python, f"""
        def gone_within(d, seconds):
            for _ in range(int(seconds * 10)):
                if not listed(hv, d):
                    return True
                time.sleep(0.1)
            return False
        hv = LibxcHypervisor()
        out = {{}}
        hv.destroy({p})
        out["plain_gone"] = gone_within({p}, 10)
        hv.shutdown({h}, ShutdownReason.CRASH)
        # Any frame of the guest: the top-level page table its vCPU 0 was built with.
        mfn = hv.vcpu_registers({h}, 0).cr3 >> 12
        with ForeignMemory() as fm:
            mapping = fm.map({h}, [mfn])
            hv.destroy({h})
            time.sleep(1)
            out["held"] = [st(s) for s in listed(hv, {h})]
            out["xl"] = xl({h})
            out["destroy_again"] = err(hv.destroy, {h})
            out["still_held"] = [st(s) for s in listed(hv, {h})]
            mapping.close()
        out["held_gone"] = gone_within({h}, 10)
        print(json.dumps(out))
    """)
    for domid in (h, p):
        forget_in_xenstore(xen_host, domid)
    assert r["plain_gone"] is True
    (s,) = r["held"]
    assert s["dying"] and s["shutdown"] and (s["reason"], s["code"]) == ("CRASH", 3), s
    assert s["pages"] >= 1 and r["xl"] in (None, s["xl_state"])
    assert r["destroy_again"] is None and len(r["still_held"]) == 1
    assert r["held_gone"] is True


def test_h11_crashed_preserved_domain_memory_stays_readable(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h11mem", mode="memmark")
    guest.create()
    marker = "XENPBR-MEMMARK-" + guest.wait_for_console(r"memmark id=(\S+)").group(1)
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    guest.wait_for_console(r"Kernel panic - not syncing", after=offset)
    guest.wait_for_state(lambda e: e.crashed, "crashed")
    r = hv_snippet(dom0_python, f"""
        hv = LibxcHypervisor()
        marker = {marker!r}.encode()
        state = st(hv.domain_state({guest.domid}))
        hits = hv.find({guest.domid}, marker, limit=1)
        pfn, off = hits[0]
        page = hv.read_pfn({guest.domid}, pfn)
        print(json.dumps({{"state": state, "hits": hits,
                          "text": page[off:off + len(marker)].decode(errors="replace")}}))
    """, timeout=300)
    assert r["state"]["reason"] == "CRASH"
    assert r["hits"] and r["text"] == marker


def test_h12_vcpu_errors_no_such_vcpu_and_not_initialised(
        xen_host, lab_domain, dom0_python) -> None:
    """vCPU 1 of a ``vcpus=1, maxvcpus=2`` guest is never initialised while the guest has
    not run. Linux then brings every possible vCPU up at boot and takes vCPU 1 down
    again (xenstore says ``availability = offline``): from then on it is initialised,
    readable, and not online."""
    guest = lab_domain("h12vcpu", vcpus=1, maxvcpus=2)
    guest.create(paused=True)
    d = guest.domid
    code = f"""
        hv = LibxcHypervisor()
        s = hv.domain_state({d})
        regs0 = hv.vcpu_registers({d}, 0)
        def v1():
            r = hv.vcpu_registers({d}, 1)
            return {{"online": r.online}}
        try:
            vcpu1 = v1()
        except Exception as exc:
            vcpu1 = type(exc).__name__
        print(json.dumps({{"max_vcpu_id": s.max_vcpu_id, "online": s.vcpus_online,
            "v1": vcpu1, "v2": err(hv.vcpu_registers, {d}, 2),
            "v64": err(hv.vcpu_registers, {d}, 64),
            "set_v2": err(hv.set_vcpu_registers, {d}, 2, regs0)}}))
    """
    before = hv_snippet(dom0_python, code)
    xen_host.run(["xl", "unpause", guest.name])
    guest.wait_for_console(UP)
    after = hv_snippet(dom0_python, code)
    assert before["max_vcpu_id"] == 1 and before["online"] == 1
    assert before["v1"] == "VcpuNotInitialised"
    for r in (before, after):
        assert r["v2"] == r["v64"] == r["set_v2"] == "NoSuchVcpu", r
    assert after["online"] == 1
    assert after["v1"] == {"online": False}, after  # brought up by Linux, then offlined


def test_h13_set_vcpu_registers_reads_back_on_a_paused_guest(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h13regs")
    guest.create()
    guest.wait_for_console(UP)
    d = guest.domid
    r = hv_snippet(dom0_python, f"""
        import dataclasses
        hv = LibxcHypervisor()
        def named(regs):
            return {{f.name: getattr(regs, f.name) for f in dataclasses.fields(regs)
                    if f.name != "raw"}}
        out = {{}}
        with hv.paused({d}):
            orig = hv.vcpu_registers({d}, 0)
            hv.set_vcpu_registers({d}, 0, orig)
            same = hv.vcpu_registers({d}, 0)
            out["unchanged"] = same == orig
            out["raw_same"] = same.raw == orig.raw
            new_rax = orig.rax ^ 0x5A5A5A5A5A5A5A5A
            hv.set_vcpu_registers({d}, 0, orig.replace(rax=new_rax))
            changed = hv.vcpu_registers({d}, 0)
            out["rax"] = changed.rax == new_rax
            out["others"] = {{k: v for k, v in named(changed).items()
                             if k != "rax" and v != named(orig)[k]}}
            hv.set_vcpu_registers({d}, 0, orig)  # put the guest back as it was
            out["restored"] = hv.vcpu_registers({d}, 0) == orig
        time.sleep(2)
        out["after"] = st(hv.domain_state({d}))
        print(json.dumps(out, default=str))
    """)
    assert r["unchanged"] is True and r["raw_same"] is True
    assert r["rax"] is True and r["others"] == {}, r["others"]
    assert r["restored"] is True
    assert not r["after"]["shutdown"] and not r["after"]["paused"]  # the guest lives on


def test_h14_write_then_read_a_page_and_find_a_marker_split_across_pages(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("h14write")
    guest.create()
    guest.wait_for_console(UP)
    d = guest.domid
    r = hv_snippet(dom0_python, f"""
        import uuid
        hv = LibxcHypervisor()
        out = {{}}
        with hv.paused({d}):
            pfns = hv.populated_pfns({d})
            have = set(pfns)
            # Two pfn-consecutive pages, high in an idle guest (free memory); skip any
            # that Xen will not map writable (page tables).
            for p in reversed(pfns):
                if p + 1 not in have:
                    continue
                orig = hv.read_pfns({d}, [p, p + 1])
                try:
                    hv.write_pfn({d}, p, orig[0][:1])
                    hv.write_pfn({d}, p + 1, orig[1][:1])
                    break
                except Exception:
                    continue
            out["pfn"] = p
            data = os.urandom(64)
            hv.write_pfn({d}, p, data, offset=100)
            back = hv.read_pfn({d}, p)
            out["written"] = back[100:164] == data
            out["rest_intact"] = back[:100] + back[164:] == orig[0][:100] + orig[0][164:]
            marker = ("XENPBR-SPLIT-" + uuid.uuid4().hex).encode()
            k = len(marker) // 2
            hv.write_pfn({d}, p, marker[:k], offset=4096 - k)
            hv.write_pfn({d}, p + 1, marker[k:])
            out["hits"] = hv.find({d}, marker)
            out["expected"] = [p, 4096 - k]
            hv.write_pfn({d}, p, orig[0])
            hv.write_pfn({d}, p + 1, orig[1])
            out["restored"] = hv.read_pfns({d}, [p, p + 1]) == orig
        print(json.dumps(out))
    """, timeout=300)
    assert r["written"] is True and r["rest_intact"] is True
    assert r["hits"] == [r["expected"]], r
    assert r["restored"] is True
