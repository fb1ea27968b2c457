"""L1-L9 of docs/hypervisor.md on real Xen 4.17 with the lab's C ``xenstored``: the
``@introduceDomain``/``@releaseDomain`` firings the fake's xenstored model promises, and
what ``python -m xenpbr.watcher`` reports from them.

Two observers run in dom0 in the background: :class:`WatchRecorder` logs every raw watch
firing with a ``list_domains()`` snapshot taken at once, and :class:`WatcherCli` is the
real watcher CLI (``--json``), stopped with SIGTERM after a quiet spell so that any
extra event would show. Both use dom0's monotonic clock.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.lab.xen_real import (
    WatchRecorder,
    WatcherCli,
    forget_in_xenstore,
    hv_snippet,
    install_watchdog_ramdisk,
    summary,
    wait_until,
    watchdog_guest_settings,
)
from xenpbr_lab.paths import artifacts_root
from xenpbr_lab.xl import LabDomain

PRESERVE = {"on_poweroff": "preserve", "on_reboot": "preserve", "on_watchdog": "preserve",
            "on_soft_reset": "preserve"}
SMALL = {"memory_mib": 96}  # for guests that never run
UP = r"XENPBR-GUEST: up "
PANIC = r"Kernel panic - not syncing"
RELEASE, INTRODUCE = "@releaseDomain", "@introduceDomain"
QUIET = 2.0  # seconds with nothing happening before "nothing more fired" is believed


def crash_remotely(dom0_python, *domids: int) -> None:
    hv_snippet(dom0_python, f"""
        hv = LibxcHypervisor()
        for d in {list(domids)!r}:
            hv.shutdown(d, ShutdownReason.CRASH)
        print(json.dumps(None))
    """)


def seen(firing: dict, domid: int) -> dict | None:
    """The snapshot of *domid* taken at a recorded firing (None if it was not listed)."""
    return next((d for d in firing["domains"] if d["domid"] == domid), None)


def releases_after(recorder: WatchRecorder, count_before: int, timeout: float = 60.0,
                   quiet: float = QUIET) -> list[dict]:
    """Wait for at least one new ``@releaseDomain`` firing, then for a quiet spell;
    return every firing of it after the first *count_before*."""
    wait_until("@releaseDomain firing",
               lambda: len(recorder.firings(RELEASE)) > count_before, timeout, 0.3)
    time.sleep(quiet)
    return recorder.firings(RELEASE)[count_before:]


def stop_and_read(watcher: WatcherCli, quiet: float = QUIET) -> list[dict]:
    time.sleep(quiet)
    watcher.stop()
    return watcher.events()


def test_l1_create_and_restore_fire_introduce_domain_and_appear(
        xen_host, lab_domain) -> None:
    # xl restore with a config file takes the uuid from it: pin one.
    guest = lab_domain("l1intro", mode="count", uuid=str(uuid.uuid4()))
    watcher = WatcherCli(xen_host, "")
    guest.create()
    first = guest.domid
    guest.wait_for_console(r"count=2 ")
    image = f"/tmp/{guest.name}.img"
    xen_host.run(["xl", "save", guest.name, image])  # suspends, saves, destroys
    guest.restore(image, paused=True)
    second = guest.domid
    events = stop_and_read(watcher)
    xen_host.run(["rm", "-f", image])
    appeared = [e for e in events if e["event"] == "appeared"]
    assert [(e["domid"], e["trigger"]) for e in appeared] == [
        (first, INTRODUCE), (second, INTRODUCE)], events
    assert appeared[0]["uuid"] == appeared[1]["uuid"] == guest.config["uuid"]
    assert first != second


@pytest.mark.timeout(600)  # several guests booted and shut down: about 70 s on a slow machine
def test_l2_guest_shutdowns_fire_release_domain_once_finished_with_reason(
        xen_host, lab_domain, lab_images) -> None:
    ramdisk = install_watchdog_ramdisk(xen_host, lab_images.kernel_version)
    guests = {"crash": lab_domain("l2crash", **PRESERVE),
              "poweroff": lab_domain("l2off", **PRESERVE),
              "reboot": lab_domain("l2reboot", **PRESERVE),
              "watchdog": lab_domain("l2dog", **{**PRESERVE,
                                                 **watchdog_guest_settings(2, ramdisk)})}
    recorder = WatchRecorder(xen_host)
    watcher = WatcherCli(xen_host, "")
    for guest in guests.values():
        guest.create()
    for guest in guests.values():
        guest.wait_for_console(UP)
    ids = {what: g.domid for what, g in guests.items()}
    for what, key in (("crash", "c"), ("poweroff", "o"), ("reboot", "b")):
        xen_host.run(["xl", "sysrq", guests[what].name, key])
    for what, guest in guests.items():
        guest.wait_for_state(lambda e: "s" in e.state, f"shut down ({what})")
    events = stop_and_read(watcher)
    recorder.stop()
    firings = recorder.firings(RELEASE)
    codes = {"poweroff": 0, "reboot": 1, "crash": 3, "watchdog": 4}
    for what, domid in ids.items():
        shut = [f for f in firings if (seen(f, domid) or {}).get("code") is not None]
        assert shut, (what, firings)
        # The first firing that shows the domain shut down shows it with its reason: the
        # watch fires once the shutdown is finished.
        assert seen(shut[0], domid)["code"] == codes[what], (what, shut[0])
        assert not seen(shut[0], domid)["dying"]
        mine = [e for e in events if e["domid"] == domid and e["event"] != "appeared"]
        assert len(mine) == 1 and mine[0]["trigger"] == RELEASE, (what, mine)
        kind = {"crash": "crashed", "watchdog": "watchdog"}.get(what, "shutdown")
        assert mine[0]["event"] == kind, (what, mine)
        if kind == "shutdown":
            assert (mine[0]["reason"], mine[0]["code"]) == (what, codes[what])
    # Every shutdown was announced: four @releaseDomain firings unless two coincided.
    assert 1 <= len(firings) <= 4


def test_l3_a_domain_that_stays_shut_down_is_not_notified_again(
        xen_host, lab_domain, dom0_python) -> None:
    """A crashes; B is created, then crashes. Then a VIRQ_DOM_EXC that changes no domain
    xenstored knows: C is released from xenstored (XS_RELEASE, which fires
    @releaseDomain itself) and crashes. If xenstored re-notified A or B on every VIRQ,
    @releaseDomain would fire once more. Everything runs in one dom0 script, which
    returns the dom0 times that split the recorder's firings into phases."""
    a, b, c = (lab_domain(name, **SMALL) for name in ("l3a", "l3b", "l3c"))
    for guest in (b, c):
        guest.write_config()
    a.create(paused=True)
    recorder = WatchRecorder(xen_host)
    r = hv_snippet(dom0_python, f"""
        from xenpbr.xenstore import XenstoreClient
        hv = LibxcHypervisor()
        def create(cfg):
            subprocess.run(["xl", "create", "-p", cfg], check=True, capture_output=True)
            return int(subprocess.run(["xl", "domid", os.path.basename(cfg)[:-4]],
                                      capture_output=True, text=True).stdout)
        t = {{"crash_a": time.monotonic()}}
        hv.shutdown({a.domid}, ShutdownReason.CRASH)
        time.sleep({QUIET})
        t["create_b"] = time.monotonic()
        b = create({b.config_path!r})
        time.sleep({QUIET})
        t["crash_b"] = time.monotonic()
        hv.shutdown(b, ShutdownReason.CRASH)
        time.sleep({QUIET})
        t["create_c"] = time.monotonic()
        c = create({c.config_path!r})
        with XenstoreClient() as xs:
            xs.release_domain(c)
        time.sleep({QUIET})
        t["crash_c"] = time.monotonic()
        hv.shutdown(c, ShutdownReason.CRASH)
        time.sleep({QUIET})
        t["end"] = time.monotonic()
        print(json.dumps({{"t": t, "b": b, "c": c, "c_state": st(hv.domain_state(c))}}))
    """)
    recorder.stop()
    t = r["t"]
    phases = list(t)

    def fired(phase: str, path: str = RELEASE) -> list[dict]:
        end = t[phases[phases.index(phase) + 1]]
        return [f for f in recorder.firings(path) if t[phase] <= f["t"] < end]

    crash_a = fired("crash_a")
    assert len(crash_a) == 1 and seen(crash_a[0], a.domid)["code"] == 3, crash_a
    assert fired("create_b") == [] and fired("create_b", INTRODUCE), recorder.firings()
    crash_b = fired("crash_b")
    assert len(crash_b) == 1 and seen(crash_b[0], r["b"])["code"] == 3, crash_b
    assert len(fired("create_c")) == 1, recorder.firings()  # XS_RELEASE's own firing
    assert r["c_state"]["reason"] == "CRASH"  # C's crash sent a VIRQ ...
    assert fired("crash_c") == [], recorder.firings()  # ... and nothing fired


def test_l4_xl_destroy_fires_release_domain_once(xen_host, lab_domain, dom0_python) -> None:
    running, crashed = lab_domain("l4run", **SMALL), lab_domain("l4crash", **SMALL)
    running.create(paused=True)  # unpaused just before its destroy: no boot to wait for
    crashed.create(paused=True)
    crash_remotely(dom0_python, crashed.domid)
    ids = (running.domid, crashed.domid)
    recorder = WatchRecorder(xen_host)
    watcher = WatcherCli(xen_host, "")
    per_destroy = []
    xen_host.run(["xl", "unpause", running.name])
    for guest in (running, crashed):
        before = len(recorder.firings(RELEASE))
        guest.destroy()
        per_destroy.append(releases_after(recorder, before))
    events = stop_and_read(watcher)
    listed = hv_snippet(dom0_python,
                        "print(json.dumps([s.domid for s in LibxcHypervisor().list_domains()]))")
    recorder.stop()
    for domid, firings in zip(ids, per_destroy):
        assert len(firings) == 1, (domid, firings)  # nothing more when it leaves the list
        snap = seen(firings[0], domid)
        assert snap is None or snap["dying"], (domid, firings)
        assert domid not in listed
    assert [(e["event"], e["domid"], e["shutdown_code"]) for e in events] == [
        ("destroyed", ids[0], None), ("destroyed", ids[1], 3)], events
    assert all(e["trigger"] == RELEASE for e in events)


def test_l5_destroy_with_a_mapped_frame_fires_at_destroy_not_at_unmap(
        xen_host, lab_domain, dom0_python) -> None:
    guest = lab_domain("l5held", **SMALL)
    guest.create(paused=True)
    d = guest.domid
    crash_remotely(dom0_python, d)
    recorder = WatchRecorder(xen_host)
    watcher = WatcherCli(xen_host, "")
    times = hv_snippet(dom0_python, f"""
        hv = LibxcHypervisor()
        mfn = hv.vcpu_registers({d}, 0).cr3 >> 12
        with ForeignMemory() as fm:
            mapping = fm.map({d}, [mfn])
            t_destroy = time.monotonic()
            hv.destroy({d})
            time.sleep({QUIET + 1})
            dying = [st(s) for s in listed(hv, {d})]
            t_close = time.monotonic()
            mapping.close()
        for _ in range(100):
            if not listed(hv, {d}):
                break
            time.sleep(0.1)
        t_gone = time.monotonic()
        time.sleep({QUIET})
        print(json.dumps({{"destroy": t_destroy, "close": t_close, "gone": t_gone,
                          "dying": dying, "still": bool(listed(hv, {d}))}}))
    """)
    events = stop_and_read(watcher, quiet=0.5)
    recorder.stop()
    forget_in_xenstore(xen_host, d)
    assert times["dying"] and times["dying"][0]["dying"] and not times["still"], times
    firings = recorder.firings(RELEASE)
    at_destroy = [f for f in firings if times["destroy"] <= f["t"] < times["close"]]
    assert len(at_destroy) == 1, firings
    snap = seen(at_destroy[0], d)
    assert snap and snap["dying"] and snap["code"] == 3, at_destroy
    assert [f for f in firings if f["t"] >= times["close"]] == [], firings
    assert [(e["event"], e["domid"], e["shutdown_code"]) for e in events] == [
        ("destroyed", d, 3)], events


@pytest.fixture(scope="module")
def panic_runs(xen_host, dom0_python) -> dict:
    """One ``python -m xenpbr.watcher --json`` run through create, panic (``xl sysrq c``)
    and ``xl destroy`` of 10 guests, two batches of 5 booted together (L6 and L9).
    Per guest: the panic's console time (``console_watch``, polling every 20 ms) and the
    time just before ``xl sysrq`` ran, both on dom0's monotonic clock."""
    watcher = WatcherCli(xen_host, "")
    panics: dict[int, float] = {}
    triggers: dict[int, float] = {}
    try:
        for b in range(2):
            batch = [LabDomain(xen_host, f"l69b{b}g{i}") for i in range(5)]
            try:
                for guest in batch:
                    guest.create()
                for guest in batch:
                    guest.wait_for_console(UP)
                targets = [(g.name, g.domid, g.console_log) for g in batch]
                times = dom0_python(f"""
                    import json, os, time
                    from xenpbr_lab.console_watch import watch
                    out = {{}}
                    for name, domid, log in {targets!r}:
                        seen = watch(log, [{PANIC!r}], os.path.getsize(log), 60,
                                     f"xl sysrq {{name}} c")
                        out[domid] = [seen["t0"], seen["found"][{PANIC!r}]["t"]]
                        time.sleep(0.5)  # let the crash complete before the next panic
                    print(json.dumps(out))
                """, timeout=600)
                for domid, (t0, seen_at) in times.items():
                    triggers[int(domid)], panics[int(domid)] = t0, seen_at
                for guest in batch:
                    guest.wait_for_state(lambda e: e.crashed, "crashed")
            finally:
                for guest in batch:
                    guest.destroy()
        events = stop_and_read(watcher)
    finally:
        watcher.stop()
    return {"events": events, "panics": panics, "triggers": triggers}


@pytest.mark.timeout(900)  # the fixture boots and crashes 10 guests: 150 s on a slow machine
def test_l6_watcher_reports_each_transition_once(panic_runs) -> None:
    events = panic_runs["events"]
    domids = sorted(panic_runs["panics"])
    assert len(domids) == 10
    for d in domids:
        mine = [e for e in events if e["domid"] == d]
        assert [e["event"] for e in mine] == ["appeared", "crashed", "destroyed"], mine
        assert [e["trigger"] for e in mine] == [INTRODUCE, RELEASE, RELEASE], mine
        assert mine[2]["shutdown_code"] == 3
        assert mine[0]["monotonic"] < mine[1]["monotonic"] < mine[2]["monotonic"]
    assert len(events) == 3 * len(domids), events  # nothing else, nothing twice


@pytest.mark.timeout(900)  # the fixture, if it runs here first (see test_l6)
def test_l9_panic_to_crashed_event_delay(panic_runs) -> None:
    """Measurement, not pass/fail: delays from the panic to the watcher's DomainCrashed.
    The console time has 20 ms resolution, so smaller delays (either sign) are noise;
    ``xl sysrq`` -> DomainCrashed is recorded too."""
    crashed = {e["domid"]: e["monotonic"] for e in panic_runs["events"]
               if e["event"] == "crashed"}
    assert set(crashed) == set(panic_runs["panics"])  # an event arrived for every panic
    record: dict = {"what": "dom0 monotonic seconds over 10 guest panics (xl sysrq c)"}
    for name, start in (("panic_seen_to_crashed", panic_runs["panics"]),
                        ("sysrq_to_crashed", panic_runs["triggers"])):
        delays = [crashed[d] - start[d] for d in sorted(start)]
        record[name] = {k: round(v, 3) if isinstance(v, float) else v
                        for k, v in summary(delays).items()}
        record[name]["values"] = [round(x, 3) for x in delays]
    out = artifacts_root() / "l9-panic-to-crashed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nL9: {json.dumps(record)}")
    assert record["sysrq_to_crashed"]["min"] > 0


@pytest.fixture(scope="module")
def checkpoint_then_crash(xen_host) -> dict:
    """A counting guest is checkpointed (``xl save -c``) and then panics, under the
    recorder and the watcher (L7 and L8)."""
    guest = LabDomain(xen_host, "l78chk", mode="count")
    image = f"/tmp/{guest.name}.chk"
    try:
        guest.create()
        d = guest.domid
        guest.wait_for_console(r"count=2 ")
        # libxl creates this node empty; a guest with a suspend event channel writes its
        # port there (libxl then suspends through it, and Xen signals that channel
        # instead of sending VIRQ_DOM_EXC).
        evtchn = xen_host.run(["xenstore-read",
                               f"/local/domain/{d}/device/suspend/event-channel"], check=False)
        recorder = WatchRecorder(xen_host)
        watcher = WatcherCli(xen_host, "")
        try:
            guest.save_checkpoint(image)  # suspend: notified; then resumed
            suspend = releases_after(recorder, 0)
            state_after_save = guest.entry().state
            xen_host.run(["xl", "sysrq", guest.name, "c"])
            crash = releases_after(recorder, len(suspend))
            events = stop_and_read(watcher, quiet=0.5)
        finally:
            watcher.stop()
            recorder.stop()
    finally:
        xen_host.run(["rm", "-f", image])
        guest.destroy()
    return {"domid": d, "evtchn": evtchn, "suspend": suspend, "crash": crash,
            "state_after_save": state_after_save, "events": events}


def test_l7_after_a_checkpoint_a_crash_is_notified_again(checkpoint_then_crash) -> None:
    run = checkpoint_then_crash
    d = run["domid"]
    assert len(run["crash"]) == 1 and seen(run["crash"][0], d)["code"] == 3, run["crash"]
    assert [(e["event"], e.get("reason")) for e in run["events"]] == [
        ("shutdown", "suspend"), ("crashed", None)], run["events"]
    assert run["events"][1]["trigger"] == RELEASE


def test_l8_checkpoint_is_reported_as_shutdown_suspend(checkpoint_then_crash) -> None:
    run = checkpoint_then_crash
    d = run["domid"]
    evtchn = run["evtchn"]
    assert evtchn.rc == 0 and evtchn.stdout.strip() == "", evtchn  # no suspend evtchn
    assert len(run["suspend"]) == 1, run["suspend"]
    assert seen(run["suspend"][0], d)["code"] == 2, run["suspend"]
    first = run["events"][0]
    assert (first["event"], first["reason"], first["code"], first["trigger"]) == (
        "shutdown", "suspend", 2, RELEASE), run["events"]
    assert "s" not in run["state_after_save"]  # the checkpointed guest runs on
