"""DomainWatcher over FakeHypervisor wired to FakeXenstoreServer (xenstored's domain
watches), plus the `python -m xenpbr.watcher` command."""

from __future__ import annotations

import io
import json
import selectors
import threading
import time
import uuid

import pytest

from xenpbr.ctypes_libxc import XenNotRunning
from xenpbr.errors import XenpbrError
from xenpbr.hypervisor import ShutdownReason, XenCallError
from xenpbr.hypervisor.fake import FakeHypervisor
from xenpbr.watcher import (
    DomainAppeared,
    DomainCrashed,
    DomainDestroyed,
    DomainShutDown,
    DomainWatchdogFired,
    DomainWatcher,
    main,
)
from xenpbr.xenstore import FakeXenstore, FakeXenstoreServer


@pytest.fixture
def server() -> FakeXenstoreServer:
    return FakeXenstoreServer()


@pytest.fixture
def hv(server) -> FakeHypervisor:
    return FakeHypervisor(server)


@pytest.fixture
def xs(server):
    with server.connect(0) as client:
        yield client


@pytest.fixture
def watcher(hv, xs):
    with DomainWatcher(hv, xs) as w:
        assert w.poll_once(0) == []  # nothing but dom0 exists; registration events
        yield w


def kinds(events) -> list[tuple[str, int]]:
    return [(e.kind, e.domid) for e in events]


# --------------------------------------------------------------------------- start


def test_existing_domains_reported_at_start(hv, xs):
    running, crashed = hv.create_domain(), hv.create_domain()
    hv.crash(crashed)
    with DomainWatcher(hv, xs) as w:
        events = w.poll_once(0)
        assert kinds(events) == [("appeared", running), ("appeared", crashed),
                                 ("crashed", crashed)]
        assert {e.trigger for e in events} == {"initial"}
        assert w.poll_once(0) == []  # the registration events change nothing


def test_existing_domains_recorded_silently(hv, xs):
    domid = hv.create_domain()
    hv.crash(domid)
    with DomainWatcher(hv, xs, report_existing=False) as w:
        assert w.poll_once(0) == []
        hv.destroy(domid)
        assert kinds(w.poll_once(0)) == [("destroyed", domid)]


def test_poll_before_start_is_an_error(hv, xs):
    w = DomainWatcher(hv, xs)
    with pytest.raises(XenpbrError, match="not started"):
        w.poll_once(0)
    w.close()


# --------------------------------------------------------------------------- transitions


def test_created_domain_appears(hv, watcher):
    uid = uuid.uuid4()
    domid = hv.create_domain(uuid=uid)
    (event,) = watcher.poll_once(0)
    assert isinstance(event, DomainAppeared) and event.domid == domid and event.uuid == uid
    assert event.trigger == "@introduceDomain"


def test_crash_reported_once(hv, watcher):
    domid = hv.create_domain()
    watcher.poll_once(0)
    before = time.monotonic()
    hv.crash(domid)
    (event,) = watcher.poll_once(0)
    assert isinstance(event, DomainCrashed) and event.trigger == "@releaseDomain"
    assert before <= event.seen_at <= time.monotonic()
    hv.crash(hv.create_domain())  # other domains' events: ours is not re-reported
    assert [e.domid for e in watcher.poll_once(0) if isinstance(e, DomainCrashed)] == [domid + 1]
    assert watcher.rescan() == []


def test_watchdog(hv, watcher):
    domid = hv.create_domain()
    watcher.poll_once(0)
    hv.watchdog_expire(domid)
    (event,) = watcher.poll_once(0)
    assert isinstance(event, DomainWatchdogFired) and event.domid == domid


@pytest.mark.parametrize("reason", [ShutdownReason.POWEROFF, ShutdownReason.REBOOT,
                                    ShutdownReason.SUSPEND, ShutdownReason.SOFT_RESET])
def test_other_shutdowns(hv, watcher, reason):
    domid = hv.create_domain()
    watcher.poll_once(0)
    hv.shutdown(domid, reason)
    (event,) = watcher.poll_once(0)
    assert isinstance(event, DomainShutDown)
    assert event.reason is reason and event.code == int(reason)
    assert event.to_json()["reason"] == reason.name.lower()


def test_guest_chosen_shutdown_code(hv, watcher, caplog):
    domid = hv.create_domain()
    watcher.poll_once(0)
    hv.guest_shutdown(domid, 42)
    (event,) = watcher.poll_once(0)
    assert isinstance(event, DomainShutDown) and event.reason is None and event.code == 42
    assert "does not define" in caplog.text


def test_destroy_after_crash(hv, watcher):
    domid = hv.create_domain()
    hv.crash(domid)
    watcher.poll_once(0)
    hv.destroy(domid)
    (event,) = watcher.poll_once(0)
    assert isinstance(event, DomainDestroyed) and event.shutdown_code == 3
    assert event.shutdown_reason is ShutdownReason.CRASH


def test_crash_and_destroy_between_snapshots(hv, watcher):
    """Like xl's on_crash="destroy": the crash is never seen on its own. Only a domain
    still listed as dying shows the code it died with."""
    gone, dying = hv.create_domain(), hv.create_domain()
    hv.hold_reference(dying)
    watcher.poll_once(0)
    for domid in (gone, dying):
        hv.crash(domid)
        hv.destroy(domid)
    events = watcher.poll_once(0)
    assert kinds(events) == [("destroyed", gone), ("destroyed", dying)]
    assert [e.shutdown_code for e in events] == [None, 3]


def test_dying_domain_reported_once(hv, watcher):
    domid = hv.create_domain()
    hv.hold_reference(domid)
    watcher.poll_once(0)
    hv.destroy(domid)
    (event,) = watcher.poll_once(0)
    assert isinstance(event, DomainDestroyed) and event.shutdown_code is None
    hv.drop_reference(domid)
    hv.create_domain()  # next event: the dying domain has gone, nothing more about it
    assert kinds(watcher.poll_once(0)) == [("appeared", domid + 1)]


def test_domain_that_came_and_went_is_not_reported(hv, watcher):
    hv.destroy(hv.create_domain())
    assert watcher.poll_once(0) == []


def test_domid_reused_with_new_uuid(hv, watcher):
    domid = hv.create_domain()
    watcher.poll_once(0)
    hv.destroy(domid)
    hv.create_domain(domid=domid)
    events = watcher.poll_once(0)
    assert kinds(events) == [("destroyed", domid), ("appeared", domid)]
    assert events[0].uuid != events[1].uuid


def test_crash_after_resume_reported_again(hv, watcher):
    domid = hv.create_domain()
    hv.shutdown(domid, ShutdownReason.SUSPEND)
    watcher.poll_once(0)
    hv.resume(domid)
    hv.crash(domid)
    assert kinds(watcher.poll_once(0)) == [("crashed", domid)]


def test_same_reason_after_unseen_resume_needs_a_rescan(hv, watcher):
    """Resume sends no VIRQ: a snapshot diff cannot see suspend-resume-suspend unless
    someone rescans in between (the daemon does, after its own checkpoints)."""
    domid = hv.create_domain()
    hv.shutdown(domid, ShutdownReason.SUSPEND)
    watcher.poll_once(0)
    hv.resume(domid)
    hv.shutdown(domid, ShutdownReason.SUSPEND)
    assert watcher.poll_once(0) == []  # the documented limitation
    hv.resume(domid)
    assert watcher.rescan() == []
    hv.shutdown(domid, ShutdownReason.SUSPEND)
    assert kinds(watcher.poll_once(0)) == [("shutdown", domid)]


def test_dom0_ignored_and_custom_ignore(hv, xs):
    domid = hv.create_domain()
    with DomainWatcher(hv, xs, ignore_domids=(0, domid)) as w:
        assert w.poll_once(0) == []
        hv.crash(domid)
        assert w.poll_once(0) == []


# --------------------------------------------------------------------------- waiting


def test_poll_once_waits_for_timeout(watcher):
    start = time.monotonic()
    assert watcher.poll_once(0.2) == []
    assert 0.15 <= time.monotonic() - start < 2


def test_poll_once_wakes_on_event_from_another_thread(hv, watcher):
    domid = hv.create_domain()
    watcher.poll_once(0)
    threading.Timer(0.1, hv.crash, args=(domid,)).start()
    start = time.monotonic()
    assert kinds(watcher.poll_once(5)) == [("crashed", domid)]
    assert time.monotonic() - start < 2


def test_stop_wakes_a_blocked_poll(watcher):
    threading.Timer(0.1, watcher.stop).start()
    start = time.monotonic()
    assert watcher.poll_once(None) == []
    assert time.monotonic() - start < 2 and watcher.stopped


def test_events_iterator(hv, watcher):
    domid = hv.create_domain()
    watcher.poll_once(0)
    threading.Timer(0.05, hv.crash, args=(domid,)).start()
    threading.Timer(0.15, hv.destroy, args=(domid,)).start()
    got = []
    for event in watcher.events(timeout=5):
        got.append(event)
        if len(got) == 2:
            watcher.stop()
    assert kinds(got) == [("crashed", domid), ("destroyed", domid)]


def test_events_iterator_timeout(watcher):
    start = time.monotonic()
    assert list(watcher.events(timeout=0.2)) == []
    assert time.monotonic() - start < 2


def test_fileno_works_with_selectors(hv, watcher):
    domid = hv.create_domain()
    watcher.poll_once(0)
    with selectors.DefaultSelector() as sel:
        sel.register(watcher.fileno(), selectors.EVENT_READ)
        assert sel.select(0) == []
        hv.crash(domid)
        assert sel.select(1)
    assert kinds(watcher.poll_once(0)) == [("crashed", domid)]


# --------------------------------------------------------------------------- sharing, errors


def test_foreign_watch_events_go_to_callback(hv, xs):
    other = []
    with DomainWatcher(hv, xs, on_other_watch=other.append) as w:
        xs.watch("/local/domain/0", "mine")
        w.poll_once(0)
        w.poll_once(0)
        assert [ev.token for ev in other] == ["mine"]


def test_shared_connection_with_process(hv, xs):
    domid = hv.create_domain()
    with DomainWatcher(hv, xs, report_existing=False) as w:
        hv.crash(domid)
        events = []
        while (ev := xs.read_watch(timeout=0)) is not None:
            if w.owns(ev):
                events += w.process([ev])
        assert kinds(events) == [("crashed", domid)]


class FlakyHypervisor:
    """Delegates to a FakeHypervisor; list_domains fails once when armed."""

    def __init__(self, hv: FakeHypervisor) -> None:
        self.hv, self.fail = hv, False

    def list_domains(self):
        if self.fail:
            self.fail = False
            raise XenCallError.from_call(12, "xc_domain_getinfolist")
        return self.hv.list_domains()


def test_failed_snapshot_is_retried_without_new_watch(hv, xs):
    flaky = FlakyHypervisor(hv)
    domid = hv.create_domain()
    with DomainWatcher(flaky, xs) as w:
        w.poll_once(0)
        hv.crash(domid)
        flaky.fail = True
        with pytest.raises(XenCallError):
            w.poll_once(0)
        assert kinds(w.poll_once(0)) == [("crashed", domid)]


def test_close_unwatches(hv, server, xs):
    w = DomainWatcher(hv, xs).start()
    w.close()
    while xs.read_watch(timeout=0) is not None:
        pass
    hv.create_domain()
    assert xs.read_watch(timeout=0) is None


def test_event_json():
    event = DomainDestroyed(5, uuid.UUID(int=1), 12.5, 1.7e9, "@releaseDomain", 4)
    assert event.to_json() == {
        "event": "destroyed", "domid": 5, "uuid": str(uuid.UUID(int=1)), "monotonic": 12.5,
        "time": 1.7e9, "trigger": "@releaseDomain", "shutdown_code": 4,
        "shutdown_reason": "watchdog"}


# --------------------------------------------------------------------------- CLI


def run_cli(hv, server, *args, xenstore=None):
    out = io.StringIO()
    status = main(list(args), out=out, make_hypervisor=lambda libdir: hv,
                  make_xenstore=xenstore or (lambda libdir: FakeXenstore(server)))
    return status, [json.loads(line) for line in out.getvalue().splitlines()]


def test_cli_json_lines(hv, server):
    domid = hv.create_domain()
    hv.crash(domid)
    status, lines = run_cli(hv, server, "--json", "--existing", "--count", "2")
    assert status == 0
    assert [(line["event"], line["domid"]) for line in lines] == [("appeared", domid),
                                                                  ("crashed", domid)]
    assert all({"monotonic", "time", "uuid", "trigger"} <= line.keys() for line in lines)
    assert abs(lines[0]["time"] - time.time()) < 60


def test_cli_waits_for_new_events(hv, server):
    domid = hv.create_domain()
    threading.Timer(0.2, hv.crash, args=(domid,)).start()
    status, lines = run_cli(hv, server, "--json", "--count", "1", "--timeout", "10")
    assert status == 0 and [line["event"] for line in lines] == ["crashed"]


def test_cli_timeout_before_count(hv, server):
    status, lines = run_cli(hv, server, "--json", "--count", "1", "--timeout", "0.2")
    assert status == 2 and lines == []


def test_cli_human_output(hv, server):
    domid = hv.create_domain()
    out = io.StringIO()
    assert main(["--existing", "--count", "1"], out=out, make_hypervisor=lambda _: hv,
                make_xenstore=lambda _: FakeXenstore(server)) == 0
    assert f"appeared  domid={domid}" in out.getvalue()


def test_cli_reports_errors(hv, server, capsys):
    def no_xen(libdir):
        raise XenNotRunning(19, "xc_interface_open: Xen is not running: boot the host "
                                "into the Xen 4.17 hypervisor")
    assert main(["--json"], make_hypervisor=no_xen) == 1
    assert "Xen is not running" in capsys.readouterr().err
    assert main(["--count", "0"]) == 1
