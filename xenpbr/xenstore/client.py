"""Pythonic xenstore client over Xen's own ``libxenstore.so.4``: client and transactions.

Layering (like pyxs, but over the C library instead of a pure-Python wire protocol):

* a *connection* -- one ``struct xs_handle``
  (:class:`~xenpbr.ctypes_libxc.xenstore.LibxenstoreConnection`, in the binding), thin:
  bytes in, bytes out, :class:`OSError` with the C errno on failure, no policy;
* :class:`XenstoreClient` (this module) -- validates arguments *before* any C call
  (:mod:`xenpbr.xenstore.paths`), converts types (:mod:`xenpbr.xenstore.permissions`),
  maps errno to :mod:`xenpbr.xenstore.errors`, logs, and offers transactions and
  watches.

The same client works in dom0 (libxenstore talks to xenstored over its unix socket,
``/var/run/xenstored/socket``) and in a guest (libxenstore opens ``/dev/xen/xenbus``
or ``/proc/xen/xenbus``): ``xs_open(0)`` tries both.

:class:`xenpbr.xenstore.fake.FakeXenstore` is this very class over an in-memory
connection, so the two share every line of validation and error mapping.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Iterable, NamedTuple, Protocol, TypeVar

from xenpbr.errors import XenpbrError
from xenpbr.xenstore.errors import (
    NoSuchKey,
    TransactionConflict,
    XenstoreError,
    XenstoreUnavailable,
    error_from_errno,
)
from xenpbr.xenstore.paths import (
    encode_value,
    validate_domid,
    validate_path,
    validate_token,
)
from xenpbr.xenstore.permissions import Access, NodePerms, Perm, to_perm

log = logging.getLogger(__name__)

__all__ = [
    "WatchEvent",
    "XenstoreClient",
    "Transaction",
    "XenstoreConnection",
    "refuse_dead_daemon_socket",
    "unavailable_message",
]

T = TypeVar("T")


def unavailable_message(err: int | None, socket_path: str | None = None) -> str:
    """What to tell a user when ``xs_open`` fails (pure, so it is unit-tested)."""
    sock = socket_path or "/var/run/xenstored/socket"
    why = f"{os.strerror(err)} ({_errno.errorcode.get(err, err)})" if err else "unknown error"
    return (
        f"cannot connect to xenstore: {why}. libxenstore tried the xenstored socket {sock} "
        "and the xenbus device (/dev/xen/xenbus or /proc/xen/xenbus). "
        "In dom0: start xenstored (e.g. 'systemctl start xenstored' or "
        "'/etc/init.d/xencommons start'). In a guest: load xenfs "
        "('modprobe xenfs && mount -t xenfs xenfs /proc/xen') or make sure /dev/xen/xenbus "
        "exists. On a machine that is not a Xen domain there is no xenstore at all: run this "
        "inside a Xen domain, or use xenpbr.xenstore.FakeXenstore for tests."
    )


class WatchEvent(NamedTuple):
    """A fired watch: the path that changed (relative if the watch was registered with a
    relative path) and the token given to :meth:`XenstoreClient.watch`."""

    path: str
    token: str


# --------------------------------------------------------------------------------------------
# What the client needs from a connection
# --------------------------------------------------------------------------------------------


class XenstoreConnection(Protocol):
    """What :class:`XenstoreClient` needs from a connection. Every method raises
    :class:`OSError` (with ``errno``) on failure; paths/tokens are ASCII/UTF-8 bytes;
    ``tx`` is a transaction id (0 = none)."""

    def close(self) -> None: ...
    def read(self, tx: int, path: bytes) -> bytes: ...
    def write(self, tx: int, path: bytes, data: bytes) -> None: ...
    def mkdir(self, tx: int, path: bytes) -> None: ...
    def rm(self, tx: int, path: bytes) -> None: ...
    def directory(self, tx: int, path: bytes) -> list[bytes]: ...
    def get_permissions(self, tx: int, path: bytes) -> list[tuple[int, int]]: ...
    def set_permissions(self, tx: int, path: bytes, perms: list[tuple[int, int]]) -> None: ...
    def watch(self, path: bytes, token: bytes) -> None: ...
    def unwatch(self, path: bytes, token: bytes) -> None: ...
    def fileno(self) -> int: ...
    def check_watch(self) -> tuple[bytes, bytes] | None: ...
    def transaction_start(self) -> int: ...
    def transaction_end(self, tx: int, abort: bool) -> None: ...
    def get_domain_path(self, domid: int) -> bytes: ...
    def introduce_domain(self, domid: int, mfn: int, evtchn: int) -> None: ...
    def release_domain(self, domid: int) -> None: ...
    def is_domain_introduced(self, domid: int) -> bool: ...


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


def _enc(s: str) -> bytes:
    return s.encode("utf-8")


def _dec(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


class _Ops:
    """Node operations shared by the client (``tx == 0``) and :class:`Transaction`."""

    _tx: int = 0

    def _conn_or_raise(self) -> XenstoreConnection:
        raise NotImplementedError

    def _call(self, op: str, path: str | None, fn: Callable[..., T], *args: Any) -> T:
        conn = self._conn_or_raise()
        try:
            return fn(conn, *args)
        except OSError as e:
            raise error_from_errno(e.errno or 0, op, path,
                                   in_transaction=self._tx != 0) from e

    def read(self, path: str) -> bytes:
        """Value of ``path``; :class:`NoSuchKey` if it does not exist."""
        validate_path(path)
        value = self._call("read", path, lambda c: c.read(self._tx, _enc(path)))
        log.debug("xenstore read %s -> %d bytes", path, len(value))
        return value

    def read_or(self, path: str, default: T = None) -> "bytes | T":  # type: ignore[assignment]
        """Value of ``path``, or ``default`` if it does not exist."""
        try:
            return self.read(path)
        except NoSuchKey:
            return default

    def write(self, path: str, value: "bytes | str") -> None:
        """Set ``path`` to ``value`` (str is UTF-8 encoded); missing parents are created."""
        validate_path(path)
        data = encode_value(path, value)
        self._call("write", path, lambda c: c.write(self._tx, _enc(path), data))
        log.debug("xenstore write %s (%d bytes)", path, len(data))

    def mkdir(self, path: str) -> None:
        """Create ``path`` with an empty value; no error if it exists."""
        validate_path(path)
        self._call("mkdir", path, lambda c: c.mkdir(self._tx, _enc(path)))
        log.debug("xenstore mkdir %s", path)

    def rm(self, path: str) -> None:
        """Remove ``path`` and everything below it. Removing a missing node whose parent
        exists succeeds (xenstored semantics); a missing parent gives :class:`NoSuchKey`."""
        validate_path(path)
        self._call("rm", path, lambda c: c.rm(self._tx, _enc(path)))
        log.debug("xenstore rm %s", path)

    def ls(self, path: str) -> list[str]:
        """Names (not paths) of the children of ``path``."""
        validate_path(path)
        names = self._call("ls", path, lambda c: c.directory(self._tx, _enc(path)))
        return [_dec(n) for n in names]

    def get_perms(self, path: str) -> NodePerms:
        validate_path(path)
        pairs = self._call("get_perms", path, lambda c: c.get_permissions(self._tx, _enc(path)))
        return NodePerms.from_wire(pairs)

    def set_perms(self, path: str, owner: int, others: "Access | str" = Access.NONE,
                  acl: Iterable["Perm | tuple[int, Access | str]"] = ()) -> None:
        """Give ``path`` to ``owner``; every other domain gets ``others`` unless ``acl``
        (``Perm`` or ``(domid, access)``) says otherwise. Only the owner or dom0 may do
        this, and only dom0 may change the owner."""
        validate_path(path)
        perms = NodePerms(owner, Access.parse(others), tuple(to_perm(p) for p in acl))
        self._call("set_perms", path,
                   lambda c: c.set_permissions(self._tx, _enc(path), perms.to_wire()))
        log.debug("xenstore set_perms %s %s", path, perms)


class Transaction(_Ops):
    """A xenstore transaction. Use as a context manager (commit on normal exit, abort on
    exception) or call :meth:`commit` / :meth:`abort` yourself. :meth:`commit` raises
    :class:`TransactionConflict` when another writer changed a node this transaction
    used; start a new transaction then (see :meth:`XenstoreClient.run_transaction`)."""

    def __init__(self, client: "XenstoreClient") -> None:
        self._client = client
        self._tx = 0
        tx = client._call("transaction_start", None, lambda c: c.transaction_start())
        self._tx = tx
        self._ended = False
        log.debug("xenstore transaction %d started", tx)

    @property
    def id(self) -> int:
        return self._tx

    @property
    def ended(self) -> bool:
        return self._ended

    def _conn_or_raise(self) -> XenstoreConnection:
        if self._ended:
            raise XenstoreError(f"xenstore transaction {self._tx} has already ended")
        return self._client._conn_or_raise()

    def _end(self, abort: bool) -> None:
        conn = self._conn_or_raise()
        self._ended = True
        op = "transaction_abort" if abort else "transaction_commit"
        try:
            conn.transaction_end(self._tx, abort)
        except OSError as e:
            raise error_from_errno(e.errno or 0, op, None, in_transaction=True) from e
        log.debug("xenstore transaction %d %s", self._tx, "aborted" if abort else "committed")

    def commit(self) -> None:
        self._end(abort=False)

    def abort(self) -> None:
        self._end(abort=True)

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._ended:
            return
        if exc_type is None:
            self.commit()
        else:
            try:
                self.abort()
            except XenstoreError:
                log.warning("aborting xenstore transaction %d failed", self._tx, exc_info=True)


ConnectionFactory = Callable[[], XenstoreConnection]


def refuse_dead_daemon_socket(path: str) -> None:
    """Fail fast when xenstored's socket exists but nobody accepts on it.

    libxenstore 4.17 ignores ``XS_OPEN_SOCKETONLY`` and falls back to
    ``/dev/xen/xenbus``; in dom0 with xenstored dead, requests on that device block
    forever (measured in the lab). A socket file that refuses connections means exactly
    that situation, so raise instead of hanging. No socket file at all (a guest, or
    xenstored in a stub domain) leaves the xenbus path to libxenstore.
    """
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except OSError as e:
        raise XenstoreUnavailable(
            f"xenstored is not running: its socket {path} refuses connections "
            f"({os.strerror(e.errno) if e.errno else e}); start xenstored (or the "
            "xenstored service) and retry", errno=e.errno, op="open") from e
    finally:
        probe.close()


class XenstoreClient(_Ops):
    """xenstore client over libxenstore.

    ``open()``/``close()`` are idempotent; the client is a context manager::

        with XenstoreClient() as xs:
            xs.write("/local/domain/3/data/phase", "2")
            with xs.transaction() as t:
                t.write("a", "1"); t.write("b", "2")
            xs.watch("/local/domain/3/data", "tok")
            ev = xs.read_watch(timeout=5.0)

    ``libdir`` (or ``$XENPBR_LIBDIR``) selects the directory of ``libxenstore.so.4``.
    ``connection_factory`` replaces the libxenstore connection (the fake uses it).
    """

    def __init__(self, libdir: str | None = None, *,
                 connection_factory: ConnectionFactory | None = None) -> None:
        self._libdir = libdir
        self._factory = connection_factory
        self._conn: XenstoreConnection | None = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    def _connect(self) -> XenstoreConnection:
        if self._factory is not None:
            return self._factory()
        from xenpbr.ctypes_libxc import xenstore as binding

        try:
            lib = binding.load(self._libdir)
        except (OSError, XenpbrError) as e:
            msg = f"cannot use libxenstore.so.4: {e}"
            if not isinstance(e, XenpbrError):  # the shared loader's errors say what to do
                msg += (". Install it (Debian: 'apt-get install libxenstore4') or point "
                        "$XENPBR_LIBDIR at a directory holding libxenstore.so.4 and "
                        "libxentoolcore.so.1.")
            raise XenstoreUnavailable(msg, errno=getattr(e, "errno", None), op="open") from e
        fn = getattr(lib, "xs_daemon_socket", None)
        sock = fn().decode() if fn is not None else None
        if sock is not None:
            refuse_dead_daemon_socket(sock)
        try:
            return binding.LibxenstoreConnection(lib)
        except OSError as e:
            raise XenstoreUnavailable(unavailable_message(e.errno, sock),
                                      errno=e.errno, op="open") from e

    def open(self) -> "XenstoreClient":
        with self._lock:
            if self._conn is None:
                self._conn = self._connect()
                log.debug("xenstore connection opened")
        return self

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            log.debug("xenstore connection closed")

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def __enter__(self) -> "XenstoreClient":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _conn_or_raise(self) -> XenstoreConnection:
        conn = self._conn
        if conn is None:
            raise XenstoreError("xenstore client is not open: call open() or use it in a "
                                "'with' statement")
        return conn

    # -- misc -----------------------------------------------------------------------------

    def get_domain_path(self, domid: int) -> str:
        """Home path of ``domid`` as xenstored reports it (``/local/domain/<domid>``)."""
        validate_domid(domid)
        return _dec(self._call("get_domain_path", None, lambda c: c.get_domain_path(domid)))

    def introduce_domain(self, domid: int, mfn: int, evtchn: int) -> None:
        """Tell xenstored about a new domain's store page and event channel (dom0 only;
        normally the toolstack does this). Fires ``@introduceDomain``."""
        validate_domid(domid)
        self._call("introduce_domain", None, lambda c: c.introduce_domain(domid, mfn, evtchn))

    def release_domain(self, domid: int) -> None:
        """Tell xenstored a domain is gone (dom0 only). Fires ``@releaseDomain``."""
        validate_domid(domid)
        self._call("release_domain", None, lambda c: c.release_domain(domid))

    def is_domain_introduced(self, domid: int) -> bool:
        validate_domid(domid)
        return self._call("is_domain_introduced", None,
                          lambda c: c.is_domain_introduced(domid))

    # -- transactions ---------------------------------------------------------------------

    def transaction(self) -> Transaction:
        """Start a transaction (see :class:`Transaction`)."""
        return Transaction(self)

    def run_transaction(self, fn: Callable[[Transaction], T], retries: int = 5,
                        backoff: float = 0.002) -> T:
        """Run ``fn(t)`` in a transaction and commit; on :class:`TransactionConflict`
        run it again, up to ``retries`` more times (sleeping ``backoff * 2**attempt``,
        capped at 0.1 s). Other exceptions abort the transaction and propagate.
        Returns what ``fn`` returned."""
        if retries < 0:
            raise ValueError("retries must be >= 0")
        attempt = 0
        while True:
            try:
                with self.transaction() as t:
                    result = fn(t)
                return result
            except TransactionConflict:
                if attempt >= retries:
                    log.warning("xenstore transaction still conflicting after %d attempts",
                                attempt + 1)
                    raise
                log.debug("xenstore transaction conflict, retry %d/%d", attempt + 1, retries)
                if backoff > 0:
                    time.sleep(min(0.1, backoff * (2 ** attempt)))
                attempt += 1

    # -- watches --------------------------------------------------------------------------

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` and its descendants (or a special path ``@introduceDomain`` /
        ``@releaseDomain``). xenstored fires the watch once right away with ``path``
        itself, so expect that first event."""
        validate_path(path, allow_special=True)
        validate_token(token, path)
        self._call("watch", path, lambda c: c.watch(_enc(path), _enc(token)))
        log.debug("xenstore watch %s token=%s", path, token)

    def unwatch(self, path: str, token: str) -> None:
        validate_path(path, allow_special=True)
        validate_token(token, path)
        self._call("unwatch", path, lambda c: c.unwatch(_enc(path), _enc(token)))
        log.debug("xenstore unwatch %s token=%s", path, token)

    def fileno(self) -> int:
        """A file descriptor that is readable while watch events are pending; usable with
        ``select``/``selectors``. After it polls readable call :meth:`read_watch` with
        ``timeout=0`` until it returns ``None``."""
        return self._call("fileno", None, lambda c: c.fileno())

    def read_watch(self, timeout: float | None = None) -> WatchEvent | None:
        """Next pending watch event; waits up to ``timeout`` seconds (``None``: forever,
        ``0``: just poll). Returns ``None`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        fd = self.fileno()
        while True:
            ev = self._call("read_watch", None, lambda c: c.check_watch())
            if ev is not None:
                event = WatchEvent(_dec(ev[0]), _dec(ev[1]))
                log.debug("xenstore watch fired %s token=%s", event.path, event.token)
                return event
            if deadline is None:
                wait = None
            else:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return None
            _wait_readable(fd, wait)


def _wait_readable(fd: int, timeout: float | None) -> bool:
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        return bool(p.poll(ms))
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)
