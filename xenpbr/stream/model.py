"""The structured, page-data-free form of a save stream.

A :class:`Stream` holds everything needed to regenerate the input byte for
byte except page contents: the xl header (with the config blob), the libxl
header and records, and, inside the libxl LIBXC_CONTEXT record, the libxc image
(:class:`LibxcImage`: image header, domain header, records). PAGE_DATA records
keep their exact pfn/type words (and hence batch sizes); contents are handed to
an ``on_page`` visitor when reading and pulled from ``get_page`` when writing.
Layering follows libxl-migration-stream.pandoc ("LIBXC_CONTEXT") and the
``-f xl|libxl|libxc`` formats of Xen's ``verify-stream-v2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from xenpbr.stream import format as fmt
from xenpbr.stream.codec import Record
from xenpbr.stream.headers import DomainHeader, ImageHeader, LibxlHeader, XlHeader

if TYPE_CHECKING:
    from xenpbr.stream.libxc_records import PageDataRecord


@dataclass(slots=True)
class LibxcImage:
    """A libxc image: headers plus records in stream order, ending with END."""

    image_header: ImageHeader
    domain_header: DomainHeader
    records: list[Record] = field(default_factory=list)

    def page_data_records(self) -> Iterator[PageDataRecord]:
        """The PAGE_DATA records, in order."""
        return (r for r in self.records if r.rtype == fmt.REC_PAGE_DATA)  # type: ignore[misc]

    def records_of(self, rtype: int) -> list[Record]:
        """All records of one type, in order."""
        return [r for r in self.records if r.rtype == rtype]

    @property
    def record_names(self) -> list[str]:
        """Spec names of the records, in order (handy in logs and tests)."""
        return [fmt.libxc_record_name(r.rtype) for r in self.records]


@dataclass(slots=True)
class LibxlStream:
    """A libxl stream: header plus records; LIBXC_CONTEXT records carry an image."""

    header: LibxlHeader
    records: list[Record] = field(default_factory=list)

    @property
    def record_names(self) -> list[str]:
        """Spec names of the records, in order."""
        return [fmt.libxl_record_name(r.rtype) for r in self.records]


@dataclass(slots=True)
class Stream:
    """A whole stream. Exactly one of ``libxl`` / ``bare_libxc`` is set;
    ``xl_header`` is set for ``xl save`` files (format ``"xl"``)."""

    xl_header: XlHeader | None = None
    libxl: LibxlStream | None = None
    bare_libxc: LibxcImage | None = None

    @property
    def format(self) -> str:
        """``"xl"``, ``"libxl"`` or ``"libxc"`` (names as in verify-stream-v2 -f)."""
        if self.xl_header is not None:
            return "xl"
        return "libxl" if self.libxl is not None else "libxc"

    @property
    def libxc_images(self) -> list[LibxcImage]:
        """Every libxc image in the stream (one for a plain ``xl save``)."""
        if self.libxl is None:
            return [self.bare_libxc] if self.bare_libxc is not None else []
        return [r.image for r in self.libxl.records if r.rtype == fmt.LIBXL_REC_LIBXC_CONTEXT]  # type: ignore[attr-defined]

    @property
    def libxc(self) -> LibxcImage:
        """The single libxc image; raises ValueError if there is not exactly one."""
        images = self.libxc_images
        if len(images) != 1:
            raise ValueError(f"stream has {len(images)} libxc images, expected 1")
        return images[0]


class InMemoryPages:
    """Page store for tests and tiny guests: ``on_page`` in, ``get_page`` out.

    Keyed by pfn, so a pfn sent twice (live migration only) keeps its last
    contents. Do not use it for real guests: it holds every page in memory.
    """

    def __init__(self) -> None:
        self.pages: dict[int, bytes] = {}
        self.types: dict[int, int] = {}

    def on_page(self, pfn: int, type_bits: int, data: memoryview) -> None:
        """Reader callback: copy the page."""
        self.pages[pfn] = bytes(data)
        self.types[pfn] = type_bits

    def get_page(self, pfn: int) -> bytes:
        """Writer callback: return the stored page."""
        return self.pages[pfn]
