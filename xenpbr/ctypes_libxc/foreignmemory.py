"""ctypes binding to libxenforeignmemory (Xen 4.17) and the :class:`ForeignMemory` class.

Prototypes come from ``tools/include/xenforeignmemory.h`` at RELEASE-4.17.7 (soname
``libxenforeignmemory.so.1``, library version 1.4 in Debian's 4.17.7 build). Behaviour
worth knowing, read from ``tools/libs/foreignmemory/{core,linux}.c``:

* With a non-NULL ``err[]`` the call may *partially* succeed: it returns a valid address
  and puts a per-page error in ``err[i]``. Linux's privcmd stores **negative** errno
  values there (``core.c`` does ``errno = -err[i]``); we take the absolute value.
* Pages whose ``err[i]`` is non-zero are not backed; touching them raises SIGBUS and kills
  the interpreter. That is why :class:`Mapping` refuses to hand out failed pages and why
  :meth:`ForeignMemory.map` unmaps and raises unless the caller asks for ``partial``.
* For a PV guest the frames are MFNs (machine frames); for HVM they are GFNs.
"""

from __future__ import annotations

import builtins
import ctypes
import errno as errno_mod
import functools
import logging
import mmap
import weakref
from collections.abc import Callable, Sequence
from ctypes import (
    POINTER,
    c_char,
    c_int,
    c_size_t,
    c_uint,
    c_uint16,
    c_uint32,
    c_void_p,
)
from typing import Any

from ._errcheck import (
    DomainNotFound,
    FrameMapError,
    XenCallError,
    check_negative_errno,
    check_null_errno,
)
from ._loader import (
    LibrarySpec,
    LoadedLibrary,
    OwnedHandle,
    explain_open_failure,
    load_library,
)
from .xenctrl_structs import xen_pfn_t

log = logging.getLogger(__name__)

LIBRARY = LibrarySpec("libxenforeignmemory.so.1", "libxenforeignmemory1")

XC_PAGE_SHIFT = 12
XC_PAGE_SIZE = 1 << XC_PAGE_SHIFT  # Xen's page size on x86, whatever the dom0 kernel uses


class XenForeignMemoryHandle(ctypes.Structure):
    """Opaque ``xenforeignmemory_handle``; only ever used by pointer."""


xenforeignmemory_handle_p = POINTER(XenForeignMemoryHandle)

SIGNATURES: dict[str, tuple[tuple[Any, ...], Any]] = {
    # xenforeignmemory_handle *xenforeignmemory_open(xentoollog_logger *, unsigned flags)
    "xenforeignmemory_open": ((c_void_p, c_uint), xenforeignmemory_handle_p),
    "xenforeignmemory_close": ((xenforeignmemory_handle_p,), c_int),
    # void *xenforeignmemory_map(h, uint32_t dom, int prot, size_t pages,
    #                            const xen_pfn_t arr[], int err[])
    "xenforeignmemory_map": (
        (xenforeignmemory_handle_p, c_uint32, c_int, c_size_t, POINTER(xen_pfn_t), POINTER(c_int)),
        c_void_p,
    ),
    "xenforeignmemory_unmap": ((xenforeignmemory_handle_p, c_void_p, c_size_t), c_int),
    "xenforeignmemory_restrict": ((xenforeignmemory_handle_p, c_uint16), c_int),
}

ERROR_CHECKERS = {
    "xenforeignmemory_open": check_null_errno,
    "xenforeignmemory_close": check_negative_errno,
    "xenforeignmemory_map": check_null_errno,
    "xenforeignmemory_unmap": check_negative_errno,
    "xenforeignmemory_restrict": check_negative_errno,
}


@functools.cache
def libxenforeignmemory(libdir: str | None = None) -> LoadedLibrary:
    """Load (once per *libdir*) libxenforeignmemory.so.1 with the prototypes above."""
    return load_library(LIBRARY, SIGNATURES, ERROR_CHECKERS, libdir)


def _unmap(unmap: Callable[[Any, int, int], Any], handle: Any, address: int, pages: int,
           finaliser: bool) -> None:
    if finaliser:
        log.warning("foreign mapping at %#x was not closed; unmapping in the finaliser", address)
    try:
        unmap(handle, address, pages)
    except OSError as exc:
        log.warning("xenforeignmemory_unmap(%#x, %d) failed: %s", address, pages, exc)


class Mapping:
    """Guest frames mapped contiguously into this process; always unmapped on close.

    Use as a context manager. ``memoryview`` is read-only unless the mapping is writable
    (writing a PROT_READ page would crash the process). Views must not outlive the
    mapping: after :meth:`close` the memory is gone, and slices taken from the view
    would point at unmapped memory.
    """

    def __init__(
        self,
        fmem: ForeignMemory,
        address: int,
        domid: int,
        frames: Sequence[int],
        writable: bool,
        errors: dict[int, int],
    ) -> None:
        self.domid = domid
        self.frames = tuple(frames)
        self.writable = writable
        self.errors = dict(errors)  # page index -> errno, for partial mappings
        self._fmem = fmem  # keeps the handle open while we live
        self.address = address
        size = len(self.frames) * XC_PAGE_SIZE
        view = memoryview((c_char * size).from_address(address)).cast("B")
        self._view = view if writable else view.toreadonly()
        self._unmap_args = (fmem.lib.xenforeignmemory_unmap, fmem._h(), address, len(self.frames))
        self._finalizer = weakref.finalize(self, _unmap, *self._unmap_args, True)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def memoryview(self) -> builtins.memoryview:
        """All pages as one view (only safe to touch pages not listed in ``errors``)."""
        if self.closed:
            raise ValueError("foreign mapping is closed")
        return self._view

    def page(self, index: int) -> builtins.memoryview:
        """The view of page *index*; raises :class:`FrameMapError` if it did not map."""
        if index in self.errors:
            raise FrameMapError(self.domid, self.frames[index], self.errors[index], index=index)
        start = index * XC_PAGE_SIZE
        return self.memoryview[start:start + XC_PAGE_SIZE]

    def close(self) -> None:
        """Unmap; idempotent."""
        if self._finalizer.detach() is None:
            return
        try:
            self._view.release()
        except BufferError:  # something still holds a buffer export of the view
            log.warning("unmapping %#x while its memoryview is still exported", self.address)
        _unmap(*self._unmap_args, False)

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _frame_error(domid: int, frames: Sequence[int], errors: dict[int, int]) -> XenCallError:
    """The exception for a mapping where some frames failed: name the first one."""
    if len(errors) == len(frames) and all(e == errno_mod.ESRCH for e in errors.values()):
        return DomainNotFound(domid, "every frame failed with ESRCH")
    index = min(errors)
    return FrameMapError(domid, frames[index], errors[index], index=index, failed=len(errors))


class ForeignMemory(OwnedHandle):
    """An open ``xenforeignmemory_handle*``: map other domains' frames into this process.

    *lib* lets tests substitute a fake library object (functions already error-checked).
    """

    _what = "xenforeignmemory"

    def __init__(self, lib: Any = None, *, libdir: str | None = None) -> None:
        self._lib = lib if lib is not None else libxenforeignmemory(libdir)
        try:
            handle = self._lib.xenforeignmemory_open(None, 0)
        except XenCallError as exc:
            raise explain_open_failure(exc, "xenforeignmemory_open") from exc
        self._adopt(self._lib.xenforeignmemory_close, handle)

    @property
    def lib(self) -> Any:
        return self._lib

    def map(
        self,
        domid: int,
        frames: Sequence[int],
        writable: bool = False,
        *,
        partial: bool = False,
    ) -> Mapping:
        """Map *frames* (MFNs for PV, GFNs for HVM) of *domid*, in order.

        A frame that fails raises :class:`FrameMapError` naming it (after unmapping the
        rest), unless *partial* is true: then the mapping is returned with the failed
        page indices in ``Mapping.errors`` and callers must skip them.
        """
        count = len(frames)
        if count == 0:
            raise ValueError("no frames to map")
        arr = (xen_pfn_t * count)(*frames)
        err = (c_int * count)()
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            address = self._lib.xenforeignmemory_map(self._h(), domid, prot, count, arr, err)
        except XenCallError as exc:
            if exc.errno == errno_mod.ESRCH:
                raise DomainNotFound(domid, "xenforeignmemory_map() returned ESRCH") from exc
            raise
        errors = {i: abs(e) for i, e in enumerate(err) if e}
        mapping = Mapping(self, address, domid, frames, writable, errors)
        if errors and not partial:
            mapping.close()
            raise _frame_error(domid, frames, errors)
        return mapping

    def restrict(self, domid: int) -> None:
        """Limit this handle to *domid* (defence in depth for long-lived handles)."""
        self._lib.xenforeignmemory_restrict(self._h(), domid)
