"""ctypes binding for Xen's own xenstore client library, ``libxenstore.so.4`` (Xen 4.17).

Policy-free: this module only describes the C interface (``tools/include/xenstore.h``
and ``xenstore_lib.h`` of Xen 4.17) as tables, loads the library, and offers small
helpers that copy C results into Python objects and ``free()`` them, plus
:class:`LibxenstoreConnection`, the thin handle class over one ``struct xs_handle``
(bytes in, bytes out, :class:`OSError` with the C errno). Path validation, exception
mapping and everything Pythonic live in :mod:`xenpbr.xenstore.client`.

Tables (the style shared with the other ``xenpbr.ctypes_libxc`` modules):

* :data:`SIGNATURES` -- symbol name -> ``(argtypes, restype)``;
* :data:`ERROR_CHECKERS` -- symbol name -> ctypes ``errcheck`` callable. Every checker
  raises :class:`~xenpbr.ctypes_libxc._errcheck.XenCallError` (an :class:`OSError`)
  carrying the C ``errno`` when the call reports failure (``NULL`` / ``false`` / ``-1`` /
  ``XBT_NULL``); the shared loader opens the library with ``use_errno=True`` so the
  errno is the one the call set;
* :data:`OPTIONAL` -- symbols that may be absent without making the library unusable.

Memory rules from ``xenstore.h``: ``xs_read``, ``xs_directory``, ``xs_get_permissions``,
``xs_check_watch``, ``xs_read_watch`` and ``xs_get_domain_path`` return one ``malloc``'d
block each, to be released with a single libc ``free()`` (the ``take_*`` helpers do it).
Those functions therefore have ``c_void_p`` (or ``POINTER``) restypes, never
``c_char_p``, so the pointer is not lost in an automatic conversion.

Loading goes through the shared :mod:`xenpbr.ctypes_libxc._loader`, which honours
``XENPBR_LIBDIR`` (a directory holding ``libxenstore.so.4``, e.g. the unpacked Debian
package) and pre-loads ``libxentoolcore.so.1`` from that directory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import functools
import os
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char_p,
    c_int,
    c_uint,
    c_uint32,
    c_ulong,
    c_void_p,
)
from typing import Any, Callable

from ._errcheck import XenCallError, check_negative_errno, check_null_errno
from ._loader import (
    LIBDIR_ENV,
    LibrarySpec,
    LoadedLibrary,
    OwnedHandle,
    XenLibraryNotFound,
    load_library,
)

__all__ = [
    "LibxenstoreConnection",
    "SONAME",
    "LIBRARY",
    "SIGNATURES",
    "ERROR_CHECKERS",
    "OPTIONAL",
    "xs_permissions",
    "libxenstore",
    "load",
    "free",
    "take_bytes",
    "take_cstring",
    "take_string_vector",
    "take_permissions",
    "make_permissions",
]

SONAME = "libxenstore.so.4"
LIBRARY = LibrarySpec(SONAME, "libxenstore4")

# --- constants from xenstore.h / xenstore_lib.h / xen/io/xs_wire.h (Xen 4.17) -----------
XBT_NULL = 0
XS_OPEN_READONLY = 1 << 0  # deprecated and ignored by 4.17
XS_OPEN_SOCKETONLY = 1 << 1  # deprecated and ignored by 4.17
XS_UNWATCH_FILTER = 1 << 2

XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1

XS_PERM_NONE = 0x00
XS_PERM_READ = 0x01
XS_PERM_WRITE = 0x02
XS_PERM_ENOENT_OK = 0x04  # internal to xenstored
XS_PERM_OWNER = 0x08  # internal to xenstored

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048


class xs_handle(Structure):
    """Opaque ``struct xs_handle``."""


xs_handle_p = POINTER(xs_handle)
xs_transaction_t = c_uint32


class xs_permissions(Structure):
    """``struct xs_permissions { unsigned int id; enum xs_perm_type perms; }``.

    (The enum became a plain ``unsigned int`` with ``#define``\\ d bits after 4.17; the
    layout -- two 32-bit unsigned ints -- is the same.)
    """

    _fields_ = [("id", c_uint), ("perms", c_uint)]


_H = xs_handle_p
_T = xs_transaction_t

#: name -> (argtypes, restype), transcribed from Xen 4.17 ``tools/include/xenstore.h``.
SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "xs_open": ([c_ulong], _H),
    "xs_close": ([_H], None),
    "xs_read": ([_H, _T, c_char_p, POINTER(c_uint)], c_void_p),
    "xs_write": ([_H, _T, c_char_p, c_void_p, c_uint], c_bool),
    "xs_mkdir": ([_H, _T, c_char_p], c_bool),
    "xs_rm": ([_H, _T, c_char_p], c_bool),
    "xs_directory": ([_H, _T, c_char_p, POINTER(c_uint)], c_void_p),
    "xs_get_permissions": ([_H, _T, c_char_p, POINTER(c_uint)], c_void_p),
    "xs_set_permissions": ([_H, _T, c_char_p, POINTER(xs_permissions), c_uint], c_bool),
    "xs_watch": ([_H, c_char_p, c_char_p], c_bool),
    "xs_unwatch": ([_H, c_char_p, c_char_p], c_bool),
    "xs_fileno": ([_H], c_int),
    "xs_check_watch": ([_H], c_void_p),
    "xs_read_watch": ([_H, POINTER(c_uint)], c_void_p),
    "xs_transaction_start": ([_H], _T),
    "xs_transaction_end": ([_H, _T, c_bool], c_bool),
    "xs_get_domain_path": ([_H, c_uint], c_void_p),
    "xs_introduce_domain": ([_H, c_uint, c_ulong, c_uint], c_bool),
    "xs_release_domain": ([_H, c_uint], c_bool),
    "xs_is_domain_introduced": ([_H, c_uint], c_bool),
    # Pure helpers: callable without any xenstored, used by the host-side smoke tests
    # and for diagnostics in error messages.
    "xs_path_is_subpath": ([c_char_p, c_char_p], c_bool),
    "xs_daemon_socket": ([], c_char_p),
}

#: Symbols whose absence is tolerated (``load`` leaves them unset).
OPTIONAL = frozenset({
    "xs_introduce_domain",
    "xs_release_domain",
    "xs_is_domain_introduced",
    "xs_daemon_socket",
})


def _fail(func: Any) -> None:
    raise XenCallError.from_call(ctypes.get_errno() or _errno.EIO,
                                 getattr(func, "__name__", "libxenstore call"))


def check_false_errno(result: Any, func: Any, args: tuple) -> Any:
    """errcheck for ``bool f(...)`` returning false with errno set on failure."""
    if not result:
        _fail(func)
    return result


def check_xbt_null_errno(result: Any, func: Any, args: tuple) -> Any:
    """errcheck for ``xs_transaction_start``: ``XBT_NULL`` (0) with errno on failure."""
    if result == XBT_NULL:
        _fail(func)
    return result


#: name -> errcheck; every checker raises :class:`XenCallError` (an :class:`OSError`)
#: carrying the C errno. ``xs_check_watch`` fails with ``EAGAIN`` when no event is
#: pending -- callers treat that as "nothing yet". ``xs_is_domain_introduced`` has no
#: checker because ``false`` is a legitimate answer (clear errno first, inspect after).
ERROR_CHECKERS: dict[str, Callable[[Any, Any, tuple], Any]] = {
    "xs_open": check_null_errno,
    "xs_read": check_null_errno,
    "xs_write": check_false_errno,
    "xs_mkdir": check_false_errno,
    "xs_rm": check_false_errno,
    "xs_directory": check_null_errno,
    "xs_get_permissions": check_null_errno,
    "xs_set_permissions": check_false_errno,
    "xs_watch": check_false_errno,
    "xs_unwatch": check_false_errno,
    "xs_fileno": check_negative_errno,
    "xs_check_watch": check_null_errno,
    "xs_read_watch": check_null_errno,
    "xs_transaction_start": check_xbt_null_errno,
    "xs_transaction_end": check_false_errno,
    "xs_get_domain_path": check_null_errno,
    "xs_introduce_domain": check_false_errno,
    "xs_release_domain": check_false_errno,
}


# --- loading ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def libxenstore(libdir: str | None = None) -> LoadedLibrary:
    """Load (once per *libdir*) ``libxenstore.so.4`` with the prototypes above.

    *libdir* defaults to ``$XENPBR_LIBDIR``, else the linker search path (see
    :func:`xenpbr.ctypes_libxc._loader.load_library`, which also pre-loads
    ``libxentoolcore.so.1`` from *libdir*). Raises :class:`XenLibraryNotFound` when the
    library, or one of its non-:data:`OPTIONAL` symbols, is missing.
    """
    lib = load_library(LIBRARY, SIGNATURES, ERROR_CHECKERS, libdir)
    required_missing = sorted(set(lib.xenpbr_info.missing_symbols) - OPTIONAL)
    if required_missing:
        raise XenLibraryNotFound(
            f"{SONAME} at {lib.xenpbr_info.path} lacks {required_missing}: it is not a "
            "Xen 4.17-compatible libxenstore")
    return lib


def load(libdir: str | None = None) -> LoadedLibrary:
    """Same as :func:`libxenstore`, resolving ``$XENPBR_LIBDIR`` at call time."""
    return libxenstore(libdir or os.environ.get(LIBDIR_ENV) or None)


# --- libc free and result helpers ------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.free.argtypes = [c_void_p]
_libc.free.restype = None


def free(ptr: int | None) -> None:
    """libc ``free()`` for blocks returned by libxenstore (NULL is fine)."""
    if ptr:
        _libc.free(ptr)


def take_bytes(ptr: int, length: int) -> bytes:
    """Copy ``length`` bytes at ``ptr`` and free the block."""
    try:
        return ctypes.string_at(ptr, length)
    finally:
        free(ptr)


def take_cstring(ptr: int) -> bytes:
    """Copy a NUL-terminated string at ``ptr`` and free it."""
    try:
        return ctypes.string_at(ptr)
    finally:
        free(ptr)


def take_string_vector(ptr: int, count: int) -> list[bytes]:
    """Copy ``count`` strings from a ``char **`` allocated as one block
    (``xs_directory``, ``xs_check_watch``, ``xs_read_watch``) and free it once."""
    try:
        vec = ctypes.cast(ptr, POINTER(c_char_p))
        return [vec[i] for i in range(count)]
    finally:
        free(ptr)


def take_permissions(ptr: int, count: int) -> list[tuple[int, int]]:
    """Copy ``count`` ``struct xs_permissions`` as ``(id, perms)`` pairs and free them."""
    try:
        arr = ctypes.cast(ptr, POINTER(xs_permissions))
        return [(arr[i].id, arr[i].perms) for i in range(count)]
    finally:
        free(ptr)


def make_permissions(pairs: list[tuple[int, int]]) -> ctypes.Array:
    """Build a ``struct xs_permissions[]`` from ``(id, perms)`` pairs."""
    arr = (xs_permissions * len(pairs))()
    for i, (domid, perms) in enumerate(pairs):
        arr[i].id = domid
        arr[i].perms = perms
    return arr


# --- the connection handle ----------------------------------------------------------------


class LibxenstoreConnection(OwnedHandle):
    """One ``struct xs_handle`` from ``libxenstore.so.4`` (``lib`` is the loaded library).

    Opening raises :class:`OSError` when ``xs_open`` fails. libxenstore handles are
    thread-safe; a handle must not be used in a forked child. ``close()`` is idempotent
    and a forgotten handle is closed (with a logged warning) when garbage-collected.
    """

    _what = "xenstore"

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._adopt(lib.xs_close, lib.xs_open(0))
        self._fd: int | None = None

    def _live(self) -> Any:
        """The C handle; a closed handle is refused (never pass a dangling pointer)."""
        if self.closed:
            raise OSError(_errno.EBADF, "xenstore handle is closed")
        return self._handle

    def read(self, tx: int, path: bytes) -> bytes:
        n = c_uint(0)
        ptr = self._lib.xs_read(self._live(), tx, path, ctypes.byref(n))
        return take_bytes(ptr, n.value)

    def write(self, tx: int, path: bytes, data: bytes) -> None:
        self._lib.xs_write(self._live(), tx, path, data, len(data))

    def mkdir(self, tx: int, path: bytes) -> None:
        self._lib.xs_mkdir(self._live(), tx, path)

    def rm(self, tx: int, path: bytes) -> None:
        self._lib.xs_rm(self._live(), tx, path)

    def directory(self, tx: int, path: bytes) -> list[bytes]:
        n = c_uint(0)
        ptr = self._lib.xs_directory(self._live(), tx, path, ctypes.byref(n))
        return take_string_vector(ptr, n.value)

    def get_permissions(self, tx: int, path: bytes) -> list[tuple[int, int]]:
        n = c_uint(0)
        ptr = self._lib.xs_get_permissions(self._live(), tx, path, ctypes.byref(n))
        return take_permissions(ptr, n.value)

    def set_permissions(self, tx: int, path: bytes, perms: list[tuple[int, int]]) -> None:
        arr = make_permissions(perms)
        self._lib.xs_set_permissions(self._live(), tx, path, arr, len(perms))

    def watch(self, path: bytes, token: bytes) -> None:
        self._lib.xs_watch(self._live(), path, token)

    def unwatch(self, path: bytes, token: bytes) -> None:
        self._lib.xs_unwatch(self._live(), path, token)

    def fileno(self) -> int:
        if self._fd is None:
            self._fd = self._lib.xs_fileno(self._live())
        return self._fd

    def check_watch(self) -> tuple[bytes, bytes] | None:
        try:
            ptr = self._lib.xs_check_watch(self._live())
        except OSError as e:
            if e.errno in (_errno.EAGAIN, _errno.EWOULDBLOCK):
                return None
            raise
        path, token = take_string_vector(ptr, 2)
        return path, token

    def transaction_start(self) -> int:
        return int(self._lib.xs_transaction_start(self._live()))

    def transaction_end(self, tx: int, abort: bool) -> None:
        self._lib.xs_transaction_end(self._live(), tx, abort)

    def get_domain_path(self, domid: int) -> bytes:
        return take_cstring(self._lib.xs_get_domain_path(self._live(), domid))

    def _optional(self, name: str) -> Any:
        fn = getattr(self._lib, name, None)
        if fn is None:
            raise OSError(_errno.ENOSYS, f"{name} is not in this libxenstore")
        return fn

    def introduce_domain(self, domid: int, mfn: int, evtchn: int) -> None:
        self._optional("xs_introduce_domain")(self._live(), domid, mfn, evtchn)

    def release_domain(self, domid: int) -> None:
        self._optional("xs_release_domain")(self._live(), domid)

    def is_domain_introduced(self, domid: int) -> bool:
        fn = self._optional("xs_is_domain_introduced")
        ctypes.set_errno(0)
        if fn(self._live(), domid):
            return True
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
        return False
