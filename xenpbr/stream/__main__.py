"""``python -m xenpbr.stream FILE``: parse a captured stream and check the round trip.

A lab diagnostic, not part of the capture/restore path. It parses FILE (an
``xl save`` output by default), prints a summary, then regenerates the stream
and compares it byte for byte with FILE. The comparison is streamed: page
contents are spooled to a sparse temporary file indexed by pfn, and the output
is compared against FILE chunk by chunk, so memory stays small even for big
guests. Exit status: 0 identical, 1 parse error or mismatch.
"""

from __future__ import annotations

import argparse
import logging
import stat
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import BinaryIO

from xenpbr.stream import format as fmt
from xenpbr.stream.errors import MismatchError, StreamCodecError
from xenpbr.stream.model import Stream
from xenpbr.stream.reader import FORMATS, read_stream
from xenpbr.stream.writer import write_stream


class SparsePages:
    """Page spool in a temporary file at offset ``pfn * 4096``."""

    def __init__(self, spool: BinaryIO) -> None:
        self.spool = spool
        self.seen: set[int] = set()
        self.repeated = 0

    def on_page(self, pfn: int, type_bits: int, data: memoryview) -> None:
        self.repeated += pfn in self.seen
        self.seen.add(pfn)
        self.spool.seek(pfn * fmt.PAGE_SIZE)
        self.spool.write(data)

    def get_page(self, pfn: int) -> bytes:
        self.spool.seek(pfn * fmt.PAGE_SIZE)
        return self.spool.read(fmt.PAGE_SIZE)


class ComparingSink:
    """File-like sink that compares everything written with a reference file."""

    def __init__(self, reference: BinaryIO) -> None:
        self.reference = reference
        self.offset = 0

    def write(self, data: bytes) -> int:
        expected = self.reference.read(len(data))
        if expected != bytes(data):
            first = next((i for i, (a, b) in enumerate(zip(expected, data)) if a != b),
                         min(len(expected), len(data)))
            raise MismatchError(f"regenerated stream differs at offset {self.offset + first:#x}")
        self.offset += len(data)
        return len(data)

    def finish(self) -> None:
        if self.reference.read(1):
            raise MismatchError(f"regenerated stream ends early at offset {self.offset:#x}")


def summarise(stream: Stream, pages: SparsePages) -> list[str]:
    """Human-readable summary lines."""
    lines = [f"format: {stream.format}"]
    if stream.xl_header is not None:
        config = stream.xl_header.config_json
        lines.append(f"xl: flags {stream.xl_header.mandatory_flags:#x}, "
                     f"config {len(config) if config is not None else 'absent'} bytes")
    if stream.libxl is not None:
        lines.append(f"libxl records: {' '.join(stream.libxl.record_names)}")
    for image in stream.libxc_images:
        dh = image.domain_header
        lines.append(f"libxc v{image.image_header.version}: {dh.type_name} from Xen "
                     f"{dh.xen_major}.{dh.xen_minor}")
        batches = list(image.page_data_records())
        types = Counter(fmt.PAGE_TYPE_NAMES[e.type_bits] for b in batches for e in b)
        lines.append(f"PAGE_DATA: {len(batches)} records, batch sizes "
                     f"{sorted(Counter(b.count for b in batches).items())}, types {dict(types)}")
        lines.append("records: " + ", ".join(f"{n} x{c}" for n, c in
                                             Counter(image.record_names).items()))
    lines.append(f"distinct data pfns: {len(pages.seen)}, repeated: {pages.repeated}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m xenpbr.stream", description=__doc__.split("\n")[0])
    parser.add_argument("file", type=Path, help="captured stream (regular file)")
    parser.add_argument("-f", "--format", default="xl", choices=FORMATS)
    parser.add_argument("--no-roundtrip", action="store_true", help="only parse")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every record")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    roundtrip = not args.no_roundtrip and stat.S_ISREG(args.file.stat().st_mode)
    with tempfile.TemporaryFile() as spool, args.file.open("rb") as src:
        pages = SparsePages(spool)
        try:
            stream = read_stream(src, stream_format=args.format, on_page=pages.on_page)
        except StreamCodecError as err:
            print(f"PARSE ERROR: {err}", file=sys.stderr)
            return 1
        print("\n".join(summarise(stream, pages)))
        if roundtrip:
            return _check_roundtrip(args.file, stream, pages)
    return 0


def _check_roundtrip(path: Path, stream: Stream, pages: SparsePages) -> int:
    with path.open("rb") as reference:
        sink = ComparingSink(reference)
        try:
            write_stream(sink, stream, pages.get_page)  # type: ignore[arg-type]
            sink.finish()
        except MismatchError as err:
            hint = " (pfns repeat: expected for live-migration streams)" if pages.repeated else ""
            print(f"ROUND TRIP FAILED: {err}{hint}", file=sys.stderr)
            return 1
    print(f"round trip: byte-identical ({sink.offset} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
