"""Allocate-only pages: a stream whose zero pages Xen provides instead of the stream.

Why: a guest's memory is mostly zero pages when it is imaged early (at 1.7 GB a
freshly booted guest's stream carries about 1.6 GB of zeros), and ``xl restore`` maps
and copies every one of them into the new domain. The migration stream has a page type
for a pfn the restore must allocate but not fill: ``XALLOC`` ("Allocate only",
libxc-migration-stream.pandoc: "PFNs with type BROKEN, XALLOC, or XTAB do not have any
corresponding page_data"). Xen 4.17's restore populates such a pfn
(``page_type_to_populate`` in ``tools/libs/guest/xg_sr_common.h``) and never writes it
(``page_type_has_stream_data``), and Xen's own ``verify-stream-v2`` accepts it. The page
then holds what Xen handed out: zeros only where Xen scrubs what it hands out, which
the caller must establish (:mod:`xenpbr.images.allocate_only`).

Only plain pages (``NOTAB``) are turned: a page table's type is what the restore
localises and pins, so a zero page table keeps its data. Nothing else of the stream
changes; records other than PAGE_DATA are shared with the original.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from xenpbr.stream import format as fmt
from xenpbr.stream.codec import Record
from xenpbr.stream.libxc_records import PageDataRecord
from xenpbr.stream.libxl_records import LibxcContextRecord
from xenpbr.stream.model import LibxcImage, LibxlStream, Stream

_XALLOC_BITS = fmt.PAGE_TYPE_XALLOC << fmt.PAGE_DATA_TYPE_SHIFT


class _Turner:
    """Walks the data pages in stream order with one flag each, recording what it kept."""

    def __init__(self, chosen: Iterable[bool]) -> None:
        self.chosen = list(chosen)
        self.kept: list[bool] = []

    def _flags(self, count: int) -> list[bool]:
        start = len(self.kept)
        flags = self.chosen[start:start + count]
        if len(flags) != count:
            raise ValueError(f"fewer flags than data pages (ran out at {len(self.chosen)})")
        return flags

    def record(self, rec: PageDataRecord) -> PageDataRecord:
        words = rec.words
        if max(words) <= fmt.PAGE_DATA_PFN_MASK:  # all plain pages with data: the usual
            flags = self._flags(len(words))
            self.kept.extend(not f for f in flags)
            return PageDataRecord(array("Q", [_XALLOC_BITS | w if f else w
                                              for w, f in zip(words, flags)]))
        turned = array("Q", words)
        shift = fmt.PAGE_DATA_TYPE_SHIFT
        for i, word in enumerate(words):
            type_bits = word >> shift
            if not fmt.page_type_has_data(type_bits):
                continue
            turn = self._flags(1)[0] and type_bits == fmt.PAGE_TYPE_NOTAB
            if turn:
                turned[i] = _XALLOC_BITS | word
            self.kept.append(not turn)
        return PageDataRecord(turned)

    def image(self, image: LibxcImage) -> LibxcImage:
        records: list[Record] = [self.record(r) if isinstance(r, PageDataRecord) else r
                                 for r in image.records]
        return LibxcImage(image.image_header, image.domain_header, records)

    def libxl(self, libxl: LibxlStream) -> LibxlStream:
        records: list[Record] = [LibxcContextRecord(self.image(r.image))
                                 if isinstance(r, LibxcContextRecord) else r
                                 for r in libxl.records]
        return LibxlStream(libxl.header, records)


def allocate_only(stream: Stream, chosen: Iterable[bool]) -> tuple[Stream, list[bool]]:
    """A copy of ``stream`` in which each data page flagged in ``chosen`` (one flag per
    data-carrying page, in stream order) that is a plain page becomes allocate-only.

    Returns the copy and, per data page of the original, whether it still carries data
    (False: turned; the pfns of those pages are what Xen must provide zeroed).

    :raises ValueError: ``chosen`` has fewer or more flags than the stream has data pages.
    """
    turner = _Turner(chosen)
    turned = Stream(
        xl_header=stream.xl_header,
        libxl=None if stream.libxl is None else turner.libxl(stream.libxl),
        bare_libxc=None if stream.bare_libxc is None else turner.image(stream.bare_libxc))
    if len(turner.chosen) != len(turner.kept):
        raise ValueError(f"more flags than the stream's {len(turner.kept)} data pages")
    return turned, turner.kept
