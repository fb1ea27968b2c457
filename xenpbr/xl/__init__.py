"""The one adapter to Xen's ``xl`` command: every xl invocation in xenpbr goes through here.

Separate because xl is an external process with its own failure modes (missing binary,
non-zero exit, hangs, FIFOs that block until the other side opens them); keeping them in
one package means one place decides the exact argv, the timeouts and how a failure is
reported.

* :mod:`xenpbr.xl.errors` -- :class:`XlError` (a :class:`~xenpbr.errors.XenpbrError`)
  and its subclasses;
* :mod:`xenpbr.xl.commands` -- short synchronous commands: ``create`` (and its ``-N``
  dry run), ``destroy``, ``unpause``, ``list`` state letters, ``domid``, ``sysrq``;
* :mod:`xenpbr.xl.toolstack` -- :class:`XlToolstack`, recovery's toolstack over xl;
* :mod:`xenpbr.xl.fifo` -- long-running ``xl save``/``xl restore`` with a watchdog and
  the FIFO they stream through.
"""

from xenpbr.xl.errors import XlError, XlFailed, XlMissing

__all__ = ["XlError", "XlFailed", "XlMissing"]
