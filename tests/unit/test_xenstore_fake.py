"""FakeXenstore: the shared contract, plus the xenstored semantics only the fake can
set up on the host (guest domains, permissions, special watches, conflicts)."""

from __future__ import annotations

import errno
import os
import select
import selectors
import threading
import time

import pytest

from xenpbr.errors import XenpbrError
from xenpbr.xenstore import (
    Access,
    FakeXenstore,
    FakeXenstoreServer,
    NodePerms,
    NoSuchKey,
    Perm,
    PermissionDenied,
    TransactionConflict,
    WatchEvent,
    XenstoreClient,
    XenstoreError,
)

try:
    from . import xenstore_contract as contract  # tests/unit as a package
except ImportError:  # rootdir-relative import (no __init__.py)
    import xenstore_contract as contract


# --------------------------------------------------------------------------------------------
# Contract, against the fake


@pytest.fixture
def server() -> FakeXenstoreServer:
    return FakeXenstoreServer()


@pytest.mark.parametrize("check", contract.CONTRACT_CHECKS, ids=contract.check_id)
def test_contract_fake(check, server):
    check(lambda: server.connect(0))


def test_run_contract_reports_rows(server):
    rows = contract.run_contract(lambda: server.connect(0))
    assert [r[0] for r in rows] == [contract.check_id(c) for c in contract.CONTRACT_CHECKS]
    assert all(ok for _, ok, _ in rows), [r for r in rows if not r[1]]


def test_fake_is_the_real_client_class():
    # same public interface by construction
    assert issubclass(FakeXenstore, XenstoreClient)
    public = {n for n in dir(XenstoreClient) if not n.startswith("_")}
    assert public <= set(dir(FakeXenstore))


# --------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def world():
    """dom0 + guest 3 (laid out like libxl) + guest 4, all on one server."""
    srv = FakeXenstoreServer()
    srv.create_domain(3, name="guest3")
    srv.create_domain(4)
    dom0, g3, g4 = srv.connect(0), srv.connect(3), srv.connect(4)
    yield srv, dom0, g3, g4
    for c in (dom0, g3, g4):
        c.close()


def events(c, timeout=0.0):
    out = []
    while (ev := c.read_watch(timeout=timeout)) is not None:
        out.append(ev)
    return out


# --------------------------------------------------------------------------------------------
# Tree semantics


def test_initial_tree(server):
    with server.connect() as c:
        assert c.ls("/") == ["local"]
        assert c.ls("/local/domain") == ["0"]
        assert c.get_perms("/") == NodePerms(0, Access.NONE)


def test_children_keep_insertion_order(server):
    with server.connect() as c:
        for name in ("zeta", "alpha", "mid"):
            c.write(f"/o/{name}", "")
        assert c.ls("/o") == ["zeta", "alpha", "mid"]


def test_rm_root_is_refused(server):
    with server.connect() as c:
        with pytest.raises(XenstoreError) as ei:
            c.rm("/")
        assert ei.value.errno == errno.EINVAL


def test_dump_and_domain_layout(world):
    srv, dom0, g3, _ = world
    d = srv.dump("/local/domain/3")
    assert d["/local/domain/3/name"] == b"guest3"
    assert d["/local/domain/3/domid"] == b"3"
    assert srv.perms_of("/local/domain/3") == [(0, 0), (3, 1)]
    assert srv.perms_of("/local/domain/3/data") == [(3, 0)]


def test_relative_paths_resolve_to_domain_home(world):
    _, dom0, g3, _ = world
    g3.write("data/phase", "1")
    assert dom0.read("/local/domain/3/data/phase") == b"1"
    assert g3.read("data/phase") == b"1"
    assert g3.ls("data") == ["phase"]
    dom0.write("rel", "x")  # dom0's home is /local/domain/0
    assert dom0.read("/local/domain/0/rel") == b"x"


# --------------------------------------------------------------------------------------------
# Permissions


def test_guest_writes_only_where_permitted(world):
    _, dom0, g3, _ = world
    g3.write("/local/domain/3/data/x", "ok")
    g3.write("control/shutdown", "reboot")
    with pytest.raises(PermissionDenied) as ei:
        g3.write("/local/domain/3/foo", "no")
    assert "/local/domain/3/foo" in str(ei.value)
    assert ei.value.errno == errno.EACCES
    with pytest.raises(PermissionDenied):
        g3.write("/tool/x", "no")
    with pytest.raises(PermissionDenied):
        g3.write("device/vif/0/state", "4")  # device/ is dom0-owned, read-only to guest
    assert dom0.read_or("/local/domain/3/foo") is None


def test_guest_reads(world):
    _, dom0, g3, g4 = world
    assert g3.read("name") == b"guest3"  # dom0-owned, guest has r3
    with pytest.raises(PermissionDenied):
        g3.read("/local/domain/0")
    with pytest.raises(PermissionDenied):
        g3.read("/local/domain/4/domid")
    with pytest.raises(PermissionDenied):
        g4.ls("/local/domain/3")


def test_enoent_only_if_parent_readable(world):
    _, _, g3, _ = world
    with pytest.raises(NoSuchKey):
        g3.read("data/missing")  # parent data/ readable -> ENOENT
    with pytest.raises(PermissionDenied):
        g3.read("/local/domain/4/missing")  # parent not readable -> EACCES, no leak
    with pytest.raises(PermissionDenied):
        g3.read("/nothing/here")  # nearest ancestor "/" is n0


def test_guest_created_nodes_are_guest_owned(world):
    srv, dom0, g3, _ = world
    g3.write("data/a/b", "1")
    assert g3.get_perms("data/a").owner == 3
    assert g3.get_perms("data/a/b").owner == 3
    dom0.write("/local/domain/3/data/by-dom0", "1")  # dom0 keeps inherited owner
    assert dom0.get_perms("/local/domain/3/data/by-dom0").owner == 3


def test_set_perms_rules(world):
    _, dom0, g3, g4 = world
    g3.write("data/shared", "v")
    g3.set_perms("data/shared", 3, Access.NONE, acl=[Perm(4, Access.READ)])
    assert g4.read("/local/domain/3/data/shared") == b"v"
    with pytest.raises(PermissionDenied):
        g4.write("/local/domain/3/data/shared", "w")
    with pytest.raises(PermissionDenied) as ei:
        g3.set_perms("data/shared", 4)  # only dom0 may change the owner
    assert ei.value.errno == errno.EPERM
    with pytest.raises(PermissionDenied):
        g4.set_perms("/local/domain/3/data/shared", 3, "b")  # not the owner
    g3.set_perms("data/shared", 3, "w")
    g4.write("/local/domain/3/data/shared", "others may write")
    with pytest.raises(PermissionDenied):
        g4.read("/local/domain/3/data/shared")  # 'w' is write-only
    dom0.set_perms("/local/domain/3/data/shared", 4)
    assert g4.get_perms("/local/domain/3/data/shared").owner == 4


def test_acl_overrides_others(world):
    _, dom0, g3, g4 = world
    dom0.write("/pub", "v")
    dom0.set_perms("/pub", 0, "r", acl=[(4, "n")])
    assert g3.read("/pub") == b"v"
    with pytest.raises(PermissionDenied):
        g4.read("/pub")


def test_acl_of_nonexistent_domain_is_ignored_and_owner_must_exist(server):
    with server.connect() as dom0:
        dom0.write("/x", "v")
        with pytest.raises(NoSuchKey):
            dom0.set_perms("/x", 42)
        dom0.set_perms("/x", 0, "n", acl=[(42, "r")])
        assert dom0.get_perms("/x").acl == (Perm(42, Access.READ),)
        server.create_domain(42)
        with server.connect(42) as g:
            assert g.read("/x") == b"v"  # now the entry counts


def test_dom0_bypasses_permissions(world):
    _, dom0, g3, _ = world
    g3.write("data/private", "s")
    g3.set_perms("data/private", 3, "n")
    assert dom0.read("/local/domain/3/data/private") == b"s"
    dom0.write("/local/domain/3/data/private", "t")
    dom0.rm("/local/domain/3/data/private")


def test_guest_rm_needs_write(world):
    _, _, g3, _ = world
    with pytest.raises(PermissionDenied):
        g3.rm("name")
    g3.write("data/tmp/x", "1")
    g3.rm("data/tmp")
    assert g3.read_or("data/tmp") is None


def test_guest_mkdir(world):
    _, _, g3, _ = world
    g3.mkdir("data/newdir")
    assert g3.ls("data") == ["newdir"]
    with pytest.raises(PermissionDenied):
        g3.mkdir("device")  # exists, no write permission


# --------------------------------------------------------------------------------------------
# Watches


def test_watch_fires_on_registration_with_path_as_given(world):
    _, dom0, g3, _ = world
    g3.watch("data", "rel")
    assert g3.read_watch(0) == WatchEvent("data", "rel")
    g3.write("data/k", "1")
    assert g3.read_watch(0) == WatchEvent("data/k", "rel")  # relative watch -> relative path
    g3.watch("/local/domain/3/data", "abs")
    assert events(g3) == [WatchEvent("/local/domain/3/data", "abs")]
    g3.write("data/k", "2")
    assert set(events(g3)) == {WatchEvent("data/k", "rel"),
                               WatchEvent("/local/domain/3/data/k", "abs")}


def test_watch_on_missing_node_and_parents_do_not_fire(server):
    with server.connect() as c:
        c.watch("/a/b/c", "t")
        assert events(c) == [WatchEvent("/a/b/c", "t")]
        c.write("/a/b", "parent only")
        assert events(c) == []
        c.write("/a/b/c/d", "below")  # creates c implicitly; event names the leaf
        assert events(c) == [WatchEvent("/a/b/c/d", "t")]


def test_watch_root_sees_everything_readable(world):
    _, dom0, g3, _ = world
    dom0.watch("/", "all")
    events(dom0)
    g3.write("data/x", "1")
    dom0.write("/elsewhere", "1")
    assert events(dom0) == [WatchEvent("/local/domain/3/data/x", "all"),
                            WatchEvent("/elsewhere", "all")]


def test_watch_events_follow_read_permission_changes(world):
    _, dom0, g3, _ = world
    g3.watch("/local/domain/3", "home")
    events(g3)
    dom0.write("/local/domain/3/secret", "x")  # inherits "n0 r3": readable, fires
    dom0.set_perms("/local/domain/3/secret", 0, "n")  # readable before the change: fires
    assert events(g3) == [WatchEvent("/local/domain/3/secret", "home")] * 2
    dom0.write("/local/domain/3/secret", "y")  # now unreadable for the guest
    assert events(g3) == []


def test_watch_events_hidden_for_unreadable_nodes(world):
    _, dom0, g3, _ = world
    dom0.write("/local/domain/3/hidden", "x")
    dom0.set_perms("/local/domain/3/hidden", 0, "n")
    g3.watch("/local/domain/3", "home")
    assert events(g3) == [WatchEvent("/local/domain/3", "home")]
    dom0.write("/local/domain/3/hidden", "y")
    dom0.write("/local/domain/3/hidden/deeper", "z")
    assert events(g3) == []
    dom0.write("/local/domain/3/visible", "v")
    assert events(g3) == [WatchEvent("/local/domain/3/visible", "home")]


def test_rm_fires_parent_and_exact_descendant_watches(server):
    with server.connect() as c:
        c.write("/r/a/b", "1")
        c.write("/r/sibling", "1")
        c.watch("/r/a/b", "exact")
        c.watch("/r/a/b/none", "below-missing")
        c.watch("/r", "top")
        c.watch("/r/sibling", "sib")
        events(c)
        c.rm("/r/a")
        got = events(c)
        assert WatchEvent("/r/a", "top") in got
        assert WatchEvent("/r/a/b", "exact") in got
        assert all(ev.token not in ("sib", "below-missing") for ev in got)


def test_set_perms_fires_watch(server):
    with server.connect() as c:
        c.write("/p", "1")
        c.watch("/p", "t")
        events(c)
        c.set_perms("/p", 0, "r")
        assert events(c) == [WatchEvent("/p", "t")]


def test_mkdir_existing_does_not_fire(server):
    with server.connect() as c:
        c.mkdir("/m")
        c.watch("/m", "t")
        events(c)
        c.mkdir("/m")
        assert events(c) == []


def test_duplicate_watch_and_unknown_unwatch(server):
    with server.connect() as c:
        c.watch("/w", "t")
        with pytest.raises(XenstoreError) as ei:
            c.watch("/w", "t")
        assert ei.value.errno == errno.EEXIST
        c.watch("/w", "t2")  # other token is fine
        with pytest.raises(NoSuchKey):
            c.unwatch("/w", "nope")
        c.unwatch("/w", "t")
        c.unwatch("/w", "t2")


def test_unwatch_keeps_already_queued_events(server):
    # libxenstore without XS_UNWATCH_FILTER (xs_open(0)) delivers stale events
    with server.connect() as c:
        c.watch("/s", "t")
        c.write("/s/x", "1")
        c.unwatch("/s", "t")
        assert events(c) == [WatchEvent("/s", "t"), WatchEvent("/s/x", "t")]
        c.write("/s/x", "2")
        assert events(c) == []


def test_watches_are_per_connection_and_dropped_on_close(server):
    a, b = server.connect(), server.connect()
    a.watch("/z", "a")
    events(a)
    a.close()
    b.write("/z", "1")  # must not fail or deliver to a closed connection
    assert events(b) == []
    b.close()


def test_special_watches(world):
    srv, dom0, g3, _ = world
    dom0.watch("@introduceDomain", "intro")
    dom0.watch("@releaseDomain", "rel")
    g3.watch("@releaseDomain", "g-rel")
    assert events(dom0) == [WatchEvent("@introduceDomain", "intro"),
                            WatchEvent("@releaseDomain", "rel")]
    assert events(g3) == [WatchEvent("@releaseDomain", "g-rel")]  # registration always

    srv.create_domain(9)
    assert events(dom0) == [WatchEvent("@introduceDomain", "intro")]
    srv.destroy_domain(9)
    assert events(dom0) == [WatchEvent("@releaseDomain", "rel")]
    assert srv.dump("/local/domain/9") == {}
    assert events(g3) == []  # special nodes are n0 by default: guests see nothing
    srv.fire_introduce_domain()
    srv.fire_release_domain()
    assert events(dom0) == [WatchEvent("@introduceDomain", "intro"),
                            WatchEvent("@releaseDomain", "rel")]
    dom0.write("/local/domain/3/data/x", "1")  # normal writes don't hit special watches
    assert events(dom0) == []


def test_introduce_and_release_through_the_client(world):
    srv, dom0, g3, _ = world
    dom0.watch("@introduceDomain", "i")
    dom0.watch("@releaseDomain", "r")
    events(dom0)
    assert not dom0.is_domain_introduced(11)
    dom0.introduce_domain(11, mfn=0x1234, evtchn=5)
    assert dom0.is_domain_introduced(11)
    assert events(dom0) == [WatchEvent("@introduceDomain", "i")]
    dom0.introduce_domain(11, mfn=0x1234, evtchn=5)  # already introduced: no new event
    assert events(dom0) == []
    dom0.release_domain(11)
    assert events(dom0) == [WatchEvent("@releaseDomain", "r")]
    with pytest.raises(NoSuchKey):
        dom0.release_domain(11)
    with pytest.raises(PermissionDenied):
        g3.introduce_domain(12, 1, 1)
    with pytest.raises(PermissionDenied):
        g3.is_domain_introduced(3)


def test_fileno_is_a_pipe_readable_only_while_events_pending(server):
    with server.connect() as c:
        fd = c.fileno()
        assert c.fileno() == fd
        assert select.select([fd], [], [], 0)[0] == []
        c.watch("/f", "t")
        c.write("/f/1", "x")
        assert select.select([fd], [], [], 0)[0] == [fd]
        assert c.read_watch(0) == WatchEvent("/f", "t")
        assert select.select([fd], [], [], 0)[0] == [fd]  # one more pending
        assert c.read_watch(0) == WatchEvent("/f/1", "t")
        assert select.select([fd], [], [], 0)[0] == []
        assert c.read_watch(0) is None


def test_fileno_created_after_events_is_readable(server):
    with server.connect() as c:
        c.watch("/late", "t")
        fd = c.fileno()
        assert select.select([fd], [], [], 0)[0] == [fd]


def test_fileno_works_with_selectors_across_threads(server):
    watcher, writer = server.connect(), server.connect()
    try:
        watcher.watch("/sel", "t")
        events(watcher)
        sel = selectors.DefaultSelector()
        sel.register(watcher.fileno(), selectors.EVENT_READ)
        timer = threading.Timer(0.05, lambda: writer.write("/sel/x", "1"))
        timer.start()
        ready = sel.select(timeout=5)
        timer.join()
        assert ready
        assert watcher.read_watch(0) == WatchEvent("/sel/x", "t")
        sel.close()
    finally:
        watcher.close()
        writer.close()


def test_read_watch_timeout(server):
    with server.connect() as c:
        c.watch("/t", "t")
        events(c)
        t0 = time.monotonic()
        assert c.read_watch(timeout=0.1) is None
        assert 0.09 <= time.monotonic() - t0 < 2


def test_read_watch_blocks_until_event(server):
    watcher, writer = server.connect(), server.connect()
    try:
        watcher.watch("/blk", "t")
        events(watcher)
        threading.Timer(0.05, lambda: writer.write("/blk", "1")).start()
        assert watcher.read_watch() == WatchEvent("/blk", "t")
    finally:
        watcher.close()
        writer.close()


def test_pipe_closed_on_close(server):
    c = server.connect()
    fd = c.fileno()
    c.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# --------------------------------------------------------------------------------------------
# Transactions


def test_transaction_isolation(server):
    a, b = server.connect(), server.connect()
    try:
        with a.transaction() as t:
            t.write("/iso/x", "1")
            assert t.read("/iso/x") == b"1"
            assert b.read_or("/iso/x") is None  # not visible before commit
            assert t.ls("/iso") == ["x"]
        assert b.read("/iso/x") == b"1"
    finally:
        a.close()
        b.close()


def test_transaction_conflict_on_node_created_outside(server):
    a, b = server.connect(), server.connect()
    try:
        t = a.transaction()
        assert t.read_or("/c/new") is None
        b.write("/c/new", "outside")
        t.write("/c/other", "1")
        with pytest.raises(TransactionConflict) as ei:
            t.commit()
        assert ei.value.errno == errno.EAGAIN
        assert a.read_or("/c/other") is None  # nothing applied
    finally:
        a.close()
        b.close()


def test_transaction_conflict_on_removed_node(server):
    a, b = server.connect(), server.connect()
    try:
        a.write("/d/k", "1")
        t = a.transaction()
        t.read("/d/k")
        b.rm("/d/k")
        with pytest.raises(TransactionConflict):
            t.commit()
    finally:
        a.close()
        b.close()


def test_disjoint_transactions_do_not_conflict(server):
    a, b = server.connect(), server.connect()
    try:
        a.write("/j/x", "0")
        a.write("/j/y", "0")
        ta, tb = a.transaction(), b.transaction()
        ta.write("/j/x", "a")
        tb.write("/j/y", "b")
        ta.commit()
        tb.commit()
        assert a.read("/j/x") == b"a" and a.read("/j/y") == b"b"
    finally:
        a.close()
        b.close()


def test_transaction_watches_fire_at_commit(server):
    a, w = server.connect(), server.connect()
    try:
        w.watch("/tw", "t")
        events(w)
        t = a.transaction()
        t.write("/tw/1", "x")
        t.write("/tw/2", "y")
        assert events(w) == []
        t.commit()
        assert events(w) == [WatchEvent("/tw/1", "t"), WatchEvent("/tw/2", "t")]
        t = a.transaction()
        t.write("/tw/3", "z")
        t.abort()
        assert events(w) == []
    finally:
        a.close()
        w.close()


def test_transaction_rm_and_permissions(world):
    _, dom0, g3, _ = world
    g3.write("data/t/x", "1")
    with g3.transaction() as t:
        t.rm("data/t")
        assert t.read_or("data/t/x") is None
        assert g3.read("data/t/x") == b"1"
        with pytest.raises(PermissionDenied):
            t.write("/local/domain/3/nope", "x")
    assert g3.read_or("data/t") is None


def test_run_transaction_gives_up_after_retries(server):
    a, b = server.connect(), server.connect()
    try:
        a.write("/rt", "0")
        calls = []

        def always_conflicts(t):
            t.read("/rt")
            calls.append(1)
            b.write("/rt", str(len(calls)))

        with pytest.raises(TransactionConflict):
            a.run_transaction(always_conflicts, retries=2, backoff=0)
        assert len(calls) == 3
    finally:
        a.close()
        b.close()


def test_run_transaction_propagates_other_errors_and_aborts(server):
    with server.connect() as c:
        def fn(t):
            t.write("/abort/x", "1")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            c.run_transaction(fn)
        assert c.read_or("/abort/x") is None


def test_unknown_transaction_and_ended_transaction(server):
    with server.connect() as c:
        t = c.transaction()
        t.commit()
        with pytest.raises(XenstoreError, match="already ended"):
            t.commit()
        with pytest.raises(XenstoreError, match="already ended"):
            t.write("/x", "1")


def test_transactions_dropped_on_close(server):
    c = server.connect()
    t = c.transaction()
    t.write("/gone", "1")
    c.close()
    with server.connect() as d:
        assert d.read_or("/gone") is None


# --------------------------------------------------------------------------------------------
# Lifecycle and errors


def test_not_open_and_reopen(server):
    c = FakeXenstore(server)
    with pytest.raises(XenstoreError, match="not open"):
        c.read("/")
    c.open()
    c.open()  # idempotent
    assert c.is_open
    c.close()
    c.close()
    assert not c.is_open
    assert "closed" in repr(c)


def test_standalone_fake_has_its_own_server():
    with FakeXenstore() as c:
        c.write("/a", "1")
        assert c.server.dump("/a") == {"/a": b"1"}


def test_errors_are_xenpbr_errors(server):
    with server.connect() as c:
        with pytest.raises(XenpbrError):
            c.read("/missing")


def test_concurrent_writers_are_safe(server):
    clients = [server.connect() for _ in range(4)]
    try:
        def work(i, c):
            for n in range(50):
                c.run_transaction(lambda t: t.write(f"/cc/{i}/{n}", str(n)), backoff=0)

        threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(clients[0].ls("/cc")) == ["0", "1", "2", "3"]
        assert all(len(clients[0].ls(f"/cc/{i}")) == 50 for i in range(4))
    finally:
        for c in clients:
            c.close()


# --------------------------------------------------------------------------------------------
# xenpbr_lab/scripts/xenstore_bench.py, run against the fake (the real candidates need dom0)


def _load_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "xenpbr_lab" / "scripts" / "xenstore_bench.py"
    spec = importlib.util.spec_from_file_location("xenstore_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_script_runs_against_fake_and_reports_unavailable(capsys, tmp_path):
    import json

    bench = _load_bench()
    rc = bench.main(["--candidates", "fake,lowlevel,pyxs", "--iterations", "8", "--warmup", "1",
                     "--xen-python-dir", str(tmp_path / "no-xen-python"), "--json",
                     "--contract", "--contract-target", "fake"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    fake = report["candidates"]["fake"]
    assert fake["status"] == "ok"
    assert set(fake["results"]) == set(bench.OPS)
    for stats in fake["results"].values():
        assert stats["n"] >= 1 and 0 < stats["median_us"] <= stats["p90_us"] + 1e-9
    for name in ("lowlevel", "pyxs"):
        assert report["candidates"][name]["status"] == "unavailable"
        assert report["candidates"][name]["reason"]
    assert report["contract"] and all(r["passed"] for r in report["contract"])


def test_bench_table_output(capsys):
    bench = _load_bench()
    assert bench.main(["--candidates", "fake", "--iterations", "4", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "median us" in out and "watch_roundtrip" in out and "transaction_10_writes" in out
