"""Exceptions raised by xenpbr's xenstore client and its in-memory fake.

Both :class:`~xenpbr.xenstore.client.XenstoreClient` (over Xen's ``libxenstore``) and
:class:`~xenpbr.xenstore.fake.FakeXenstore` raise exactly these, so code written against
one behaves identically against the other.

Mapping from the errno that ``libxenstore`` / ``xenstored`` report:

========================  ===========================================
errno                     exception
========================  ===========================================
``ENOENT``                :class:`NoSuchKey`
``EACCES``, ``EPERM``     :class:`PermissionDenied`
``EAGAIN`` in transaction :class:`TransactionConflict` (retry it)
``ENOSPC``/``E2BIG``/...  :class:`QuotaExceeded`
anything else             :class:`XenstoreError` (``.errno`` is set)
========================  ===========================================

Argument problems found *before* talking to xenstore raise :class:`InvalidPath` or
:class:`ValueTooLarge`; both are also :class:`ValueError`.
"""

from __future__ import annotations

import errno as _errno
import os

from xenpbr.errors import XenpbrError

__all__ = [
    "XenstoreError",
    "XenstoreUnavailable",
    "NoSuchKey",
    "PermissionDenied",
    "TransactionConflict",
    "QuotaExceeded",
    "InvalidPath",
    "ValueTooLarge",
    "error_from_errno",
]


class XenstoreError(XenpbrError):
    """A xenstore operation failed.

    ``errno`` is the errno reported by libxenstore/xenstored (``None`` when the error
    was detected locally), ``path`` the xenstore path involved (if any) and ``op`` the
    operation name (``"read"``, ``"write"``, ...).
    """

    def __init__(self, message: str, *, errno: int | None = None,
                 path: str | None = None, op: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.path = path
        self.op = op


class XenstoreUnavailable(XenstoreError):
    """No connection to xenstore can be made here (no xenstored, no xenbus device, or
    no ``libxenstore.so.4``). The message says what to do about it."""


class ConnectionLost(XenstoreError):
    """The connection to xenstored broke (xenstored died or restarted). Measured on the
    lab's Xen 4.17: after xenstored is killed, libxenstore fails every call on the old
    handle with ``EBADF``. A C xenstored restarted without live update starts with an
    empty store, so reconnecting is not enough: domains lose their xenstore state and
    xenstored must not be restarted under running domains (use ``xenstore-control
    live-update``)."""


class NoSuchKey(XenstoreError):
    """The node does not exist (``ENOENT``)."""


class PermissionDenied(XenstoreError):
    """xenstored refused the operation for this domain (``EACCES``/``EPERM``)."""


class TransactionConflict(XenstoreError):
    """The transaction could not be committed because a node it touched changed
    meanwhile (``EAGAIN`` from ``xs_transaction_end``). Run it again, e.g. with
    :meth:`~xenpbr.xenstore.client.XenstoreClient.run_transaction`."""


class QuotaExceeded(XenstoreError):
    """xenstored rejected the request because a quota or size limit was exceeded
    (``ENOSPC``, ``E2BIG``, ``EDQUOT``)."""


class InvalidPath(XenstoreError, ValueError):
    """The path (or watch token) is not acceptable to xenstore; detected before any C call."""


class ValueTooLarge(XenstoreError, ValueError):
    """The value does not fit in one xenstore message; detected before any C call."""


_QUOTA_ERRNOS = frozenset({_errno.ENOSPC, _errno.E2BIG, _errno.EDQUOT})
_CONNECTION_ERRNOS = frozenset({_errno.EBADF, _errno.EPIPE, _errno.ECONNRESET})


def _errno_name(err: int) -> str:
    return _errno.errorcode.get(err, f"errno {err}")


def error_from_errno(err: int, op: str, path: str | None = None, *,
                     in_transaction: bool = False) -> XenstoreError:
    """Build the exception for a failed xenstore call.

    Pure function (no C library needed), shared by the real client and the fake.
    ``in_transaction`` turns ``EAGAIN`` into :class:`TransactionConflict`.
    """
    where = f" of {path!r}" if path is not None else ""
    detail = f"{os.strerror(err)} ({_errno_name(err)})" if err else "unknown error"
    if err == _errno.ENOENT:
        if path is not None and op in ("read", "ls", "get_perms", "set_perms", "rm"):
            msg = f"no such xenstore key: {path!r} (xenstore {op})"
        else:
            msg = f"xenstore {op}{where} failed: {detail}"
        return NoSuchKey(msg, errno=err, path=path, op=op)
    if err in (_errno.EACCES, _errno.EPERM):
        return PermissionDenied(
            f"xenstore {op}{where} refused: {detail}; this domain lacks the permission "
            "(check the node's perms with get_perms / xenstore-ls -p)",
            errno=err, path=path, op=op)
    if err == _errno.EAGAIN and in_transaction:
        return TransactionConflict(
            f"xenstore transaction conflict during {op}{where}: another writer changed "
            "a node this transaction used; run the transaction again",
            errno=err, path=path, op=op)
    if err in _CONNECTION_ERRNOS:
        return ConnectionLost(
            f"xenstore {op}{where} failed: {detail}: the connection to xenstored is lost "
            "(xenstored died or restarted); open a new client once xenstored runs again",
            errno=err, path=path, op=op)
    if err in _QUOTA_ERRNOS:
        return QuotaExceeded(f"xenstore {op}{where} exceeded a xenstored limit: {detail}",
                             errno=err, path=path, op=op)
    return XenstoreError(f"xenstore {op}{where} failed: {detail}", errno=err, path=path, op=op)
