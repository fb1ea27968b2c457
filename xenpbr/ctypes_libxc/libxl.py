"""ctypes binding for the few calls of libxl (``libxenlight.so.4.17``) xenpbrd makes in-process.

Why in-process: each ``xl`` command is a process that loads libxl and opens its handles
(xenstore, privcmd, event channels) before doing its one thing; under the lab's TCG
that start costs more than the call (``xl rename`` of a standby took about 0.4 s on a
recovery's path to service). A :class:`LibxlContext` opened once by xenpbrd makes the
same library calls xl would (``libxl_domain_rename``, ``libxl_name_to_domid``,
``libxl_get_free_memory`` as ``xl info`` reports it), on the
same libxl, so the toolstack's own rules (unique names, the ``/vm`` entry) still apply.

Only calls that never fork are bound: libxl runs hotplug scripts as children for device
work (destroy, create) and then wants to own ``SIGCHLD``, which a Python process that
also runs subprocesses must not give it; those stay ``xl`` commands.

Tables in the style of the other modules here (:data:`SIGNATURES`); libxl returns its
own negative error codes (``libxl_error`` in ``libxl_types.idl``), not errno values, so
failures are :class:`LibxlCallFailed` naming the code.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, byref, c_char_p, c_int, c_uint, c_uint32, c_uint64, c_void_p

from xenpbr.errors import XenpbrError

from ._loader import LibrarySpec, LoadedLibrary, Signatures, load_library

LIBRARY = LibrarySpec("libxenlight.so.4.17", "libxenmisc4.17")
TOOLLOG = LibrarySpec("libxentoollog.so.1", "libxentoollog1")

LIBXL_VERSION = 0  #: ``LIBXL_VERSION`` of libxl.h: the only value libxl_ctx_alloc takes
XTL_ERROR = 8  #: ``xentoollog_level``: log errors only (xenpbrd reports the rest)
ERROR_INVAL = -6  #: ``libxl_name_to_domid``'s answer for "no domain of that name"

SIGNATURES: Signatures = {
    "libxl_ctx_alloc": ([POINTER(c_void_p), c_int, c_uint, c_void_p], c_int),
    "libxl_ctx_free": ([c_void_p], c_int),
    "libxl_domain_rename": ([c_void_p, c_uint32, c_char_p, c_char_p], c_int),
    "libxl_name_to_domid": ([c_void_p, c_char_p, POINTER(c_uint32)], c_int),
    "libxl_error_to_string": ([c_int], c_char_p),
    "libxl_get_free_memory": ([c_void_p, POINTER(c_uint64)], c_int),
}
TOOLLOG_SIGNATURES: Signatures = {
    "xtl_createlogger_stdiostream": ([c_void_p, c_int, c_uint], c_void_p),
    "xtl_logger_destroy": ([c_void_p], None),
}


class LibxlCallFailed(XenpbrError):
    """A libxl call returned an error code."""

    def __init__(self, function: str, code: int, name: str | None) -> None:
        self.function, self.code = function, code
        super().__init__(f"{function} failed: libxl error {code}"
                         + (f" ({name})" if name else ""))


class LibxlContext:
    """One ``libxl_ctx`` (with its stderr logger), for the process's lifetime or a
    ``with`` block. Thread-safe as libxl is (it serialises on the context's lock)."""

    def __init__(self, libdir: str | None = None) -> None:
        self._toollog: LoadedLibrary = load_library(TOOLLOG, TOOLLOG_SIGNATURES, {}, libdir)
        self._lib: LoadedLibrary = load_library(LIBRARY, SIGNATURES, {}, libdir)
        stderr = c_void_p.in_dll(ctypes.CDLL(None), "stderr")
        self._logger = self._toollog.xtl_createlogger_stdiostream(stderr, XTL_ERROR, 0)
        if not self._logger:
            raise LibxlCallFailed("xtl_createlogger_stdiostream", -1, "no logger")
        ctx = c_void_p()
        rc = self._lib.libxl_ctx_alloc(byref(ctx), LIBXL_VERSION, 0, self._logger)
        if rc != 0 or not ctx:
            self._toollog.xtl_logger_destroy(self._logger)
            raise self._failed("libxl_ctx_alloc", rc)
        self._ctx: c_void_p | None = ctx

    def _failed(self, function: str, rc: int) -> LibxlCallFailed:
        name = None
        if hasattr(self._lib, "libxl_error_to_string"):
            raw = self._lib.libxl_error_to_string(rc)
            name = raw.decode(errors="replace") if raw else None
        return LibxlCallFailed(function, rc, name)

    @property
    def ctx(self) -> c_void_p:
        if self._ctx is None:
            raise LibxlCallFailed("libxl (context closed)", -3, None)
        return self._ctx

    def rename(self, domid: int, old: str, new: str) -> None:
        """``libxl_domain_rename``: ``domid``, which must be named ``old``, becomes ``new``
        (refused if another domain has that name)."""
        rc = self._lib.libxl_domain_rename(self.ctx, domid, old.encode(), new.encode())
        if rc != 0:
            raise self._failed("libxl_domain_rename", rc)

    def domid(self, name: str) -> int | None:
        """``libxl_name_to_domid``: the domid of domain ``name``, None if none has it."""
        found = c_uint32()
        rc = self._lib.libxl_name_to_domid(self.ctx, name.encode(), byref(found))
        if rc == ERROR_INVAL:
            return None
        if rc != 0:
            raise self._failed("libxl_name_to_domid", rc)
        return found.value

    def free_memory_kib(self) -> int:
        """``libxl_get_free_memory``: Xen's free memory in KiB (free and still-to-scrub
        pages, as ``xl info``'s ``free_memory``)."""
        found = c_uint64()
        rc = self._lib.libxl_get_free_memory(self.ctx, byref(found))
        if rc != 0:
            raise self._failed("libxl_get_free_memory", rc)
        return found.value

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.libxl_ctx_free(self._ctx)
            self._ctx = None
            self._toollog.xtl_logger_destroy(self._logger)

    def __enter__(self) -> LibxlContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
