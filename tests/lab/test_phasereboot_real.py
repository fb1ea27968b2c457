"""Phase-based reboot end to end on real Xen: xenpbrd captures each boot phase of a guest
running the agent; when the guest kernel crashes (or its watchdog expires, or the
operator asks) xenpbrd restores the deepest usable image and the agent inside learns it
was restored. Also the faults: quick re-crashes, a corrupt image, xenpbrd itself killed
mid-capture and mid-restore, and a guest flooding dom0 with hostile requests.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

import pytest

from tests.lab.xen_real import (
    WDT_INIT,
    agent_verdicts,
    install_watchdog_ramdisk,
)
from xenpbr_lab import xenpbrd as xenpbrd_lab
from xenpbr_lab.host import XenHost
from xenpbr_lab.xl import LabDomain

THREE = "kernel,services,app"


def protected_guest(xen_host: XenHost, lab_domain: Callable[..., LabDomain],
                    prefix: str, phases: str = THREE, mode: str = "agent",
                    extra: str = "", **settings: Any) -> LabDomain:
    """A guest created with ``xenpbr create`` (on_crash = "phasereboot") whose agent
    marks ``phases``; returns once every first-boot boundary was captured."""
    guest = lab_domain(prefix, mode=mode, extra=f"lab.phases={phases} {extra}".strip(),
                       on_crash="phasereboot", **settings)
    guest.write_config()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    names = phases.split(",")
    first_boot = agent_verdicts(guest, len(names))
    assert [(p, v) for p, v, _ in first_boot] == [(p, "captured") for p in names], first_boot
    return guest


def crash_and_wait_restored(xen_host: XenHost, guest: LabDomain,
                            timeout: float = 300) -> tuple[str, str, float]:
    """Crash the guest's kernel; return the agent's (phase, verdict) after recovery and
    the seconds from the crash to the agent's line (host clock)."""
    offset = guest.console_size()
    start = time.monotonic()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    (phase, verdict, rc), = agent_verdicts(guest, 1, after=offset, timeout=timeout)
    assert rc == 0, (phase, verdict, rc)
    return phase, verdict, time.monotonic() - start


def published(xen_host: XenHost, name: str) -> dict[str, str]:
    """What xenpbrd published under /xenpbr/domains/NAME (relative key -> value)."""
    out = xen_host.run(["xenstore-ls", "-f", f"/xenpbr/domains/{name}"]).stdout
    prefix = f"/xenpbr/domains/{name}/"
    return {m.group(1)[len(prefix):]: m.group(2)
            for m in re.finditer(r'^(\S+) = "(.*)"$', out, re.M) if m.group(1).startswith(prefix)}


def wait_for_history(xen_host: XenHost, name: str, done: Callable[[list[dict]], bool],
                     timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        history = xenpbrd_lab.cli(xen_host, "history", name)
        if done(history) or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


@pytest.mark.timeout(600)  # several boots and recoveries under TCG
def test_a_crash_is_recovered_from_the_deepest_phase_an_operator_from_an_earlier_one(
        xen_host, lab_domain, xenpbrd) -> None:
    guest = protected_guest(xen_host, lab_domain, "pbr")
    images = xenpbrd_lab.cli(xen_host, "images", guest.name)
    assert [row["phase"] for row in images if row["valid"]] == ["kernel", "services", "app"]
    assert published(xen_host, guest.name)["images/app/valid"] == "1"

    old_domid = guest.domid
    phase, verdict, recovered_in = crash_and_wait_restored(xen_host, guest)
    assert (phase, verdict) == ("app", "restored:1")
    assert guest.domid != old_domid
    assert "XENPBR-STEP: after-restore" in guest.console()

    history = wait_for_history(xen_host, guest.name,
                               lambda h: bool(h) and "service_ready" in h[-1]["since_crash"])
    last = history[-1]
    assert last["method"] == "phase:app" and last["outcome"] == "recovered"
    marks = last["since_crash"]
    order = ["crash_seen", "image_chosen", "destroyed", "restore_started",
             "restore_finished", "guest_ack", "service_ready"]
    assert set(marks) == set(order), marks
    assert [marks[m] for m in order] == sorted(marks[m] for m in order), marks
    assert last["downtime_s"] == marks["service_ready"]
    # Xen has room for both: the crashed domain waited aside until the guest was ready
    destroyed = next(m for m in last["marks"] if m["name"] == "destroyed")
    assert destroyed["detail"] == (f"set aside as {guest.name}--crashed (Xen has memory for "
                                   "both), destroyed once the guest reports ready"), destroyed
    xenpbrd_lab.wait_for_log(xen_host, xenpbrd_lab.ASIDE_DESTROYED.format(name=guest.name))
    assert f"{guest.name}--crashed" not in xen_host.run(["xl", "list"]).stdout
    # the lab's Xen scrubs freed pages: the hot stream left the zero pages to Xen, and
    # the restore read a sample of them back, zero, before the guest ran
    log = xenpbrd_lab.log_text(xen_host)
    assert re.search(rf"hot stream of {guest.name}/\S+ ready: \d+ bytes in [\d.]+ s, "
                     r"[1-9]\d* zero pages left to Xen", log), log[-3000:]
    assert re.search(r"[1-9]\d* pages left to Xen read back zero", log), log[-3000:]
    keys = published(xen_host, guest.name)
    assert keys["last-recovery/method"] == "phase:app" and keys["generation"] == "1"
    assert keys["status"] == "watching" and keys["domid"] == str(guest.domid)
    print(f"crash -> agent saw 'restored': {recovered_in:.2f} s (host clock); "
          f"xenpbrd breakdown: {marks}")

    # The restored guest reboots itself: xl's monitor (kept for restored domains) boots
    # it afresh, and every boundary is skipped: its image is already known.
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "b"])
    rebooted = agent_verdicts(guest, 3, after=offset)
    assert [(p, v) for p, v, _ in rebooted] == [("kernel", "skipped"), ("services", "skipped"),
                                                ("app", "skipped")], rebooted

    # An operator sends it back to an earlier phase (one guest for both: a protected
    # guest's boot and three captures cost a minute under TCG)
    offset = guest.console_size()
    timeline = xenpbrd_lab.cli(xen_host, "reboot", guest.name, "--phase", "services")
    assert timeline["method"] == "phase:services" and timeline["trigger"] == "operator"
    after = agent_verdicts(guest, 2, after=offset)
    # restored at the services boundary, the guest goes on to its app boundary: skipped
    assert [(p, v.split(":")[0]) for p, v, _ in after] == [("services", "restored"),
                                                           ("app", "skipped")], after


@pytest.mark.long  # 2.5 min: make test-long (the fallback order: tests/unit/test_recovery.py)
@pytest.mark.timeout(600)  # several boots and recoveries under TCG
def test_quick_recrashes_fall_back_then_reboot_normally(xen_host, lab_domain,
                                                        xenpbrd) -> None:
    guest = protected_guest(xen_host, lab_domain, "loop", xenpbr_crash_loop_window=900,
                            xenpbr_crash_loop_limit=2)
    assert crash_and_wait_restored(xen_host, guest)[:2] == ("app", "restored:1")
    # crashing again at once: the app phase is suspect, restore the one before it
    assert crash_and_wait_restored(xen_host, guest)[:2] == ("services", "restored:2")
    # and again: the limit is reached, a normal reboot (a fresh boot skips every phase)
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    fresh = agent_verdicts(guest, 3, after=offset)
    assert [(p, v) for p, v, _ in fresh] == [("kernel", "skipped"), ("services", "skipped"),
                                             ("app", "skipped")]
    history = xenpbrd_lab.cli(xen_host, "history", guest.name)
    assert [h["method"] for h in history] == ["phase:app", "phase:services", "normal-reboot"]
    assert any("crash loop: 2 crashes within 900 s" in s for s in history[-1]["skipped"])


@pytest.mark.long  # 2.5 min: make test-long (CI: test_store_corruption_real, hot stream off)
def test_corrupt_image_is_skipped_for_the_previous_phase(xen_host, lab_domain, xenpbrd,
                                                          dom0_python) -> None:
    guest = protected_guest(xen_host, lab_domain, "bad")
    corrupted = dom0_python(f"""
        import json
        from pathlib import Path
        from xenpbr.images.store import ImageStore
        from xenpbr.state import StateDir
        state = StateDir(Path("{xenpbrd_lab.STATE}"))
        image = state.phases("{guest.name}").images["app"]
        path = ImageStore(state.images_root).manifest_path("{guest.name}", image.image_id)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        print(json.dumps(image.image_id))
    """)
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    after = agent_verdicts(guest, 2, after=offset)
    # restored at services, the guest reaches its app boundary again: with the app image
    # unusable, that boundary is captured afresh (the image heals itself)
    assert [(p, v) for p, v, _ in after] == [("services", "restored:1"), ("app", "captured")]
    last = xenpbrd_lab.cli(xen_host, "history", guest.name)[-1]
    assert last["method"] == "phase:services"
    assert last["attempts"][0].startswith("phase:app failed: manifest of image"), last
    images = {r["phase"]: r for r in xenpbrd_lab.cli(xen_host, "images", guest.name)}
    assert all(r["valid"] for r in images.values())
    assert images["app"]["image"] != corrupted


@pytest.mark.long  # 2 min: make test-long (CI keeps the kill mid-restore below)
@pytest.mark.timeout(600)  # several boots and recoveries under TCG
def test_xenpbrd_killed_mid_capture_leaves_no_partial_image(xen_host, lab_domain, xenpbrd,
                                                            dom0_python) -> None:
    guest = lab_domain("kcap", mode="agent", extra=f"lab.phases={THREE}",
                       on_crash="phasereboot")
    guest.write_config()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    xenpbrd_lab.wait_for_log(xen_host, "capturing phase services")
    time.sleep(1.5)  # xl save -c is streaming the guest's memory now
    xenpbrd_lab.kill(xen_host)
    entry = guest.wait_for_state(lambda e: not set(e.state) & set("psc"),
                                 "running again after the aborted save")
    assert entry.domid == guest.domid
    stored = dom0_python(f"""
        import json
        from pathlib import Path
        from xenpbr.images.store import ImageStore
        store = ImageStore(Path("{xenpbrd_lab.STATE}/images"))
        print(json.dumps([m.phase for m in store.images("{guest.name}")]))
    """)
    assert stored == ["kernel"]  # the half-written services image was never published

    xenpbrd_lab.start(xen_host, fresh=False)  # the pending request is answered now
    verdicts = agent_verdicts(guest, 3)
    assert [(p, v) for p, v, _ in verdicts] == [("kernel", "captured"),
                                                ("services", "captured"),
                                                ("app", "captured")], verdicts
    verified = dom0_python(f"""
        import json
        from pathlib import Path
        from xenpbr.images.store import ImageStore
        store = ImageStore(Path("{xenpbrd_lab.STATE}/images"))
        print(json.dumps(sorted(store.verify("{guest.name}", m.image_id).phase
                                for m in store.images("{guest.name}"))))
    """, timeout=300)
    assert verified == ["app", "kernel", "services"]
    assert crash_and_wait_restored(xen_host, guest)[:2] == ("app", "restored:1")


@pytest.mark.long  # 45 s: make test-long (the release itself is unit-tested in CI)
@pytest.mark.timeout(600)
def test_a_pause_held_by_a_killed_xenpbrd_is_released_when_it_starts(
        xen_host, lab_domain, xenpbrd, dom0_python) -> None:
    """A capture with ``snapshot`` disks holds the guest paused (``xl save -c -p``) until
    its disk snapshots are taken: xenpbrd killed there leaves the guest paused and its
    record says so. Timing a kill into that window is a matter of luck, so the test
    makes the state it would leave: the pause and the record."""
    guest = lab_domain("hold", mode="shell", on_crash="phasereboot")
    guest.write_config()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    xenpbrd_lab.kill(xen_host)
    xen_host.run(["xl", "pause", guest.name])
    dom0_python(f"""
        from pathlib import Path
        from xenpbr.state import StateDir
        StateDir(Path("{xenpbrd_lab.STATE}")).begin_held_pause("{guest.name}", {guest.domid})
        print("[]")
    """)
    assert "p" in guest.entry().state
    xenpbrd_lab.start(xen_host, fresh=False)
    xenpbrd_lab.wait_for_log(xen_host, "unpaused; a previous xenpbrd was stopped while")
    entry = guest.wait_for_state(lambda e: "p" not in e.state, "unpaused by xenpbrd")
    assert entry.domid == guest.domid
    left = dom0_python(f"""
        import json
        from pathlib import Path
        from xenpbr.state import StateDir
        print(json.dumps(StateDir(Path("{xenpbrd_lab.STATE}")).held_pauses()))
    """)
    assert left == []
    xen_host.run(["xl", "destroy", guest.name])


def test_xenpbrd_killed_mid_restore_finishes_the_recovery(xen_host, lab_domain,
                                                          xenpbrd) -> None:
    guest = protected_guest(xen_host, lab_domain, "kres")
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    xenpbrd_lab.wait_for_log(xen_host, f"{guest.name}: trying phase:app")
    time.sleep(1.5)  # xl restore is reading the regenerated stream now
    xenpbrd_lab.kill(xen_host)
    left = guest.entry()
    xenpbrd_lab.start(xen_host, fresh=False)
    (phase, verdict, rc), = agent_verdicts(guest, 1, after=offset)
    assert (phase, verdict, rc) == ("app", "restored:1", 0)
    history = xenpbrd_lab.cli(xen_host, "history", guest.name)
    assert history[-1]["trigger"] == "resume" and history[-1]["method"] == "phase:app"
    assert "resuming a recovery interrupted" in xenpbrd_lab.log_text(xen_host)
    print(f"domain when xenpbrd was killed: {left}")


@pytest.mark.long  # 4 min: make test-long (CI: test_protocol_real's hostile guest)
@pytest.mark.timeout(600)  # several boots and recoveries under TCG
def test_flooding_guest_is_refused_and_others_are_served(xen_host, lab_domain,
                                                         xenpbrd) -> None:
    flood = lab_domain("flood", mode="flood", extra="lab.phases=kernel",
                       on_crash="phasereboot")
    flood.write_config()
    xenpbrd_lab.cli(xen_host, "create", flood.config_path)
    good = protected_guest(xen_host, lab_domain, "calm")
    flood.wait_for_console(r"XENPBR-FLOOD: wrote \d+ requests, forge-ack rc=[1-9]")
    agent_verdicts(flood, 1)  # its own agent still gets an answer of some kind
    counts = {k: int(v) for k, v in published(xen_host, flood.name).items()
              if k.startswith("refusals/")}
    assert sum(counts.values()) >= 3, counts
    assert not any(k.startswith("refusals/") for k in published(xen_host, good.name))
    assert crash_and_wait_restored(xen_host, good)[:2] == ("app", "restored:1")
    assert xenpbrd_lab.running(xen_host)
    print(f"refusals counted for the flooding guest: {counts}")


@pytest.mark.timeout(600)  # several boots and recoveries under TCG
def test_expired_watchdog_is_recovered_from_an_image(xen_host, lab_domain, lab_images,
                                                     xenpbrd) -> None:
    ramdisk = install_watchdog_ramdisk(xen_host, lab_images.kernel_version)
    guest = protected_guest(xen_host, lab_domain, "wdog", phases="kernel",
                            extra=f"rdinit={WDT_INIT} lab.wdt=45", ramdisk=ramdisk,
                            on_watchdog="phasereboot")
    guest.wait_for_console(r"arming watchdog timeout=45")
    offset = guest.console_size()
    (phase, verdict, rc), = agent_verdicts(guest, 1, after=offset, timeout=200)
    assert (phase, verdict) == ("kernel", "restored:1")
    last = xenpbrd_lab.cli(xen_host, "history", guest.name)[-1]
    assert last["trigger"] == "watchdog" and last["method"] == "phase:kernel"


@pytest.mark.long  # 2 min: make test-long
@pytest.mark.timeout(600)  # xl save waits up to 60 s for a dead guest to suspend
def test_crash_during_a_capture_is_recovered(xen_host, lab_domain, xenpbrd) -> None:
    guest = lab_domain("ccap", mode="agent", extra=f"lab.phases={THREE}",
                       on_crash="phasereboot")
    guest.write_config()
    xenpbrd_lab.cli(xen_host, "create", guest.config_path)
    xenpbrd_lab.wait_for_log(xen_host, "capturing phase app")
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "c"])  # while xl save asks it to suspend
    after = agent_verdicts(guest, 2, after=offset, timeout=400)
    # the app capture failed with the guest; it comes back from services and its app
    # boundary is captured on the way
    assert [(p, v) for p, v, _ in after] == [("services", "restored:1"), ("app", "captured")]
    last = xenpbrd_lab.cli(xen_host, "history", guest.name)[-1]
    assert last["method"] == "phase:services" and last["outcome"] == "recovered"


@pytest.mark.long  # 3 min: make test-long (invalidation rules: tests/unit/test_invalidation.py)
@pytest.mark.timeout(600)  # several boots and recoveries under TCG
def test_guest_invalidates_its_images_from_a_phase_on(xen_host, lab_domain, xenpbrd) -> None:
    guest = protected_guest(xen_host, lab_domain, "inv", extra="lab.invalidate=services")
    line = guest.wait_for_console(r"XENPBR-INVALIDATE: (\S+) (\S+) rc=(\d+)", timeout=120)
    assert line.groups() == ("services", "dropped:2", "0")
    images = {row["phase"]: row["image"] for row in xenpbrd_lab.cli(xen_host, "images",
                                                                     guest.name)}
    assert images["kernel"] is not None and images["services"] is None and images["app"] is None
    offset = guest.console_size()
    xen_host.run(["xl", "sysrq", guest.name, "c"])
    after = agent_verdicts(guest, 3, after=offset)
    # the deepest image left is kernel's; the phases after it are captured afresh
    assert [(p, v) for p, v, _ in after] == [("kernel", "restored:1"),
                                             ("services", "captured"), ("app", "captured")]
    assert "XENPBR-INVALIDATE" not in guest.console()[offset:]  # only on the first boot
