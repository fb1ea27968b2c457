""":class:`InProcessXl`: what xenpbrd would ask ``xl`` on a recovery's path to service
(a standby's rename, a restored domain's domid, Xen's free memory), asked of libxl in its
own process.

Why: under the lab's TCG an ``xl`` process costs more to start than its call (``xl
rename`` of a standby: about 0.4 s of a 1 s recovery). libxl is the library xl calls, so
its rules still hold. If libxl cannot be opened in-process (a library missing, Xen's
version not the one bound), each call runs the ``xl`` command as before, with one
warning at start: speed is lost, never a recovery.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from xenpbr.ctypes_libxc.libxl import LibxlContext
from xenpbr.errors import XenpbrError
from xenpbr.xl import commands

log = logging.getLogger(__name__)


class InProcessXl:
    """``rename``, ``domid`` and ``free_memory_mib`` through one
    :class:`~xenpbr.ctypes_libxc.libxl.LibxlContext`, or ``xl``."""

    def __init__(self, libdir: str | None = None,
                 xl: Sequence[str] = commands.XL) -> None:
        self.xl = xl
        self.context: LibxlContext | None = None
        try:
            self.context = LibxlContext(libdir)
        except (XenpbrError, OSError) as exc:
            log.warning("libxl not opened in xenpbrd (%s): renames run `xl rename`", exc)

    def rename(self, old: str, new: str) -> str | None:
        """Rename domain ``old`` to ``new``; None on success, else why not (as
        :func:`xenpbr.xl.commands.rename`)."""
        if self.context is None:
            return commands.rename(self.xl, old, new)
        try:
            domid = self.context.domid(old)
            if domid is None:
                return f"no domain is named {old}"
            self.context.rename(domid, old, new)
        except XenpbrError as exc:
            return str(exc)
        return None

    def domid(self, name: str) -> int | None:
        """The domid of domain ``name``, None if there is none (as
        :func:`xenpbr.xl.commands.domid`; a libxl failure asks xl)."""
        if self.context is not None:
            try:
                return self.context.domid(name)
            except XenpbrError as exc:
                log.warning("libxl_name_to_domid(%s) failed (%s); asking xl", name, exc)
        return commands.domid(self.xl, name)

    def free_memory_mib(self) -> int | None:
        """Xen's free memory in MiB, None if neither libxl nor xl could say (as
        :func:`xenpbr.xl.commands.free_memory_mib`)."""
        if self.context is not None:
            try:
                return self.context.free_memory_kib() // 1024
            except XenpbrError as exc:
                log.warning("libxl_get_free_memory failed (%s); asking xl", exc)
        return commands.free_memory_mib(self.xl)

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
            self.context = None

    def __enter__(self) -> InProcessXl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
