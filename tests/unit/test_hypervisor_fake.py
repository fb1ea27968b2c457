"""FakeHypervisor: the behaviour it models (each item is a lab contract in
docs/hypervisor.md) and the exception types it shares with LibxcHypervisor."""

from __future__ import annotations

import errno
import uuid

import pytest

from xenpbr.errors import XenpbrError
from xenpbr.hypervisor import (
    ControlDomainRefused,
    DomainNotFound,
    Hypervisor,
    NoSuchVcpu,
    NotPaused,
    NotPVGuest,
    PauseLimitReached,
    PfnNotPresent,
    ShutdownReason,
    VcpuNotInitialised,
)
from xenpbr.hypervisor.fake import FakeHypervisor, FakeNotModelled
from xenpbr.xenstore import FakeXenstoreServer

PAGE = 4096


@pytest.fixture
def hv() -> FakeHypervisor:
    return FakeHypervisor()


# --------------------------------------------------------------------------- domains


def test_starts_with_dom0_only(hv):
    assert isinstance(hv, Hypervisor)
    (dom0,) = hv.list_domains()
    assert dom0.domid == 0 and dom0.uuid == uuid.UUID(int=0)
    assert not dom0.shutdown and not dom0.dying and not dom0.paused


def test_create_allocates_domids_like_the_rover(hv):
    first, second = hv.create_domain(), hv.create_domain()
    assert (first, second) == (1, 2)
    hv.destroy(first)
    assert hv.create_domain() == 3  # not reused at once
    assert [s.domid for s in hv.list_domains()] == [0, 2, 3]
    assert hv.create_domain(domid=1) == 1
    with pytest.raises(ValueError, match="already exists"):
        hv.create_domain(domid=2)


def test_new_domain_state(hv):
    uid = uuid.uuid4()
    domid = hv.create_domain(uuid=uid, memory_mib=16, vcpus=2)
    state = hv.domain_state(domid)
    assert state.uuid == uid and state.memory_pages == 16 * 256
    assert state.memory_mib == 16 and state.max_vcpu_id == 1 and state.vcpus_online == 2
    assert not state.paused and not state.shutdown and state.shutdown_reason is None
    assert state.shutdown_code is None and state.xl_state == "------"
    assert hv.domain_state(hv.create_domain(paused=True)).paused


def test_unknown_domain_is_domain_not_found(hv):
    with pytest.raises(DomainNotFound) as info:
        hv.domain_state(42)
    assert info.value.errno == errno.ESRCH and info.value.domid == 42
    assert isinstance(info.value, XenpbrError) and "xl list" in str(info.value)
    for call in (lambda: hv.pause(42), lambda: hv.destroy(42), lambda: hv.read_pfn(42, 0),
                 lambda: hv.shutdown(42, ShutdownReason.CRASH),
                 lambda: hv.vcpu_registers(42, 0)):
        with pytest.raises(DomainNotFound):
            call()


@pytest.mark.parametrize("bad", [-1, 0x7FF0])
def test_impossible_domid_is_value_error(hv, bad):
    with pytest.raises(ValueError):
        hv.domain_state(bad)


def test_activity_and_cpu_time_are_reported_as_set(hv):
    domid = hv.create_domain()
    hv.set_activity(domid, running=True, blocked=False)
    hv.set_cpu_time(domid, 123)
    state = hv.domain_state(domid)
    assert state.running and not state.blocked and state.cpu_time_ns == 123


# --------------------------------------------------------------------------- pause


def test_pauses_nest(hv):
    domid = hv.create_domain()
    hv.pause(domid)
    hv.pause(domid)
    hv.unpause(domid)
    assert hv.domain_state(domid).paused and hv.pause_count(domid) == 1
    hv.unpause(domid)
    assert not hv.domain_state(domid).paused
    with pytest.raises(NotPaused) as info:
        hv.unpause(domid)
    assert info.value.errno == errno.EINVAL and info.value.domid == domid


def test_pause_limit_is_255(hv):
    domid = hv.create_domain()
    for _ in range(255):
        hv.pause(domid)
    with pytest.raises(PauseLimitReached):
        hv.pause(domid)
    assert hv.pause_count(domid) == 255


def test_paused_context_manager(hv):
    domid = hv.create_domain()
    with hv.paused(domid):
        assert hv.domain_state(domid).paused
    assert not hv.domain_state(domid).paused


def test_paused_context_manager_tolerates_vanished_domain(hv):
    domid = hv.create_domain()
    with hv.paused(domid):
        hv.destroy(domid)
    assert domid not in [s.domid for s in hv.list_domains()]


def test_control_domain_is_refused(hv):
    for call in (lambda: hv.pause(0), lambda: hv.unpause(0), lambda: hv.destroy(0),
                 lambda: hv.shutdown(0, ShutdownReason.REBOOT),
                 lambda: hv.write_pfn(0, 0, b"x"),
                 lambda: hv.set_vcpu_registers(0, 0, hv.vcpu_registers(0, 0))):
        with pytest.raises(ControlDomainRefused, match="control domain"):
            call()


# --------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize("reason", list(ShutdownReason))
def test_shutdown_reasons(hv, reason):
    domid = hv.create_domain()
    hv.shutdown(domid, reason)
    state = hv.domain_state(domid)
    assert state.shutdown and state.shutdown_reason is reason
    assert state.shutdown_code == int(reason)
    assert state.crashed == (reason is ShutdownReason.CRASH)


def test_first_shutdown_reason_sticks_until_resume(hv):
    domid = hv.create_domain()
    hv.crash(domid)
    hv.shutdown(domid, ShutdownReason.POWEROFF)
    assert hv.domain_state(domid).shutdown_reason is ShutdownReason.CRASH
    assert hv.domain_state(domid).xl_state == "---sc-"
    hv.resume(domid)
    assert not hv.domain_state(domid).shutdown
    hv.watchdog_expire(domid)
    assert hv.domain_state(domid).shutdown_reason is ShutdownReason.WATCHDOG


@pytest.mark.parametrize(("code", "xl"), [
    (ShutdownReason.POWEROFF, "---s--"), (ShutdownReason.REBOOT, "---sr-"),
    (ShutdownReason.SUSPEND, "---ss-"), (ShutdownReason.CRASH, "---sc-"),
    (ShutdownReason.WATCHDOG, "---sw-"), (ShutdownReason.SOFT_RESET, "---sS-"), (42, "---s?-"),
])
def test_xl_state_shows_the_shutdown_reason_letter_as_xl_does(hv, code, xl):
    """Real `xl list` (lab H5/H7/H8) prints xl's "-rscwS" letter for every reason and
    "?" for codes Xen does not define, not just "c" for a crash."""
    domid = hv.create_domain(paused=True)
    hv.guest_shutdown(domid, code)
    assert hv.domain_state(domid).xl_state == "--p" + xl[3:]
    hv.hold_reference(domid)
    hv.destroy(domid)
    assert hv.domain_state(domid).xl_state == "--p" + xl[3:5] + "d"


def test_guest_chosen_unknown_shutdown_code(hv):
    domid = hv.create_domain()
    hv.guest_shutdown(domid, 42)
    state = hv.domain_state(domid)
    assert state.shutdown and state.shutdown_reason is None and state.shutdown_code == 42
    with pytest.raises(ValueError):
        hv.guest_shutdown(domid, 256)
    with pytest.raises(ValueError):
        hv.shutdown(domid, 42)  # the interface only sends Xen's defined reasons


def test_memory_of_crashed_domain_stays_readable(hv):
    domid = hv.create_domain()
    hv.write_pfn(domid, 5, b"before the crash")
    hv.crash(domid)
    assert hv.read_pfn(domid, 5).startswith(b"before the crash")


# --------------------------------------------------------------------------- destroy


def test_destroy_removes_domain(hv):
    domid = hv.create_domain()
    hv.crash(domid)
    hv.destroy(domid)
    with pytest.raises(DomainNotFound):
        hv.domain_state(domid)
    with pytest.raises(DomainNotFound):
        hv.destroy(domid)


def test_destroyed_domain_with_reference_lingers_dying(hv):
    domid = hv.create_domain()
    hv.hold_reference(domid)
    hv.crash(domid)
    hv.destroy(domid)
    state = hv.domain_state(domid)
    assert state.dying and state.shutdown_reason is ShutdownReason.CRASH
    hv.destroy(domid)  # Xen: destroying a dead domain succeeds and does nothing
    with pytest.raises(FakeNotModelled):
        hv.pause(domid)
    with pytest.raises(FakeNotModelled):
        hv.read_pfn(domid, 0)
    hv.drop_reference(domid)
    assert domid not in [s.domid for s in hv.list_domains()]


# --------------------------------------------------------------------------- vCPUs


def test_vcpu_registers_round_trip(hv):
    domid = hv.create_domain(vcpus=2)
    regs = hv.vcpu_registers(domid, 1)
    assert regs.vcpu == 1 and regs.online
    hv.set_vcpu_registers(domid, 1, regs.replace(rip=0xFFFFFFFF81000000, rsp=0x1000))
    again = hv.vcpu_registers(domid, 1)
    assert again.rip == 0xFFFFFFFF81000000 and again.rsp == 0x1000


def test_vcpu_errors(hv):
    domid = hv.create_domain(vcpus=2, initialised_vcpus=1)
    with pytest.raises(NoSuchVcpu) as info:
        hv.vcpu_registers(domid, 2)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(VcpuNotInitialised) as info:
        hv.vcpu_registers(domid, 1)
    assert info.value.errno == errno.ENODATA
    assert hv.domain_state(domid).vcpus_online == 1
    with pytest.raises(NoSuchVcpu):
        hv.set_vcpu_registers(domid, 5, hv.vcpu_registers(domid, 0))
    hv.set_vcpu_registers(domid, 1, hv.vcpu_registers(domid, 0))
    assert hv.vcpu_registers(domid, 1).vcpu == 1


# --------------------------------------------------------------------------- memory


def test_pages_read_as_zero_until_written(hv):
    domid = hv.create_domain(memory_mib=1)
    assert hv.populated_pfns(domid) == list(range(256))
    assert hv.read_pfn(domid, 7) == bytes(PAGE)
    hv.write_pfn(domid, 7, b"abc", offset=10)
    page = hv.read_pfn(domid, 7)
    assert page[10:13] == b"abc" and len(page) == PAGE and page.count(0) == PAGE - 3
    assert hv.read_pfns(domid, [7, 8]) == [page, bytes(PAGE)]


def test_holes_and_out_of_range_pfns(hv):
    domid = hv.create_domain(memory_mib=1)
    hv.add_holes(domid, [3])
    assert 3 not in hv.populated_pfns(domid)
    assert hv.domain_state(domid).memory_pages == 255
    for pfn in (3, 256):
        with pytest.raises(PfnNotPresent, match=f"pfn {pfn:#x}"):
            hv.read_pfn(domid, pfn)
    with pytest.raises(PfnNotPresent):
        hv.write_pfn(domid, 3, b"x")


@pytest.mark.parametrize("offset,size", [(-1, 1), (PAGE - 1, 2), (0, PAGE + 1)])
def test_write_must_fit_in_the_page(hv, offset, size):
    domid = hv.create_domain(memory_mib=1)
    with pytest.raises(ValueError, match="one 4096-byte page"):
        hv.write_pfn(domid, 0, b"x" * size, offset)


def test_find_marker_including_across_pages(hv):
    domid = hv.create_domain(memory_mib=1)
    hv.write_pfn(domid, 2, b"MARK", offset=100)
    hv.write_pfn(domid, 4, b"MA", offset=PAGE - 2)
    hv.write_pfn(domid, 5, b"RK", offset=0)
    hv.write_pfn(domid, 9, b"MARKMARK", offset=0)
    assert hv.find(domid, b"MARK") == [(2, 100), (4, PAGE - 2), (9, 0), (9, 4)]
    assert hv.find(domid, b"MARK", limit=2) == [(2, 100), (4, PAGE - 2)]
    hv.add_holes(domid, [5])
    assert (4, PAGE - 2) not in hv.find(domid, b"MARK")  # not contiguous any more
    with pytest.raises(ValueError):
        hv.find(domid, b"")


def test_find_marker_starting_in_zeros(hv):
    domid = hv.create_domain(memory_mib=1)
    hv.write_pfn(domid, 6, b"\x01", offset=0)
    assert hv.find(domid, b"\x00\x00\x01") == [(5, PAGE - 2)]
    assert len(hv.find(domid, b"\x00" * 8, limit=3)) == 3


def test_hvm_domain_memory_is_not_pv(hv):
    domid = hv.create_domain(hvm=True)
    assert hv.domain_state(domid).hvm
    with pytest.raises(NotPVGuest):
        hv.read_pfn(domid, 0)


def test_dom0_memory_not_modelled(hv):
    with pytest.raises(FakeNotModelled):
        hv.read_pfn(0, 0)


# --------------------------------------------------------------------------- xenstore


@pytest.fixture
def wired():
    server = FakeXenstoreServer()
    hv = FakeHypervisor(server)
    with server.connect(0) as xs:
        xs.watch("@introduceDomain", "intro")
        xs.watch("@releaseDomain", "release")
        drain(xs)  # the registration events
        yield hv, server, xs


def drain(xs) -> list[str]:
    out = []
    while (ev := xs.read_watch(timeout=0)) is not None:
        out.append(ev.token)
    return out


def test_create_introduces_domain(wired):
    hv, server, xs = wired
    domid = hv.create_domain(name="guest")
    assert drain(xs) == ["intro"]
    assert xs.read(f"/local/domain/{domid}/name") == b"guest"
    assert xs.is_domain_introduced(domid)


def test_create_without_introduce_fires_nothing(wired):
    hv, server, xs = wired
    domid = hv.create_domain(introduce=False)
    assert drain(xs) == []
    hv.crash(domid)
    hv.destroy(domid)
    assert drain(xs) == []


@pytest.mark.parametrize("reason", list(ShutdownReason))
def test_shutdown_fires_release_once(wired, reason):
    hv, server, xs = wired
    domid = hv.create_domain()
    drain(xs)
    hv.shutdown(domid, reason)
    assert drain(xs) == ["release"]
    hv.shutdown(domid, reason)  # already shut down: Xen sends no VIRQ
    hv.create_domain()
    hv.crash(hv.create_domain())  # another domain's VIRQ: ours is not re-notified
    assert drain(xs) == ["intro", "intro", "release"]


def test_destroy_fires_release_and_removes_home(wired):
    hv, server, xs = wired
    domid = hv.create_domain()
    hv.crash(domid)
    drain(xs)
    hv.destroy(domid)
    assert drain(xs) == ["release"]
    assert not xs.is_domain_introduced(domid)
    assert f"/local/domain/{domid}" not in server.dump()


def test_destroy_of_running_domain_fires_release_once(wired):
    hv, server, xs = wired
    domid = hv.create_domain()
    drain(xs)
    hv.destroy(domid)
    assert drain(xs) == ["release"]


def test_lingering_dying_domain_released_at_death_not_at_reap(wired):
    hv, server, xs = wired
    domid = hv.create_domain()
    hv.hold_reference(domid)
    drain(xs)
    hv.destroy(domid)
    assert drain(xs) == ["release"]
    hv.drop_reference(domid)
    assert drain(xs) == []


def test_suspend_with_suspend_evtchn_sends_no_virq(wired):
    hv, server, xs = wired
    quiet = hv.create_domain(suspend_evtchn=True)
    other = hv.create_domain()
    drain(xs)
    virqs = hv.virq_count
    hv.shutdown(quiet, ShutdownReason.SUSPEND)
    assert drain(xs) == [] and hv.virq_count == virqs
    assert hv.domain_state(quiet).shutdown  # Xen still marks it shut down
    hv.crash(other)  # the next VIRQ makes xenstored notice both: one event
    assert drain(xs) == ["release"]


def test_resume_rearms_notification_only_with_xs_resume(wired):
    hv, server, xs = wired
    domid = hv.create_domain()
    hv.shutdown(domid, ShutdownReason.SUSPEND)
    hv.resume(domid)
    drain(xs)
    hv.crash(domid)
    assert drain(xs) == ["release"]
    hv.resume(domid, xenstore_resume=False)
    hv.crash(domid)
    assert drain(xs) == []  # xenstored still believes it is shut down
