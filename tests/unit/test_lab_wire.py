"""Control-channel framing: round trips, resynchronisation, bounds."""

from __future__ import annotations

import io
import struct

import pytest

from xenpbr_lab.wire import MAGIC, FrameError, FrameReader, encode


def reader_over(data: bytes, chunk: int = 7) -> FrameReader:
    stream = io.BytesIO(data)
    return FrameReader(lambda n: stream.read(min(n, chunk)))


def test_frames_round_trip_across_small_reads() -> None:
    data = encode({"id": 1, "op": "put"}, b"\x00" * 1000) + encode({"id": 2}, b"")
    r = reader_over(data)
    assert r.next_frame() == ({"id": 1, "op": "put"}, b"\x00" * 1000)
    assert r.next_frame() == ({"id": 2}, b"")
    assert r.next_frame() is None


def test_garbage_before_a_frame_is_skipped_and_counted() -> None:
    r = reader_over(b"noise-from-a-dead-peer" + encode({"id": 9}))
    assert r.next_frame() == ({"id": 9}, b"")
    assert r.resyncs > 0


def test_truncated_frame_is_end_of_stream_not_a_partial_frame() -> None:
    assert reader_over(encode({"id": 1}, b"abcdef")[:-2]).next_frame() is None


def test_oversized_announcement_is_refused() -> None:
    bogus = struct.pack(">4sII", MAGIC, 2**31, 0)
    with pytest.raises(FrameError, match="header"):
        reader_over(bogus).next_frame()


def test_non_json_header_is_refused() -> None:
    bogus = struct.pack(">4sII", MAGIC, 3, 0) + b"{x}"
    with pytest.raises(FrameError, match="not JSON"):
        reader_over(bogus).next_frame()
