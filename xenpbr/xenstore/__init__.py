"""xenstore access for xenpbr: one client for dom0 (daemon) and guests (agent).

* :class:`XenstoreClient` -- ctypes over Xen's own ``libxenstore.so.4``;
* :class:`FakeXenstore` / :class:`FakeXenstoreServer` -- the same client over an
  in-memory xenstored, for unit tests;
* exceptions in :mod:`xenpbr.xenstore.errors`.

See ``docs/xenstore.md``.
"""

from xenpbr.xenstore.client import (
    Access,
    NodePerms,
    Perm,
    Transaction,
    WatchEvent,
    XenstoreClient,
)
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
