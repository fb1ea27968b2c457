"""Translate libxenctrl / libxenforeignmemory C error conventions into exceptions.

The Xen tool libraries report failure the POSIX way: ``-1`` (or a null pointer) with
``errno`` set. ctypes would silently hand those values back to Python, so every bound
function gets one of the checkers below as its ``errcheck``. The checkers are deliberately
policy-free: they never retry, never log and never guess what an errno *means* for the
caller; they only turn "the call failed" into an :class:`OSError` subclass carrying the
errno and the C function's name. Deciding that ``ESRCH`` means "the domain vanished" is
the job of the Pythonic classes in :mod:`.xenctrl` and :mod:`.foreignmemory`.

The exception types shared by both libraries live here too, so that neither module has to
import the other to raise or catch them.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
from collections.abc import Callable
from typing import Any

from xenpbr.errors import XenpbrError

# ctypes passes (result, function, arguments) to an errcheck callable.
ErrorChecker = Callable[[Any, Any, tuple], Any]


class XenCallError(XenpbrError, OSError):
    """A libxenctrl / libxenforeignmemory call failed; ``errno`` says why.

    Being an :class:`OSError` lets callers use the familiar ``exc.errno`` test, and
    being a :class:`XenpbrError` lets an operator tool catch all deliberate xenpbr errors.
    """

    def __init__(self, errno: int, message: str, function: str | None = None) -> None:
        super().__init__(errno, message)
        self.function = function

    @classmethod
    def from_call(cls, errno: int, function: str) -> XenCallError:
        """Build the error for C *function* having failed with *errno*."""
        return cls(errno, f"{function}() failed: {os.strerror(errno)}", function)


class XenUnavailable(XenCallError):
    """The Xen control interface cannot be opened from this process at all."""


class XenNotRunning(XenUnavailable):
    """This kernel is not running on the Xen hypervisor (or is not a Xen guest)."""


class PrivcmdUnavailable(XenUnavailable):
    """Xen runs, but the privcmd device (``/dev/xen/privcmd``) is not available."""


class NotPrivileged(XenUnavailable):
    """The privcmd device exists but this process may not open or use it."""


class DomainNotFound(XenCallError):
    """The domain does not exist, or vanished while we were talking about it."""

    def __init__(self, domid: int, detail: str = "") -> None:
        why = f" ({detail})" if detail else ""
        super().__init__(
            errno_mod.ESRCH,
            f"domain {domid} does not exist{why}: check `xl list`; it may have been "
            "destroyed or rebooted under a new domid",
        )
        self.domid = domid


class FrameMapError(XenCallError):
    """One guest frame could not be foreign-mapped (bad frame, ballooned out, paged...)."""

    def __init__(
        self,
        domid: int,
        frame: int,
        errno: int,
        *,
        index: int | None = None,
        failed: int = 1,
        pfn: int | None = None,
    ) -> None:
        where = f" (pfn {pfn:#x})" if pfn is not None else ""
        more = f"; {failed - 1} other frame(s) also failed" if failed > 1 else ""
        super().__init__(
            errno,
            f"cannot map frame {frame:#x}{where} of domain {domid}: "
            f"{os.strerror(errno)}{more}",
            "xenforeignmemory_map",
        )
        self.domid = domid
        self.frame = frame
        self.index = index
        self.failed = failed
        self.pfn = pfn


def _errno_for(result: int) -> int:
    """Pick the errno for a negative *result*.

    libxc's contract is ``-1`` plus ``errno``, but a few paths (e.g. ``xc_version``'s
    argument checks) return ``-errno`` directly without touching errno. When errno is
    unset we fall back to EIO rather than inventing a misleading code.
    """
    if result < -1:
        return -result
    return ctypes.get_errno() or errno_mod.EIO


def check_negative_errno(result: int, func: Any, args: tuple) -> int:
    """errcheck for ``int f(...)`` returning a negative value on failure."""
    if result is not None and result < 0:
        raise XenCallError.from_call(_errno_for(result), func.__name__)
    return result


def check_null_errno(result: Any, func: Any, args: tuple) -> Any:
    """errcheck for ``T *f(...)`` returning NULL with errno set on failure."""
    if not result:
        raise XenCallError.from_call(ctypes.get_errno() or errno_mod.EIO, func.__name__)
    return result
