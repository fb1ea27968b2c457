"""The page-free stream model to JSON and back (xenpbr.images.skeleton)."""

from __future__ import annotations

import base64
import io
import json

import pytest

from tests.unit.streams import synth
from tests.unit.streams.handbuilt import build_model_by_hand
from xenpbr.images import skeleton
from xenpbr.images.skeleton import SkeletonError
from xenpbr.stream import (
    HvmContextRecord,
    HvmParamsRecord,
    InMemoryPages,
    read_stream,
    write_stream,
)


def roundtrip(data: bytes, fmt: str = "xl") -> None:
    pages = InMemoryPages()
    stream = read_stream(io.BytesIO(data), stream_format=fmt, on_page=pages.on_page)
    encoded, length = skeleton.encode(stream)
    assert length == len(data)
    decoded = skeleton.decode(encoded)
    out = io.BytesIO()
    write_stream(out, decoded, pages.get_page)
    assert out.getvalue() == data
    assert skeleton.data_page_count(decoded) == len(pages.pages)


def test_synthetic_streams_of_every_layering_round_trip() -> None:
    roundtrip(b"".join(synth.iter_pv_stream(synth.PvStreamSpec())))
    roundtrip(b"".join(synth.iter_pv_stream(synth.PvStreamSpec(with_xl=False))), "libxl")
    roundtrip(b"".join(synth.iter_pv_stream(
        synth.PvStreamSpec(with_xl=False, with_libxl=False))), "libxc")


def test_hand_built_model_and_hvm_records_survive() -> None:
    stream, _ = build_model_by_hand()
    records = stream.libxc.records
    records.insert(-1, HvmContextRecord(b"\x01\x02\x03"))
    records.insert(-1, HvmParamsRecord(((1, 2), (3, 4))))
    decoded = skeleton.decode(skeleton.encode(stream)[0])
    assert decoded.libxc.records[-3:-1] == records[-3:-1]
    assert decoded.libxc.record_names == stream.libxc.record_names
    assert decoded.xl_header == stream.xl_header


def test_embedded_config_gives_name_and_uuid() -> None:
    stream, _ = build_model_by_hand()
    assert skeleton.embedded_name_uuid(stream) == ("pbr-guest",
                                                   "6a1f2c3e-0d4b-4e5f-9a8b-7c6d5e4f3a2b")


def tampered(mutate) -> bytes:
    stream, _ = build_model_by_hand()
    tree = json.loads(skeleton.encode(stream)[0])
    mutate(tree)
    return json.dumps(tree).encode()


def libxc(tree):
    return tree["libxl"]["records"][0]["libxc"]


def bad_words(tree) -> None:
    rec = next(r for r in libxc(tree)["records"] if "words" in r)
    rec["words"] = base64.b64encode((0x0FF0_0000_0000_0001).to_bytes(8, "little")).decode()


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.update(version=2), "version"),
    (lambda t: t.update(format="libxc"), "inconsistent"),
    (lambda t: libxc(t)["image_header"].update(version=7), "unsupported version"),
    (lambda t: libxc(t)["domain_header"].update(page_shift=13), "page_shift"),
    (lambda t: libxc(t)["records"].pop(), "END"),
    (lambda t: libxc(t)["records"].insert(0, {"rtype": 0x7777, "body": ""}), "unknown mandatory"),
    (lambda t: libxc(t)["records"].insert(0, {"rtype": 2, "body": "AAAA"}), "length must be"),
    (lambda t: libxc(t)["records"].insert(0, {"rtype": 1, "body": ""}), "plain body"),
    (bad_words, "invalid pfn word"),
    (lambda t: libxc(t)["records"][0].update(body="%%%"), "base64"),
    (lambda t: t["libxl"]["records"].insert(0, {"rtype": 2, "libxc": {}}), "not LIBXC_CONTEXT"),
])
def test_invalid_skeletons_are_rejected(mutate, message) -> None:
    with pytest.raises(SkeletonError, match=message):
        skeleton.decode(tampered(mutate))


def test_not_json_is_rejected() -> None:
    with pytest.raises(SkeletonError, match="JSON"):
        skeleton.decode(b"\x80\x03cos\nsystem\n")  # a pickle is just bad JSON here
