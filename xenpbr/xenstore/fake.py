"""In-memory xenstore for unit tests: :class:`FakeXenstoreServer` plays xenstored,
:class:`FakeXenstore` is the client.

:class:`FakeXenstore` *is* :class:`~xenpbr.xenstore.client.XenstoreClient` -- only its
connection is in-memory instead of libxenstore -- so validation, exceptions and the public
interface are identical by construction. The server models what xenpbr relies on from
Xen 4.17's C xenstored:

* a tree of nodes; ``write`` creates missing parents (which inherit their parent's
  permissions); ``rm`` is recursive and succeeds for a missing node whose parent exists;
  ``mkdir`` of an existing node is a no-op;
* relative paths resolve against ``/local/domain/<domid>`` of the connection;
* permissions: dom0 bypasses them; the owner has full access; other domains get the
  first matching ACL entry, else the "others" access; a new node created by an
  unprivileged domain is owned by it; only the owner (or dom0) may ``set_perms`` and
  only dom0 may change the owner (``EPERM``); a missing node reports ``ENOENT`` only if
  the nearest existing ancestor grants the requested access, else ``EACCES``; ACL
  entries for domains that do not exist are ignored and ``set_perms`` with a
  non-existent owner fails with ``ENOENT`` (xenstored's ``XS_PERM_IGNORE``); a domain
  exists once created, introduced or connected, until destroyed;
* watches fire for the watched node and anything below it, once immediately on
  registration (with the path as registered), only for nodes the watcher may read, with
  relative paths for relative watches; ``rm`` also fires watches set exactly on removed
  descendants; duplicate ``(path, token)`` gives ``EEXIST``, unknown unwatch ``ENOENT``;
* ``@introduceDomain`` / ``@releaseDomain`` fire on ``introduce_domain`` /
  ``release_domain`` (dom0 only) and via :meth:`FakeXenstoreServer.create_domain` /
  :meth:`FakeXenstoreServer.destroy_domain`; they are delivered to dom0 watchers
  only (4.17 default permissions of the special nodes); the registration event is
  always delivered;
* transactions: first access copies a node into the transaction; ending it with commit
  fails with ``EAGAIN`` if any node the transaction read or wrote (including nodes it
  found missing) was changed, created or removed outside meanwhile; watches for its
  changes fire at commit;
* :meth:`~FakeXenstore.fileno` is the read end of an ``os.pipe`` that is readable while
  watch events are queued, exactly like libxenstore's watch pipe.

Not modelled: quotas (node size, number of nodes/watches/transactions), ``XS_UNWATCH_FILTER``,
permissions on special nodes beyond the default, ``set_target``, transaction limits.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Iterable

from xenpbr.xenstore.client import XenstoreClient
from xenpbr.xenstore.paths import (
    INTRODUCE_DOMAIN,
    RELEASE_DOMAIN,
    XENSTORE_PAYLOAD_MAX,
    canonical_path,
    domain_home,
    validate_domid,
    validate_path,
)
from xenpbr.xenstore.errors import InvalidPath

__all__ = ["FakeXenstoreServer", "FakeXenstore", "DEFAULT_GUEST_WRITABLE"]

_READ, _WRITE, _OWNER = 0x1, 0x2, 0x8

#: Subdirectories of ``/local/domain/<id>`` that libxl makes guest-owned.
DEFAULT_GUEST_WRITABLE = ("data", "drivers", "feature", "attr", "error", "control/shutdown")

Perms = list  # list[tuple[int, int]]: [(owner, others_bits), (domid, bits), ...]


def _err(code: int, what: str = "") -> OSError:
    msg = os.strerror(code) + (f": {what}" if what else "")
    return OSError(code, msg)


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def _is_subpath(parent: str, child: str) -> bool:
    """``xs_path_is_subpath``: child equals parent or lies below it."""
    if parent == "/":
        return child.startswith("/")
    return child == parent or child.startswith(parent + "/")


def _perm_bits(domid: int, perms: Perms, known: "set[int] | None" = None) -> int:
    """xenstored's ``perm_for_conn`` (no target domains). ACL entries naming a domain not
    in ``known`` are skipped, like xenstored's ``XS_PERM_IGNORE`` for dead domains."""
    if domid == 0 or perms[0][0] == domid:
        return _READ | _WRITE | _OWNER
    for d, bits in perms[1:]:
        if d == domid and (known is None or d in known):
            return bits & (_READ | _WRITE)
    return perms[0][1] & (_READ | _WRITE)


@dataclass
class _Node:
    value: bytes
    perms: Perms
    children: list[str] = field(default_factory=list)
    gen: int = 0

    def copy(self) -> "_Node":
        return _Node(self.value, list(self.perms), list(self.children), self.gen)


@dataclass
class _Watch:
    path: str  # canonical
    token: str
    registered_as: str
    relative: bool


class _GlobalView:
    """Direct access to the committed tree; every ``put`` bumps the node's generation."""

    def __init__(self, server: "FakeXenstoreServer") -> None:
        self._s = server
        self.events: list | None = None  # None: fire watches immediately

    def get(self, path: str) -> _Node | None:
        node = self._s._nodes.get(path)
        return node.copy() if node else None

    def put(self, path: str, node: _Node) -> None:
        node.gen = next(self._s._gens)
        self._s._nodes[path] = node

    def delete(self, path: str) -> None:
        self._s._nodes.pop(path, None)


class _TxView:
    """Copy-on-first-access overlay; remembers the generation each node had when first
    touched so ``commit`` can detect outside changes."""

    def __init__(self, server: "FakeXenstoreServer") -> None:
        self._s = server
        self.local: dict[str, _Node | None] = {}
        self.accessed: dict[str, int | None] = {}
        self.dirty: set[str] = set()
        self.events: list[tuple[str, tuple[Perms, ...], bool]] = []  # fired at commit

    def get(self, path: str) -> _Node | None:
        if path not in self.local:
            g = self._s._nodes.get(path)
            self.accessed[path] = g.gen if g else None
            self.local[path] = g.copy() if g else None
        node = self.local[path]
        return node.copy() if node else None

    def put(self, path: str, node: _Node) -> None:
        self.get(path)
        self.local[path] = node
        self.dirty.add(path)

    def delete(self, path: str) -> None:
        self.get(path)
        self.local[path] = None
        self.dirty.add(path)


#: Where a node operation reads and writes: the committed tree or a transaction's overlay.
_View = _GlobalView | _TxView


class _FakeConnection:
    """Implements :class:`xenpbr.xenstore.client.XenstoreConnection` against a
    :class:`FakeXenstoreServer`; raises :class:`OSError` with xenstored's errno."""

    def __init__(self, server: "FakeXenstoreServer", domid: int, register: bool = True) -> None:
        self.server = server
        self.domid = domid
        self.home = domain_home(domid)
        self.watches: list[_Watch] = []
        self.events: collections.deque[tuple[str, str]] = collections.deque()
        self.txs: dict[int, _TxView] = {}
        self._pipe: tuple[int, int] | None = None
        self.closed = False
        if register:
            with server._lock:
                server._conns.append(self)
                server._known.add(domid)

    # -- plumbing -------------------------------------------------------------------------

    def _canon(self, path: bytes, allow_special: bool = False) -> str:
        if self.closed:
            raise _err(errno.EBADF, "connection closed")
        try:
            p = validate_path(path.decode("utf-8", "surrogateescape"),
                              allow_special=allow_special)
        except InvalidPath as e:
            raise _err(errno.EINVAL, str(e)) from None
        return canonical_path(p, self.domid)

    def _view(self, tx: int) -> _GlobalView | _TxView:
        if tx == 0:
            return self.server._global
        try:
            return self.txs[tx]
        except KeyError:
            raise _err(errno.ENOENT, f"no transaction {tx}") from None

    def _push_event(self, path: str, token: str) -> None:
        # caller holds the server lock
        was_empty = not self.events
        self.events.append((path, token))
        if was_empty and self._pipe is not None:
            os.write(self._pipe[1], b"!")

    # -- XenstoreConnection -----------------------------------------------------------------

    def close(self) -> None:
        with self.server._lock:
            if self.closed:
                return
            self.closed = True
            self.watches.clear()
            self.txs.clear()
            self.events.clear()
            if self in self.server._conns:
                self.server._conns.remove(self)
            if self._pipe is not None:
                for fd in self._pipe:
                    os.close(fd)
                self._pipe = None

    def read(self, tx: int, path: bytes) -> bytes:
        with self.server._lock:
            p = self._canon(path)
            return self.server._check(self, self._view(tx), p, _READ).value

    def write(self, tx: int, path: bytes, data: bytes) -> None:
        if len(path) + 1 + len(data) > XENSTORE_PAYLOAD_MAX:
            raise _err(errno.E2BIG)  # libxenstore's own check in xs_talkv
        with self.server._lock:
            p = self._canon(path)
            self.server._write(self, self._view(tx), p, bytes(data))

    def mkdir(self, tx: int, path: bytes) -> None:
        with self.server._lock:
            p = self._canon(path)
            self.server._mkdir(self, self._view(tx), p)

    def rm(self, tx: int, path: bytes) -> None:
        with self.server._lock:
            p = self._canon(path)
            self.server._rm(self, self._view(tx), p)

    def directory(self, tx: int, path: bytes) -> list[bytes]:
        with self.server._lock:
            p = self._canon(path)
            node = self.server._check(self, self._view(tx), p, _READ)
            return [c.encode() for c in node.children]

    def get_permissions(self, tx: int, path: bytes) -> list[tuple[int, int]]:
        with self.server._lock:
            p = self._canon(path)
            return list(self.server._check(self, self._view(tx), p, _READ).perms)

    def set_permissions(self, tx: int, path: bytes, perms: list[tuple[int, int]]) -> None:
        with self.server._lock:
            p = self._canon(path)
            self.server._set_perms(self, self._view(tx), p, [tuple(x) for x in perms])

    def watch(self, path: bytes, token: bytes) -> None:
        with self.server._lock:
            p = self._canon(path, allow_special=True)
            tok = token.decode("utf-8", "surrogateescape")
            if any(w.path == p and w.token == tok for w in self.watches):
                raise _err(errno.EEXIST, f"watch {p} {tok} exists")
            as_given = path.decode("utf-8", "surrogateescape")
            relative = not (as_given.startswith("/") or as_given.startswith("@"))
            self.watches.append(_Watch(p, tok, as_given, relative))
            # xenstored: "We fire once up front: simplifies clients and restart."
            self._push_event(as_given, tok)

    def unwatch(self, path: bytes, token: bytes) -> None:
        with self.server._lock:
            p = self._canon(path, allow_special=True)
            tok = token.decode("utf-8", "surrogateescape")
            for i, w in enumerate(self.watches):
                if w.path == p and w.token == tok:
                    del self.watches[i]
                    return
            raise _err(errno.ENOENT, f"no watch {p} {tok}")

    def fileno(self) -> int:
        with self.server._lock:
            if self.closed:
                raise _err(errno.EBADF, "connection closed")
            if self._pipe is None:
                r, w = os.pipe()
                for fd in (r, w):
                    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
                    fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
                    os.set_inheritable(fd, False)
                self._pipe = (r, w)
                if self.events:
                    os.write(w, b"!")
            return self._pipe[0]

    def check_watch(self) -> tuple[bytes, bytes] | None:
        with self.server._lock:
            if self.closed:
                raise _err(errno.EBADF, "connection closed")
            if not self.events:
                return None
            path, token = self.events.popleft()
            if not self.events and self._pipe is not None:
                try:
                    os.read(self._pipe[0], 1)
                except BlockingIOError:  # pragma: no cover - invariant says a byte is there
                    pass
            return path.encode("utf-8", "surrogateescape"), token.encode("utf-8",
                                                                         "surrogateescape")

    def transaction_start(self) -> int:
        with self.server._lock:
            if self.closed:
                raise _err(errno.EBADF, "connection closed")
            tx = next(self.server._tx_ids)
            self.txs[tx] = _TxView(self.server)
            return tx

    def transaction_end(self, tx: int, abort: bool) -> None:
        with self.server._lock:
            if self.closed:
                raise _err(errno.EBADF, "connection closed")
            view = self.txs.pop(tx, None)
            if view is None:
                raise _err(errno.ENOENT, f"no transaction {tx}")
            if not abort:
                self.server._commit(view)

    def get_domain_path(self, domid: int) -> bytes:
        if self.closed:
            raise _err(errno.EBADF, "connection closed")
        return domain_home(domid).encode()

    def introduce_domain(self, domid: int, mfn: int, evtchn: int) -> None:
        with self.server._lock:
            if self.domid != 0:
                raise _err(errno.EACCES)
            self.server._introduce(domid)

    def release_domain(self, domid: int) -> None:
        with self.server._lock:
            if self.domid != 0:
                raise _err(errno.EACCES)
            self.server._release(domid)

    def is_domain_introduced(self, domid: int) -> bool:
        with self.server._lock:
            if self.domid != 0:
                raise _err(errno.EACCES)
            return domid in self.server._introduced


class FakeXenstoreServer:
    """The shared store behind any number of :class:`FakeXenstore` connections (e.g. one
    for dom0 and one per guest). Thread-safe.

    Starts with ``/``, ``/local``, ``/local/domain`` and ``/local/domain/0`` (all owned by
    dom0, no access for others), dom0 introduced.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._gens = itertools.count(1)
        self._tx_ids = itertools.count(1)
        self._nodes: dict[str, _Node] = {}
        self._conns: list[_FakeConnection] = []
        self._introduced: set[int] = {0}
        self._known: set[int] = {0}  # domains that exist (created, introduced or connected)
        self._global = _GlobalView(self)
        self._global.put("/", _Node(b"", [(0, 0)]))
        self._admin = _FakeConnection(self, 0, register=False)
        for p in ("/local", "/local/domain", "/local/domain/0"):
            self._mkdir(self._admin, self._global, p)

    # -- test helpers -------------------------------------------------------------------------

    def connect(self, domid: int = 0) -> "FakeXenstore":
        """A new, opened client connection acting as domain ``domid``."""
        client = FakeXenstore(self, domid=domid)
        client.open()
        return client

    def create_domain(self, domid: int, *, guest_writable: Iterable[str] = DEFAULT_GUEST_WRITABLE,
                      name: str | None = None, introduce: bool = True) -> str:
        """Lay out ``/local/domain/<domid>`` the way libxl does (dom0-owned, guest may
        read; ``guest_writable`` subdirectories owned by the guest), then introduce the
        domain (fires ``@introduceDomain``). Returns the home path."""
        validate_domid(domid)
        self._known.add(domid)
        home = domain_home(domid)
        ro = [(0, 0), (domid, _READ)]
        rw = [(domid, 0)]
        with self._lock:
            a, g = self._admin, self._global
            self._mkdir(a, g, home)
            self._set_perms(a, g, home, ro)
            for sub in ("device", "control"):
                self._mkdir(a, g, f"{home}/{sub}")
                self._set_perms(a, g, f"{home}/{sub}", ro)
            for sub in guest_writable:
                self._mkdir(a, g, f"{home}/{sub}")
                self._set_perms(a, g, f"{home}/{sub}", rw)
            self._write(a, g, f"{home}/domid", str(domid).encode())
            self._set_perms(a, g, f"{home}/domid", ro)
            if name is not None:
                self._write(a, g, f"{home}/name", name.encode())
                self._set_perms(a, g, f"{home}/name", ro)
            if introduce:
                self._introduce(domid)
        return home

    def destroy_domain(self, domid: int) -> None:
        """Remove ``/local/domain/<domid>`` and fire ``@releaseDomain``, like a domain
        dying and the toolstack cleaning up."""
        with self._lock:
            home = domain_home(domid)
            if home in self._nodes:
                self._rm(self._admin, self._global, home)
            self._introduced.discard(domid)
            if domid != 0:
                self._known.discard(domid)
            self._fire_special(RELEASE_DOMAIN)

    def fire_introduce_domain(self) -> None:
        with self._lock:
            self._fire_special(INTRODUCE_DOMAIN)

    def fire_release_domain(self) -> None:
        with self._lock:
            self._fire_special(RELEASE_DOMAIN)

    def dump(self, prefix: str = "/") -> dict[str, bytes]:
        """``{path: value}`` of every node at or below ``prefix`` (no permission checks)."""
        with self._lock:
            return {p: n.value for p, n in sorted(self._nodes.items()) if _is_subpath(prefix, p)}

    def perms_of(self, path: str) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._nodes[path].perms)

    # -- xenstored semantics (lock held by callers) -----------------------------------------

    def _bits(self, conn: _FakeConnection, perms: Perms) -> int:
        return _perm_bits(conn.domid, perms, self._known)

    def _errno_from_parents(self, conn: _FakeConnection, view: _View, path: str, need: int) -> int:
        p = path
        while p != "/":
            p = _parent(p)
            node = view.get(p)
            if node is not None:
                return errno.ENOENT if self._bits(conn, node.perms) & need else errno.EACCES
        return errno.EACCES  # pragma: no cover - "/" always exists

    def _check(self, conn: _FakeConnection, view: _View, path: str, need: int) -> _Node:
        node = view.get(path)
        if node is None:
            raise _err(self._errno_from_parents(conn, view, path, need), path)
        if self._bits(conn, node.perms) & need != need:
            raise _err(errno.EACCES, path)
        return node

    def _emit(self, view: _View, path: str, perms: Perms, exact: bool = False,
              also: Perms | None = None) -> None:
        perm_sets = (perms,) if also is None else (perms, also)
        if view.events is None:
            self._fire(path, perm_sets, exact)
        else:
            view.events.append((path, perm_sets, exact))

    def _create(self, conn: _FakeConnection, view: _View, path: str, value: bytes) -> _Node:
        """Create ``path`` and its missing parents; a copy of the new node."""
        missing = [path]
        parent = _parent(path)
        pnode = view.get(parent)
        while pnode is None:
            missing.append(parent)
            parent = _parent(parent)
            pnode = view.get(parent)
        for p in reversed(missing):
            perms = list(pnode.perms)
            if conn.domid != 0:
                perms[0] = (conn.domid, perms[0][1])
            pnode.children.append(_basename(p))
            view.put(parent, pnode)
            node = _Node(value if p == path else b"", perms)
            view.put(p, node)
            parent, pnode = p, node.copy()  # what view.get(p) returns now
        return pnode

    def _write(self, conn: _FakeConnection, view: _View, path: str, value: bytes) -> None:
        node = view.get(path)
        if node is None:
            code = self._errno_from_parents(conn, view, path, _WRITE)
            if code != errno.ENOENT:
                raise _err(code, path)
            node = self._create(conn, view, path, value)
        else:
            if self._bits(conn, node.perms) & _WRITE != _WRITE:
                raise _err(errno.EACCES, path)
            node.value = value
            view.put(path, node)
        self._emit(view, path, node.perms)

    def _mkdir(self, conn: _FakeConnection, view: _View, path: str) -> None:
        node = view.get(path)
        if node is not None:
            if self._bits(conn, node.perms) & _WRITE != _WRITE:
                raise _err(errno.EACCES, path)
            return
        code = self._errno_from_parents(conn, view, path, _WRITE)
        if code != errno.ENOENT:
            raise _err(code, path)
        self._emit(view, path, self._create(conn, view, path, b"").perms)

    def _rm(self, conn: _FakeConnection, view: _View, path: str) -> None:
        if path == "/":
            raise _err(errno.EINVAL, "cannot remove /")
        node = view.get(path)
        if node is None:
            code = self._errno_from_parents(conn, view, path, _WRITE)
            if code != errno.ENOENT:
                raise _err(code, path)
            if view.get(_parent(path)) is None:
                raise _err(errno.ENOENT, path)
            return  # removing a missing node whose parent exists is fine
        if self._bits(conn, node.perms) & _WRITE != _WRITE:
            raise _err(errno.EACCES, path)
        removed: list[tuple[str, Perms]] = []

        def collect(p: str, n: _Node) -> None:
            for c in n.children:
                cp = _join(p, c)
                cn = view.get(cp)
                if cn is not None:
                    collect(cp, cn)
            removed.append((p, n.perms))

        collect(path, node)
        for p, _ in removed:
            view.delete(p)
        parent = view.get(_parent(path))
        if parent is not None:
            parent.children = [c for c in parent.children if c != _basename(path)]
            view.put(_parent(path), parent)
        for p, perms in removed:
            if p == path:
                self._emit(view, p, perms, exact=False)
            else:
                self._emit(view, p, perms, exact=True)

    def _set_perms(self, conn: _FakeConnection, view: _View, path: str, perms: Perms) -> None:
        if not perms:
            raise _err(errno.EINVAL, "empty permission list")
        node = self._check(conn, view, path, _WRITE | _OWNER)
        if conn.domid != 0 and perms[0][0] != node.perms[0][0]:
            raise _err(errno.EPERM, "only dom0 may change a node's owner")
        if perms[0][0] not in self._known:
            raise _err(errno.ENOENT, f"owner domain {perms[0][0]} does not exist")
        old = node.perms
        node.perms = [(int(d), int(b) & (_READ | _WRITE)) for d, b in perms]
        view.put(path, node)
        # Watchers that could read the node before or after the change are told.
        self._emit(view, path, old, also=node.perms)

    def _commit(self, view: _TxView) -> None:
        for path, gen in view.accessed.items():
            cur = self._nodes.get(path)
            if (cur.gen if cur else None) != gen:
                raise _err(errno.EAGAIN, f"transaction conflict on {path}")
        for path in view.dirty:
            node = view.local[path]
            if node is None:
                self._global.delete(path)
            else:
                self._global.put(path, node.copy())
        for path, perm_sets, exact in view.events:
            self._fire(path, perm_sets, exact)

    def _fire(self, path: str, perm_sets: tuple[Perms, ...], exact: bool) -> None:
        for conn in list(self._conns):
            for w in conn.watches:
                if w.path.startswith("@"):
                    continue
                hit = (path == w.path) if exact else _is_subpath(w.path, path)
                if not hit:
                    continue
                if not any(self._bits(conn, p) & _READ for p in perm_sets):
                    continue
                shown = path
                if w.relative and path.startswith(conn.home + "/"):
                    shown = path[len(conn.home) + 1:]
                conn._push_event(shown, w.token)

    def _fire_special(self, name: str) -> None:
        for conn in list(self._conns):
            if conn.domid != 0:
                continue  # special nodes default to "n0": only dom0 sees them
            for w in conn.watches:
                if w.path == name:
                    conn._push_event(name, w.token)

    def _introduce(self, domid: int) -> None:
        self._known.add(domid)
        if domid in self._introduced:
            return
        self._introduced.add(domid)
        self._fire_special(INTRODUCE_DOMAIN)

    def _release(self, domid: int) -> None:
        if domid == 0:
            raise _err(errno.EINVAL, "cannot release dom0")
        if domid not in self._introduced:
            raise _err(errno.ENOENT, f"domain {domid} not introduced")
        self._introduced.discard(domid)
        self._fire_special(RELEASE_DOMAIN)


class FakeXenstore(XenstoreClient):
    """:class:`~xenpbr.xenstore.client.XenstoreClient` over an in-memory
    :class:`FakeXenstoreServer`, acting as domain ``domid`` (0 = dom0, privileged).

    Like the real client it must be opened (``open()`` or ``with``); several instances on
    one server see each other's writes, watches and transaction conflicts::

        server = FakeXenstoreServer()
        server.create_domain(3)
        with FakeXenstore(server) as dom0, FakeXenstore(server, domid=3) as guest:
            guest.write("data/phase", "1")       # relative to /local/domain/3
            assert dom0.read("/local/domain/3/data/phase") == b"1"
    """

    def __init__(self, server: FakeXenstoreServer | None = None, domid: int = 0) -> None:
        self.server = server if server is not None else FakeXenstoreServer()
        self.domid = validate_domid(domid)
        super().__init__(connection_factory=lambda: _FakeConnection(self.server, self.domid))

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<FakeXenstore domid={self.domid} {state}>"
