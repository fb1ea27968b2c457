"""Behaviour every xenpbr xenstore client must show, real or fake.

Each ``check_*`` function takes ``make_client``: a zero-argument callable returning a new,
**opened, dom0** client connected to the *same* store on every call (so two calls give two
handles that see each other's writes, like two processes in dom0). Checks work below a
fresh ``/xenpbr-contract/<random>`` prefix and remove it afterwards, so they can run
against a real xenstored in the lab:

    from xenpbr.xenstore import XenstoreClient
    import xenstore_contract as contract
    @pytest.mark.lab
    @pytest.mark.parametrize("check", contract.CONTRACT_CHECKS, ids=contract.check_id)
    def test_real(check):
        check(lambda: XenstoreClient().open())

or, without pytest, ``contract.run_contract(factory)``.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Iterator

from xenpbr.xenstore import (
    Access,
    InvalidPath,
    NoSuchKey,
    NodePerms,
    Perm,
    TransactionConflict,
    ValueTooLarge,
    WatchEvent,
    XenstoreError,
)

Factory = Callable[[], Any]
WAIT = 5.0  # seconds to wait for a watch event that must come


@contextlib.contextmanager
def scratch(make_client: Factory) -> Iterator[tuple[Any, str]]:
    """An open client and a unique, removed-afterwards base path."""
    c = make_client()
    base = f"/xenpbr-contract/{uuid.uuid4().hex[:12]}"
    try:
        c.mkdir(base)
        yield c, base
    finally:
        with contextlib.suppress(XenstoreError):
            c.rm(base)
        with contextlib.suppress(XenstoreError):
            if not c.ls("/xenpbr-contract"):
                c.rm("/xenpbr-contract")
        c.close()


def _drain(c: Any) -> list[WatchEvent]:
    out = []
    while (ev := c.read_watch(timeout=0)) is not None:
        out.append(ev)
    return out


def _wait_for(c: Any, want: WatchEvent, timeout: float = WAIT) -> list[WatchEvent]:
    """Read events until ``want`` arrives; return everything read (fails on timeout)."""
    seen: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while True:
        ev = c.read_watch(timeout=max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise AssertionError(f"watch event {want} not received within {timeout}s; "
                                 f"got {seen}")
        seen.append(ev)
        if ev == want:
            return seen


# --------------------------------------------------------------------------------------------


def check_read_write_roundtrip(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        c.write(f"{base}/s", "héllo")
        assert c.read(f"{base}/s") == "héllo".encode()
        c.write(f"{base}/b", b"\x00\x01binary\xff")
        assert c.read(f"{base}/b") == b"\x00\x01binary\xff"
        c.write(f"{base}/e", b"")
        assert c.read(f"{base}/e") == b""
        c.write(f"{base}/s", "again")
        assert c.read(f"{base}/s") == b"again"


def check_missing_key(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        path = f"{base}/nope"
        try:
            c.read(path)
        except NoSuchKey as e:
            assert path in str(e)
            assert e.path == path
        else:
            raise AssertionError("read of a missing key did not raise NoSuchKey")
        assert c.read_or(path) is None
        assert c.read_or(path, b"dflt") == b"dflt"


def check_implicit_parents_and_ls(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        c.write(f"{base}/a/b/c", "1")
        assert c.read(f"{base}/a") == b""
        assert c.read(f"{base}/a/b") == b""
        c.write(f"{base}/a/x", "2")
        assert sorted(c.ls(f"{base}/a")) == ["b", "x"]
        assert c.ls(f"{base}/a/b/c") == []
        try:
            c.ls(f"{base}/missing")
        except NoSuchKey:
            pass
        else:
            raise AssertionError("ls of a missing node did not raise NoSuchKey")


def check_mkdir(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        c.mkdir(f"{base}/d/e")
        assert c.read(f"{base}/d/e") == b""
        c.write(f"{base}/d/e", "v")
        c.mkdir(f"{base}/d/e")  # existing: no-op, value kept
        assert c.read(f"{base}/d/e") == b"v"


def check_rm(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        c.write(f"{base}/t/a/b", "1")
        c.write(f"{base}/t/c", "2")
        c.rm(f"{base}/t")
        assert c.read_or(f"{base}/t") is None
        assert c.read_or(f"{base}/t/a/b") is None
        assert "t" not in c.ls(base)
        c.rm(f"{base}/t")  # missing node, parent exists: fine
        try:
            c.rm(f"{base}/no/such")
        except NoSuchKey:
            pass
        else:
            raise AssertionError("rm below a missing parent did not raise NoSuchKey")


def check_permissions(make_client: Factory) -> None:
    # Only domid 0 is used: xenstored ignores ACL entries for domains that do not exist
    # and refuses an owner that does not exist, and in the lab only dom0 surely exists.
    with scratch(make_client) as (c, base):
        p = f"{base}/perm"
        c.write(p, "x")
        assert c.get_perms(p).owner == 0
        c.set_perms(p, 0, Access.READ, acl=[Perm(0, Access.WRITE)])
        got = c.get_perms(p)
        assert got == NodePerms(0, Access.READ, (Perm(0, Access.WRITE),)), got
        c.set_perms(p, 0, "b")
        assert c.get_perms(p) == NodePerms(0, Access.BOTH)
        c.write(f"{p}/child", "y")  # a new node inherits its parent's permissions
        assert c.get_perms(f"{p}/child") == NodePerms(0, Access.BOTH)
        assert c.read(p) == b"x"


def check_domain_path(make_client: Factory) -> None:
    with scratch(make_client) as (c, _):
        assert c.get_domain_path(0) == "/local/domain/0"
        assert c.get_domain_path(7) == "/local/domain/7"


def check_validation_before_io(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        for bad in ("", f"{base}//x", f"{base}/x/", f"{base}/x.y", "@introduceDomain"):
            try:
                c.write(bad, "v")
            except InvalidPath as e:
                assert isinstance(e, ValueError)
            else:
                raise AssertionError(f"write to {bad!r} was not rejected")
        p = f"{base}/big"
        limit = 4096 - len(p) - 1
        c.write(p, b"x" * limit)
        assert len(c.read(p)) == limit
        try:
            c.write(p, b"x" * (limit + 1))
        except ValueTooLarge:
            pass
        else:
            raise AssertionError("oversized value was not rejected")


def check_transaction_commit_and_abort(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        with c.transaction() as t:
            t.write(f"{base}/tx/a", "1")
            t.write(f"{base}/tx/b", "2")
            assert t.read(f"{base}/tx/a") == b"1"
        assert c.read(f"{base}/tx/a") == b"1" and c.read(f"{base}/tx/b") == b"2"

        t = c.transaction()
        t.write(f"{base}/tx/a", "changed")
        t.abort()
        assert c.read(f"{base}/tx/a") == b"1"

        class Boom(Exception):
            pass

        try:
            with c.transaction() as t:
                t.write(f"{base}/tx/a", "changed")
                raise Boom
        except Boom:
            pass
        assert c.read(f"{base}/tx/a") == b"1"
        try:
            t.read(f"{base}/tx/a")
        except XenstoreError:
            pass
        else:
            raise AssertionError("an ended transaction still accepted operations")


def check_transaction_conflict_and_retry(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        other = make_client()
        try:
            key = f"{base}/counter"
            c.write(key, "0")
            t = c.transaction()
            n = int(t.read(key))
            other.write(key, "100")  # outside change of a node t read
            t.write(key, str(n + 1))
            try:
                t.commit()
            except TransactionConflict:
                pass
            else:
                raise AssertionError("conflicting commit did not raise TransactionConflict")
            assert c.read(key) == b"100"

            calls = []

            def bump(tx: Any) -> int:
                v = int(tx.read(key))
                if not calls:
                    other.write(key, str(v + 10))  # provoke exactly one conflict
                calls.append(v)
                tx.write(key, str(v + 1))
                return v + 1

            assert c.run_transaction(bump, retries=3) == 111
            assert len(calls) == 2
            assert c.read(key) == b"111"
        finally:
            other.close()


def check_watch_basics(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        w = f"{base}/w"
        c.watch(w, "tok")
        _wait_for(c, WatchEvent(w, "tok"))  # fired once on registration
        assert c.read_watch(timeout=0.05) is None
        c.write(f"{w}/child", "1")
        _wait_for(c, WatchEvent(f"{w}/child", "tok"))
        c.write(f"{base}/elsewhere", "1")  # not under the watch
        c.write(w, "self")
        assert _wait_for(c, WatchEvent(w, "tok"))[0] == WatchEvent(w, "tok")
        _drain(c)
        c.unwatch(w, "tok")
        c.write(f"{w}/child", "2")
        assert c.read_watch(timeout=0.2) is None


def check_watch_fileno_select(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        fd = c.fileno()
        c.watch(base, "sel")
        r, _, _ = select.select([fd], [], [], WAIT)
        assert r, "fileno did not become readable for the registration event"
        assert c.read_watch(timeout=0) == WatchEvent(base, "sel")
        assert _drain(c) == []
        c.write(f"{base}/k", "v")
        r, _, _ = select.select([fd], [], [], WAIT)
        assert r, "fileno did not become readable after a write"
        assert _wait_for(c, WatchEvent(f"{base}/k", "sel"), timeout=0.5)


def check_watch_round_trip_between_handles(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        watcher = make_client()
        try:
            watcher.watch(f"{base}/rt", "rt")
            _wait_for(watcher, WatchEvent(f"{base}/rt", "rt"))
            result: list[Any] = []
            t = threading.Thread(target=lambda: result.append(watcher.read_watch(timeout=WAIT)))
            t.start()
            time.sleep(0.05)
            c.write(f"{base}/rt/ping", "1")
            t.join(WAIT + 1)
            assert result == [WatchEvent(f"{base}/rt/ping", "rt")], result
        finally:
            watcher.close()


def check_rm_fires_watches(make_client: Factory) -> None:
    with scratch(make_client) as (c, base):
        c.write(f"{base}/r/deep/leaf", "1")
        c.watch(f"{base}/r/deep/leaf", "leaf")
        c.watch(base, "top")
        _wait_for(c, WatchEvent(f"{base}/r/deep/leaf", "leaf"))
        _wait_for(c, WatchEvent(base, "top"))
        _drain(c)
        c.rm(f"{base}/r")
        want = {WatchEvent(f"{base}/r", "top"), WatchEvent(f"{base}/r/deep/leaf", "leaf")}
        got: set[WatchEvent] = set()
        deadline = time.monotonic() + WAIT
        while not want <= got and time.monotonic() < deadline:
            ev = c.read_watch(timeout=max(0.0, deadline - time.monotonic()))
            if ev is not None:
                got.add(ev)
        assert want <= got, got


def check_open_close_idempotent(make_client: Factory) -> None:
    c = make_client()
    c.open()
    c.close()
    c.close()
    try:
        c.read("/")
    except XenstoreError:
        pass
    else:
        raise AssertionError("a closed client still answered")
    with c:
        assert isinstance(c.read("/"), bytes)
    assert not c.is_open


CONTRACT_CHECKS = [
    check_read_write_roundtrip,
    check_missing_key,
    check_implicit_parents_and_ls,
    check_mkdir,
    check_rm,
    check_permissions,
    check_domain_path,
    check_validation_before_io,
    check_transaction_commit_and_abort,
    check_transaction_conflict_and_retry,
    check_watch_basics,
    check_watch_fileno_select,
    check_watch_round_trip_between_handles,
    check_rm_fires_watches,
    check_open_close_idempotent,
]


def check_id(check: Callable[..., Any]) -> str:
    return check.__name__.removeprefix("check_")


def run_contract(make_client: Factory) -> list[tuple[str, bool, str]]:
    """Run every check; return ``(name, passed, error text)`` rows (for lab scripts)."""
    rows = []
    for check in CONTRACT_CHECKS:
        try:
            check(make_client)
        except Exception:  # report, keep going
            rows.append((check_id(check), False, traceback.format_exc(limit=3)))
        else:
            rows.append((check_id(check), True, ""))
    return rows
