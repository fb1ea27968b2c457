"""Exceptions of the xl adapter.

Separate so that both halves of the adapter (:mod:`~xenpbr.xl.commands` and
:mod:`~xenpbr.xl.fifo`) and their callers share one hierarchy without importing each
other.
"""

from __future__ import annotations

from xenpbr.errors import XenpbrError

__all__ = ["XlError", "XlFailed", "XlMissing"]


class XlError(XenpbrError):
    """xl could not be run, or did not do what it was asked (e.g. it was started for a
    save or restore but never opened its end of the FIFO)."""


class XlMissing(XlError):
    """``xl`` (Xen's toolstack) is not installed or not on PATH."""


class XlFailed(XlError):
    """``xl`` refused the translated config or failed to create the domain."""

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode, self.stderr = returncode, stderr
