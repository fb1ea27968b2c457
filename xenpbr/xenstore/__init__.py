"""xenstore access for xenpbr: one client for dom0 (daemon) and guests (agent).

* :class:`XenstoreClient` -- ctypes over Xen's own ``libxenstore.so.4``
  (:mod:`~xenpbr.xenstore.client`), with its path rules in :mod:`~xenpbr.xenstore.paths`
  and its permission values in :mod:`~xenpbr.xenstore.permissions`;
* :class:`FakeXenstore` / :class:`FakeXenstoreServer` -- the same client over an
  in-memory xenstored, for unit tests;
* exceptions in :mod:`xenpbr.xenstore.errors`.

See ``docs/xenstore.md``.
"""

from xenpbr.xenstore.client import Transaction, WatchEvent, XenstoreClient
from xenpbr.xenstore.errors import (
    ConnectionLost,
    InvalidPath,
    NoSuchKey,
    PermissionDenied,
    QuotaExceeded,
    TransactionConflict,
    ValueTooLarge,
    XenstoreError,
    XenstoreUnavailable,
)
from xenpbr.xenstore.fake import FakeXenstore, FakeXenstoreServer
from xenpbr.xenstore.permissions import Access, NodePerms, Perm

__all__ = [
    "Access",
    "ConnectionLost",
    "FakeXenstore",
    "FakeXenstoreServer",
    "InvalidPath",
    "NoSuchKey",
    "NodePerms",
    "Perm",
    "PermissionDenied",
    "QuotaExceeded",
    "Transaction",
    "TransactionConflict",
    "ValueTooLarge",
    "WatchEvent",
    "XenstoreClient",
    "XenstoreError",
    "XenstoreUnavailable",
]
