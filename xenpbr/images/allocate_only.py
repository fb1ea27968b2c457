"""When Xen may provide a restored guest's zero pages, and the check that it did.

A hot stream can leave a guest's zero pages to Xen (:mod:`xenpbr.stream.allocate_only`:
``xl restore`` allocates them and copies nothing), which takes most of the copying out
of a restore of a large, mostly idle guest. That is only correct if every page Xen
hands the new domain is zero. Xen 4.17 scrubs pages freed by a *dying* domain and
those it never scrubbed at boot before it hands them out, but not, by default, pages a
*running* domain gave back (ballooned out: "Normally we expect a domain to clear pages
before freeing them", ``free_domheap_pages``), and a debug build fills scrubbed pages
with ``0xc2``, not zero. So:

* :func:`trusted` says whether to write such streams: ``[hot-stream] xen_zero_pages``
  ``yes``/``no``, or ``auto`` (the default): yes when Xen's command line has
  ``scrub-domheap`` (Xen then scrubs every freed page) and not ``bootscrub=off``;
* a restore from such a stream checks a sample of those pages in the paused domain
  (:func:`first_nonzero`) before it can run; a non-zero page destroys the domain,
  turns the streams off for this process (:func:`distrust`) and restores from the page
  store instead (:mod:`.restore`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

from xenpbr import settings
from xenpbr.images.pagestore import ZERO_PAGE
from xenpbr.xl import commands

_LOG = logging.getLogger(__name__)

#: How many of the pages left to Xen a restore reads back before the domain may run.
SAMPLE = 64

#: ``guest_pages(domid, pfns)``: copies of a domain's pages (xenpbrd's libxc reader).
GuestPages = Callable[[int, Sequence[int]], list[bytes]]

_distrusted: list[str] = []


def scrubs_freed_pages(cmdline: str) -> bool:
    """True if Xen's command line makes it scrub every page it frees (``scrub-domheap``,
    bare or true) and does not skip scrubbing free memory at boot (``bootscrub``)."""
    options = dict(word.partition("=")[::2] for word in cmdline.split())
    false = {"0", "no", "false", "off", "disable"}
    if "scrub-domheap" not in options or options["scrub-domheap"].lower() in false \
            or "no-scrub-domheap" in options:
        return False
    return options.get("bootscrub", "").lower() not in false and "no-bootscrub" not in options


@functools.lru_cache(maxsize=1)
def _xen_commandline() -> str | None:
    return commands.xen_commandline(commands.XL)


def trusted() -> bool:
    """Whether to write hot streams that leave zero pages to Xen (module doc)."""
    if _distrusted:
        return False
    asked = settings.current().xen_zero_pages
    if asked != "auto":
        return asked == "yes"
    cmdline = _xen_commandline()
    return cmdline is not None and scrubs_freed_pages(cmdline)


def distrust(reason: str) -> None:
    """Stop writing such streams in this process (a restore found a non-zero page)."""
    _LOG.error("Xen handed a restored domain a non-zero page it was to allocate zeroed "
               "(%s): hot streams keep their zero pages from now on; set "
               "%s = no, or give Xen scrub-domheap", reason, settings.hint("xen_zero_pages"))
    _distrusted.append(reason)


def sample(pfns: Sequence[int], size: int = SAMPLE) -> list[int]:
    """Up to ``size`` of ``pfns`` spread evenly over them, first and last included."""
    if len(pfns) <= size:
        return list(pfns)
    step = (len(pfns) - 1) / (size - 1)
    return [pfns[round(i * step)] for i in range(size)]


def first_nonzero(guest_pages: GuestPages, domid: int, pfns: Sequence[int]) -> int | None:
    """The first of ``pfns`` whose page in domain ``domid`` is not all zero, or None."""
    for pfn, page in zip(pfns, guest_pages(domid, pfns)):
        if page != ZERO_PAGE:
            return pfn
    return None
