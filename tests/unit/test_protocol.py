"""Dom0's side of the phase protocol against hostile input (xenpbr/guestproto/).

Every bad request must be refused with the documented reason, counted, and never raise
anything but RequestRefused; dom0's writes must stay inside the domain's control/xenpbr.
"""

from __future__ import annotations

import json
import logging
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpbr.errors import XenpbrError
from xenpbr.guestproto import control, wire
from xenpbr.guestproto.control import (
    PhaseProtocol,
    ack_path,
    control_path,
    domid_from_token,
    prepare_domain,
    request_path,
    request_watch,
)
from xenpbr.guestproto.gate import Outcome, RateLimit, RequestGate, TokenBucket
from xenpbr.guestproto.request import encode_request, parse_request
from xenpbr.guestproto.wire import (
    MAX_REQUEST_BYTES,
    REFUSAL_REASONS,
    Ack,
    AckMalformed,
    BoundaryRequest,
    DiskState,
    RequestRefused,
    Verdict,
    VerdictKind,
    parse_agent_presence,
)
from xenpbr.xenstore import Access, FakeXenstoreServer, PermissionDenied

DOMID = 7


def good(**overrides) -> dict:
    doc = {"v": 1, "seq": 3, "phase": "services", "phases": ["kernel", "services", "app"],
           "identity": "2026-11-23.1", "wait": 120,
           "disks": [{"dev": "xvda", "mount": "/", "rw": True}],
           "services": ["sshd", "cron"], "hazards": []}
    doc.update(overrides)
    return doc


def raw(doc: object) -> bytes:
    return json.dumps(doc).encode()


def without(key: str) -> bytes:
    doc = good()
    del doc[key]
    return raw(doc)


def reason_of(data: bytes) -> str:
    with pytest.raises(RequestRefused) as info:
        parse_request(data)
    return info.value.reason


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- parsing ---------------------------------------------------------------------------------


def test_good_request_parses_to_a_frozen_dataclass() -> None:
    req = parse_request(raw(good()))
    assert req == BoundaryRequest(3, "services", ("kernel", "services", "app"), "2026-11-23.1",
                                  120, (DiskState("xvda", "/", True),), ("sshd", "cron"), ())
    assert req.phase_index == 1 and not req.is_last_phase
    with pytest.raises(AttributeError):
        req.seq = 4  # type: ignore[misc]


def test_encode_request_round_trips_and_self_checks() -> None:
    req = parse_request(raw(good()))
    assert parse_request(encode_request(req)) == req
    with pytest.raises(RequestRefused):
        encode_request(BoundaryRequest(1, "a/b", ("a/b",), "x", 1))


HOSTILE = [
    # size, encoding, syntax
    ("oversized", b"{" + b" " * MAX_REQUEST_BYTES + b"}", "bad-request:size"),
    ("10k-element list", raw(good(services=["s"] * 10_000)), "bad-request:size"),
    ("empty", b"", "bad-request:json"),
    ("not utf-8", b'{"v": 1, "phase": "\xff\xfe"}', "bad-request:encoding"),
    ("utf-16", json.dumps(good()).encode("utf-16"), "bad-request:encoding"),
    ("utf-8 BOM", b"\xef\xbb\xbf" + raw(good()), "bad-request:json"),
    ("garbage", b"\x00\x01\x02 not json", "bad-request:json"),
    ("trailing junk", raw(good()) + b" x", "bad-request:json"),
    ("NUL after object", raw(good()) + b"\x00", "bad-request:json"),
    ("nested list bomb", b"[" * 900 + b"]" * 900, "bad-request:json"),
    ("nested object bomb", b'{"a":' * 300 + b"1" + b"}" * 300, "bad-request:json"),
    ("bomb inside a field", raw(good(services=[[[["x"]]]])), "bad-request:json"),
    ("NaN", raw(good()).replace(b'"seq": 3', b'"seq": NaN'), "bad-request:json"),
    ("Infinity", raw(good()).replace(b'"seq": 3', b'"seq": -Infinity'), "bad-request:json"),
    ("unterminated string", b'{"v": 1, "phase": "kern', "bad-request:json"),
    ("raw control char in string", b'{"phase": "ke\x01rnel"}', "bad-request:json"),
    # shape
    ("list", b"[1, 2, 3]", "bad-request:not-object"),
    ("string", b'"services"', "bad-request:not-object"),
    ("number", b"3", "bad-request:not-object"),
    ("null", b"null", "bad-request:not-object"),
    ("duplicate key", b'{"v": 1, "seq": 3, "seq": 4}', "bad-request:duplicate-key"),
    ("duplicate key in disk", raw(good()).replace(b'"rw": true', b'"rw": true, "rw": false'),
     "bad-request:duplicate-key"),
    ("unknown key", raw(good(path="/etc/passwd")), "bad-request:unknown-key"),
    ("unknown unicode key", raw(good(sеq=1)), "bad-request:unknown-key"),
    # v
    ("missing v", without("v"), "bad-request:v"),
    ("v 2", raw(good(v=2)), "bad-request:v"),
    ("v string", raw(good(v="1")), "bad-request:v"),
    ("v true", raw(good(v=True)), "bad-request:v"),
    # seq
    ("missing seq", without("seq"), "bad-request:seq"),
    ("seq 0", raw(good(seq=0)), "bad-request:seq"),
    ("seq negative", raw(good(seq=-1)), "bad-request:seq"),
    ("seq 2**31", raw(good(seq=2**31)), "bad-request:seq"),
    ("seq huge", raw(good(seq=10**600)), "bad-request:seq"),
    ("seq float", raw(good(seq=3.0)), "bad-request:seq"),
    ("seq 1e400", raw(good()).replace(b'"seq": 3', b'"seq": 1e400'), "bad-request:seq"),
    ("seq bool", raw(good(seq=True)), "bad-request:seq"),
    ("seq string", raw(good(seq="3")), "bad-request:seq"),
    ("seq null", raw(good(seq=None)), "bad-request:seq"),
    # phase names
    ("missing phase", without("phase"), "bad-request:phase"),
    ("phase with /", raw(good(phase="a/b", phases=["a/b"])), "bad-request:phase"),
    ("phase ..", raw(good(phase="..", phases=[".."])), "bad-request:phase"),
    ("phase ../etc", raw(good(phase="../etc")), "bad-request:phase"),
    ("phase with NUL", raw(good(phase="kernel\x00x")), "bad-request:phase"),
    ("phase with newline", raw(good(phase="kernel\n")), "bad-request:phase"),
    ("phase with dot", raw(good(phase="k.v")), "bad-request:phase"),
    ("phase uppercase", raw(good(phase="Kernel")), "bad-request:phase"),
    ("phase empty", raw(good(phase="")), "bad-request:phase"),
    ("phase too long", raw(good(phase="a" * 33)), "bad-request:phase"),
    ("phase fullwidth", raw(good(phase="\uff4b\uff45\uff52")), "bad-request:phase"),
    ("phase cyrillic", raw(good(phase="s\u0435rvices")), "bad-request:phase"),
    ("phase rtl override", raw(good(phase="a\u202eb")), "bad-request:phase"),
    ("phase lone surrogate", raw(good()).replace(b'"phase": "services"',
                                                  b'"phase": "\\ud800"'), "bad-request:phase"),
    ("phase number", raw(good(phase=1)), "bad-request:phase"),
    ("phase list", raw(good(phase=["services"])), "bad-request:phase"),
    ("phase not declared", raw(good(phase="app2")), "unknown-phase"),
    # phases
    ("missing phases", without("phases"), "bad-request:phases"),
    ("phases empty", raw(good(phase="x", phases=[])), "bad-request:phases"),
    ("phases 9", raw(good(phase="p0", phases=[f"p{i}" for i in range(9)])), "bad-request:phases"),
    ("phases duplicate", raw(good(phases=["services", "services"])), "bad-request:phases"),
    ("phases bad name", raw(good(phases=["services", "../x"])), "bad-request:phases"),
    ("phases string", raw(good(phases="services")), "bad-request:phases"),
    ("phases object", raw(good(phases={"services": 1})), "bad-request:phases"),
    # identity
    ("missing identity", without("identity"), "bad-request:identity"),
    ("identity with /", raw(good(identity="a/b")), "bad-request:identity"),
    ("identity too long", raw(good(identity="a" * 65)), "bad-request:identity"),
    ("identity int", raw(good(identity=5)), "bad-request:identity"),
    # wait
    ("missing wait", without("wait"), "bad-request:wait"),
    ("wait 0", raw(good(wait=0)), "bad-request:wait"),
    ("wait float", raw(good(wait=1.5)), "bad-request:wait"),
    ("wait a year", raw(good(wait=365 * 86400)), "bad-request:wait"),
    # disks
    ("missing disks", without("disks"), "bad-request:disks"),
    ("disks 17", raw(good(disks=[{"dev": "xvda", "mount": "/", "rw": True}] * 17)),
     "bad-request:disks"),
    ("disk extra key", raw(good(disks=[{"dev": "xvda", "mount": "/", "rw": True, "x": 1}])),
     "bad-request:disks"),
    ("disk missing key", raw(good(disks=[{"dev": "xvda", "mount": "/"}])), "bad-request:disks"),
    ("disk rw int", raw(good(disks=[{"dev": "xvda", "mount": "/", "rw": 1}])),
     "bad-request:disks"),
    ("disk dev path", raw(good(disks=[{"dev": "../sda", "mount": "/", "rw": True}])),
     "bad-request:disks"),
    ("disk mount relative", raw(good(disks=[{"dev": "xvda", "mount": "mnt", "rw": True}])),
     "bad-request:disks"),
    ("disk mount with space", raw(good(disks=[{"dev": "xvda", "mount": "/a b", "rw": True}])),
     "bad-request:disks"),
    ("disk not object", raw(good(disks=["xvda"])), "bad-request:disks"),
    # services, hazards
    ("missing services", without("services"), "bad-request:services"),
    ("services 65", raw(good(services=[f"s{i}" for i in range(65)])), "bad-request:services"),
    ("services 300 in 1.7 KB", raw(good(services=["s"] * 300)), "bad-request:services"),
    ("service with /", raw(good(services=["../../bin/sh"])), "bad-request:services"),
    ("service with space", raw(good(services=["rm -rf"])), "bad-request:services"),
    ("service too long", raw(good(services=["s" * 129])), "bad-request:services"),
    ("service null", raw(good(services=[None])), "bad-request:services"),
    ("missing hazards", without("hazards"), "bad-request:hazards"),
    ("hazards 17", raw(good(hazards=["h"] * 17)), "bad-request:hazards"),
    ("hazard control char", raw(good(hazards=["a\x1b[2Jb"])), "bad-request:hazards"),
    ("hazards dict", raw(good(hazards={"a": "b"})), "bad-request:hazards"),
]


@pytest.mark.parametrize("data,reason", [(d, r) for _, d, r in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
def test_hostile_request_is_refused_with_its_reason(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_every_hostile_case_is_refused_and_counted_by_the_gate() -> None:
    gate = RequestGate(RateLimit(10_000, 1.0))
    expected: dict[str, int] = {}
    for _, data, reason in HOSTILE:
        adm = gate.admit(DOMID, data)
        assert adm.outcome is Outcome.REFUSED and adm.refusal.reason == reason
        if adm.ack is not None:  # acked only when the request carries a fresh seq
            assert adm.ack == Ack(adm.refusal.seq, Verdict.refused(reason))
        expected[reason] = expected.get(reason, 0) + 1
    assert gate.refusal_counts(DOMID) == expected
    assert gate.refusal_counts() == expected
    assert gate.stats(DOMID)["refused"] == len(HOSTILE)


def test_refusal_names_the_seq_when_it_is_readable() -> None:
    with pytest.raises(RequestRefused) as info:
        parse_request(raw(good(seq=9, phases="x")))
    assert info.value.seq == 9 and info.value.reason == "bad-request:phases"
    with pytest.raises(RequestRefused) as info:
        parse_request(b"[1]")
    assert info.value.seq is None


def test_refusal_detail_escapes_guest_text() -> None:
    with pytest.raises(RequestRefused) as info:
        parse_request(raw(good(phase="\x1b[31m\u202eevil" + "x" * 500)))
    assert "\x1b" not in str(info.value) and "\u202e" not in str(info.value)
    assert len(str(info.value)) < 300


def test_refused_only_takes_reasons_from_the_contract() -> None:
    with pytest.raises(ValueError):
        RequestRefused("because")
    with pytest.raises(ValueError):
        Verdict.refused("because")
    assert "bad-request:seq" in REFUSAL_REASONS and "stale-seq" in REFUSAL_REASONS
    assert issubclass(RequestRefused, XenpbrError)


def test_parse_request_wants_bytes() -> None:
    with pytest.raises(TypeError):
        parse_request("{}")  # type: ignore[arg-type]


# -- fuzzing: nothing but RequestRefused, whatever the bytes -------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.text(max_size=10), children, max_size=6),
    max_leaves=30)


def _must_not_crash(data: bytes) -> None:
    try:
        req = parse_request(data)
    except RequestRefused as exc:
        assert exc.reason in REFUSAL_REASONS
        return
    assert isinstance(req, BoundaryRequest) and req.phase in req.phases


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_random_bytes(data: bytes) -> None:
    _must_not_crash(data)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_fuzz_random_json(doc: object) -> None:
    _must_not_crash(json.dumps(doc).encode())


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(list(good()) + ["x"]), json_values, max_size=10))
def test_fuzz_request_shaped_objects(doc: dict) -> None:
    _must_not_crash(json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(good())), json_values)
def test_fuzz_one_field_replaced(key: str, value: object) -> None:
    _must_not_crash(raw(good(**{key: value})))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200))
def test_fuzz_splices_into_a_good_request(junk: bytes, at: int) -> None:
    data = raw(good())
    _must_not_crash(data[:at] + junk + data[at:])


def test_parser_bugs_would_be_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The fuzzers above must never reach the parser's last-resort handler."""
    caplog.set_level(logging.ERROR, logger="xenpbr.guestproto.request")
    for _, data, _ in HOSTILE:
        with pytest.raises(RequestRefused):
            parse_request(data)
    assert not [r for r in caplog.records if "parser bug" in r.getMessage()]


# -- verdicts and acks -----------------------------------------------------------------------


@pytest.mark.parametrize("text,verdict", [
    ("captured", Verdict.captured()), ("skipped", Verdict.skipped()),
    ("refused:stale-seq", Verdict.refused("stale-seq")),
    ("refused:bad-request:phase", Verdict.refused("bad-request:phase")),
    ("restored:0", Verdict.restored(0)), ("restored:12", Verdict.restored(12)),
])
def test_verdict_wire_form_round_trips(text: str, verdict: Verdict) -> None:
    assert str(verdict) == text and Verdict.parse(text) == verdict
    assert Ack.parse(f"5 {text}".encode()) == Ack(5, verdict)
    assert Ack(5, verdict).encode() == f"5 {text}"


def test_agent_accepts_refusal_reasons_a_newer_dom0_adds() -> None:
    v = Verdict.parse("refused:some-new-reason")
    assert v.kind is VerdictKind.REFUSED and v.reason == "some-new-reason" and not v.ok


@pytest.mark.parametrize("text", [
    b"", b"5", b"captured", b"5  captured", b"5 captured ", b"-1 captured", b"05 captured",
    b"5 captured:x", b"5 refused", b"5 refused:", b"5 refused:Bad Reason", b"5 restored",
    b"5 restored:x", b"5 restored:-1", b"5 restored:99999999999", b"4294967296 captured",
    b"5 \xff", b"5 kaptured", "5 captur\u00e9d".encode(),
])
def test_malformed_acks_are_rejected(text: bytes) -> None:
    with pytest.raises(AckMalformed):
        Ack.parse(text)


def test_verdict_invariants() -> None:
    with pytest.raises(ValueError):
        Verdict(VerdictKind.CAPTURED, reason="x")
    with pytest.raises(ValueError):
        Verdict(VerdictKind.RESTORED)
    with pytest.raises(ValueError):
        Ack(-1, Verdict.captured())


def test_agent_presence() -> None:
    assert parse_agent_presence(b"0.1.0 123").pid == 123
    for bad in (None, b"", b"x 1", b"0.1.0 0", b"0.1.0 1 2", b"0.1.0 " + b"9" * 100):
        assert parse_agent_presence(bad) is None


# -- sequence tracking, duplicates, busy ------------------------------------------------------


def test_seq_must_increase() -> None:
    gate = RequestGate()
    assert gate.admit(DOMID, raw(good(seq=3))).outcome is Outcome.ACCEPTED
    gate.answered(DOMID, 3)
    for seq in (3, 2, 1):
        adm = gate.admit(DOMID, raw(good(seq=seq, identity=f"replay{seq}")))
        assert adm.refusal.reason == "stale-seq"
        assert adm.ack is None  # the ack keeps answering request 3
    assert gate.admit(DOMID, raw(good(seq=4))).outcome is Outcome.ACCEPTED
    assert gate.refusal_counts(DOMID) == {"stale-seq": 3}


def test_same_bytes_seen_again_is_a_duplicate_not_a_refusal() -> None:
    gate = RequestGate(RateLimit(1, 3600))
    data = raw(good(seq=3))
    assert gate.admit(DOMID, data).outcome is Outcome.ACCEPTED
    for _ in range(50):  # watch fired again, daemon restarted, guest rewrote the same bytes
        assert gate.admit(DOMID, data).outcome is Outcome.DUPLICATE
    assert gate.stats(DOMID)["duplicates"] == 50 and gate.refusal_counts(DOMID) == {}


def test_a_second_request_while_one_is_pending_is_busy() -> None:
    gate = RequestGate()
    assert gate.admit(DOMID, raw(good(seq=3))).outcome is Outcome.ACCEPTED
    adm = gate.admit(DOMID, raw(good(seq=4)))
    assert adm.refusal.reason == "busy" and adm.ack.seq == 4
    gate.answered(DOMID, 3)
    assert gate.admit(DOMID, raw(good(seq=4, identity="again"))).refusal.reason == "stale-seq"
    assert gate.admit(DOMID, raw(good(seq=5))).outcome is Outcome.ACCEPTED


def test_refused_requests_advance_the_seq_too() -> None:
    gate = RequestGate()
    adm = gate.admit(DOMID, raw(good(seq=8, phases="bad")))
    assert adm.ack == Ack(8, Verdict.refused("bad-request:phases"))
    assert gate.admit(DOMID, raw(good(seq=8))).refusal.reason == "stale-seq"
    adm = gate.admit(DOMID, raw(good(seq=7, phases="bad")))  # stale and malformed
    assert adm.refusal.reason == "bad-request:phases" and adm.ack is None
    assert gate.admit(DOMID, raw(good(seq=9))).outcome is Outcome.ACCEPTED


def test_restore_and_forget_reset_bookkeeping() -> None:
    gate = RequestGate()
    gate.admit(DOMID, raw(good(seq=5)))
    gate.restored(DOMID, 5)
    assert gate.stats(DOMID)["last_seq"] == 5 and gate.stats(DOMID)["pending"] is None
    assert gate.admit(DOMID, raw(good(seq=5, identity="b"))).refusal.reason == "stale-seq"
    gate.forget(DOMID)
    assert gate.admit(DOMID, raw(good(seq=1))).outcome is Outcome.ACCEPTED


def test_state_export_import_survives_a_daemon_restart() -> None:
    gate = RequestGate()
    data = raw(good(seq=5))
    gate.admit(DOMID, data)
    saved = json.loads(json.dumps(gate.export_state(DOMID)))
    fresh = RequestGate()
    fresh.import_state(DOMID, saved)
    assert fresh.admit(DOMID, data).outcome is Outcome.DUPLICATE
    assert fresh.admit(DOMID, raw(good(seq=6))).refusal.reason == "busy"
    with pytest.raises(ValueError):
        fresh.import_state(DOMID, {"last_seq": -1, "pending": None, "last_digest": None})


def test_domains_are_tracked_separately() -> None:
    gate = RequestGate(RateLimit(1, 3600))
    assert gate.admit(1, raw(good(seq=3))).outcome is Outcome.ACCEPTED
    assert gate.admit(2, raw(good(seq=3))).outcome is Outcome.ACCEPTED
    assert gate.admit(1, raw(good(seq=4))).refusal.reason == "rate-limited"
    assert gate.refusal_counts(2) == {} and gate.refusal_counts(1) == {"rate-limited": 1}


def test_absent_request() -> None:
    assert RequestGate().admit(DOMID, None).outcome is Outcome.ABSENT


# -- rate limiting ----------------------------------------------------------------------------


def test_token_bucket_refills_on_the_injected_clock() -> None:
    clock = Clock()
    bucket = TokenBucket(RateLimit(8, 60), clock)
    assert [bucket.take() for _ in range(9)] == [True] * 8 + [False]
    clock.now += 7.5  # one token per 7.5 s
    assert bucket.take() and not bucket.take()
    clock.now -= 1000  # a clock stepping back refills nothing
    assert not bucket.take()
    clock.now += 10_000
    assert sum(bucket.take() for _ in range(20)) == 8


def test_flood_is_rate_limited_and_counted() -> None:
    clock = Clock()
    gate = RequestGate(RateLimit(8, 60), clock)
    outcomes = [gate.admit(DOMID, raw(good(seq=n, identity=f"f{n}"))) for n in range(1, 1001)]
    reasons = [a.refusal.reason if a.refusal else "accepted" for a in outcomes]
    assert reasons[0] == "accepted"
    assert reasons[1:8] == ["busy"] * 7  # within the burst, but one request at a time
    assert set(reasons[8:]) == {"rate-limited"}
    assert gate.refusal_counts(DOMID) == {"busy": 7, "rate-limited": 992}
    gate.answered(DOMID, 1)
    clock.now += 60
    assert gate.admit(DOMID, raw(good(seq=1001))).outcome is Outcome.ACCEPTED


def test_garbage_is_refused_with_its_own_reason_and_spends_no_token() -> None:
    gate = RequestGate(RateLimit(8, 60), Clock())
    reasons = [gate.admit(DOMID, b"junk %d" % n).refusal.reason for n in range(20)]
    assert reasons == ["bad-request:json"] * 20  # dom0's cost: the daemon's read budget
    assert gate.admit(DOMID, raw(good(seq=1))).outcome is Outcome.ACCEPTED


#: The bad requests issue 13's hostile guest sent after its flood, with their reasons.
BAD_AFTER_FLOOD = [
    ({"phase": "../../etc"}, "bad-request:phase"),
    ({"phase": "a/b"}, "bad-request:phase"),
    ({"phase": "a\x00b"}, "bad-request:phase"),
    ({"phase": "p" * 300}, "bad-request:phase"),
    ({"phase": "ghost"}, "unknown-phase"),
    ({"phases": ["kernel", "../x"]}, "bad-request:phases"),
]


def test_bad_requests_right_after_a_flood_are_acked_with_their_own_reason() -> None:
    clock = Clock()
    gate = RequestGate(RateLimit(8, 60), clock)
    gate.admit(DOMID, raw(good(seq=1)))
    gate.answered(DOMID, 1)
    for seq in range(2, 500):  # the flood drains the bucket
        gate.admit(DOMID, raw(good(seq=seq)))
    assert gate.refusal_counts(DOMID)["rate-limited"] > 400
    for n, (fields, reason) in enumerate(BAD_AFTER_FLOOD):
        adm = gate.admit(DOMID, raw(good(seq=1000 + n, **fields)))  # NUL: "\u0000" in JSON
        assert adm.ack == Ack(1000 + n, Verdict.refused(reason)), (fields, adm.refusal)
    assert gate.refusal_counts(DOMID)["bad-request:phase"] == 4


class CountingXs:
    """A xenstore client that counts dom0's transactions (each ack is one)."""

    def __init__(self, xs) -> None:
        self.xs, self.transactions = xs, 0

    def run_transaction(self, work):
        self.transactions += 1
        return self.xs.run_transaction(work)

    def __getattr__(self, name):
        return getattr(self.xs, name)


def test_refusal_acks_are_budgeted_and_the_newest_is_written_later() -> None:
    server = FakeXenstoreServer()
    server.create_domain(DOMID)
    clock = Clock()
    dom0 = CountingXs(server.connect(0))
    proto = PhaseProtocol(dom0, RequestGate(RateLimit(8, 60), clock), RateLimit(10, 5.0))
    proto.register(DOMID)
    guest = server.connect(DOMID)
    before = dom0.transactions
    for seq in range(1, 201):  # a flood of bad requests, each with a fresh seq
        guest.write("data/xenpbr/request", raw(good(seq=seq, phase="a/b")))
        assert proto.poll(DOMID).outcome is Outcome.REFUSED
    assert dom0.transactions - before == 10  # the burst, not one per request
    assert guest.read("control/xenpbr/ack") == b"10 refused:bad-request:phase"
    assert proto.flush_held()  # no token yet: still held
    clock.now += 0.5
    assert not proto.flush_held()
    assert guest.read("control/xenpbr/ack") == b"200 refused:bad-request:phase"
    assert proto.gate.refusal_counts(DOMID) == {"bad-request:phase": 200}


def test_an_answer_supersedes_an_older_held_refusal() -> None:
    server = FakeXenstoreServer()
    server.create_domain(DOMID)
    clock = Clock()
    proto = PhaseProtocol(server.connect(0), RequestGate(RateLimit(8, 60), clock),
                          RateLimit(1, 60))
    proto.register(DOMID)
    guest = server.connect(DOMID)
    guest.write("data/xenpbr/request", raw(good(seq=1, phase="a/b")))
    proto.poll(DOMID)
    guest.write("data/xenpbr/request", raw(good(seq=2, phase="a/b")))
    proto.poll(DOMID)  # held: no token
    guest.write("data/xenpbr/request", raw(good(seq=3)))
    assert proto.poll(DOMID).outcome is Outcome.ACCEPTED
    proto.answer(DOMID, 3, Verdict.captured())
    clock.now += 120
    assert not proto.flush_held()
    assert guest.read("control/xenpbr/ack") == b"3 captured"  # never overwritten by 2


def test_a_failed_answer_does_not_leave_the_domain_busy_forever() -> None:
    server = FakeXenstoreServer()
    server.create_domain(DOMID)
    proto = PhaseProtocol(server.connect(0))
    proto.register(DOMID)
    guest = server.connect(DOMID)
    guest.write("data/xenpbr/request", raw(good(seq=1)))
    assert proto.poll(DOMID).outcome is Outcome.ACCEPTED

    def broken(work):
        raise XenpbrError("xenstored went away")

    proto.xs = types.SimpleNamespace(run_transaction=broken, read_or=proto.xs.read_or)
    with pytest.raises(XenpbrError):
        proto.answer(DOMID, 1, Verdict.captured())
    assert proto.gate.stats(DOMID)["pending"] is None


def test_rate_limit_validation() -> None:
    with pytest.raises(ValueError):
        RateLimit(0, 60)
    with pytest.raises(ValueError):
        RateLimit(8, float("nan"))


# -- xenstore side ----------------------------------------------------------------------------


@pytest.fixture
def server() -> FakeXenstoreServer:
    srv = FakeXenstoreServer()
    srv.create_domain(DOMID)
    return srv


def test_paths_come_from_the_domid_only() -> None:
    assert request_path(7) == "/local/domain/7/data/xenpbr/request"
    assert ack_path(7) == "/local/domain/7/control/xenpbr/ack"
    assert request_watch(7) == (request_path(7), "xenpbr-request-7")
    assert domid_from_token("xenpbr-request-7") == 7
    for token in ("xenpbr-request-", "xenpbr-request-../x", "other", "xenpbr-request-123456"):
        assert domid_from_token(token) is None
    for bad in ("7", 7.0, True, -1, 0x7FF0):
        with pytest.raises((TypeError, ValueError)):
            request_path(bad)  # type: ignore[arg-type]


def test_prepare_domain_gives_the_guest_read_only_access(server: FakeXenstoreServer) -> None:
    with server.connect(0) as dom0, server.connect(DOMID) as guest:
        prepare_domain(dom0, DOMID, generation=0)
        perms = dom0.get_perms(control_path(DOMID))
        assert perms.owner == 0 and perms.others is Access.NONE
        assert perms.access_for(DOMID) is Access.READ
        assert guest.read("control/xenpbr/generation") == b"0"
        with pytest.raises(PermissionDenied):
            guest.write("control/xenpbr/ack", "3 captured")
        with pytest.raises(PermissionDenied):
            guest.write("control/xenpbr/generation", "9")
        with pytest.raises(PermissionDenied):
            guest.set_perms("control/xenpbr", owner=DOMID)
        prepare_domain(dom0, DOMID)  # idempotent
        assert guest.read("control/xenpbr/generation") == b"0"


def test_protocol_end_to_end_on_the_fake(server: FakeXenstoreServer) -> None:
    with server.connect(0) as dom0, server.connect(DOMID) as guest, \
            server.connect(DOMID + 1) as other:
        server.create_domain(DOMID + 1)
        proto = PhaseProtocol(dom0, RequestGate(RateLimit(100, 1)))
        proto.register(DOMID)
        assert proto.poll(DOMID).outcome is Outcome.ABSENT
        guest.write("data/xenpbr/request", raw(good(seq=1)))
        adm = proto.poll(DOMID)
        assert adm.outcome is Outcome.ACCEPTED
        proto.answer(DOMID, 1, Verdict.captured())
        assert guest.read("control/xenpbr/ack") == b"1 captured"
        guest.write("data/xenpbr/request", b"\x00garbage")
        assert proto.poll(DOMID).refusal.reason == "bad-request:json"
        assert guest.read("control/xenpbr/ack") == b"1 captured"  # no seq: not acked
        guest.write("data/xenpbr/request", raw(good(seq=2, phases=["x" * 40])))
        proto.poll(DOMID)
        assert guest.read("control/xenpbr/ack") == b"2 refused:bad-request:phases"
        proto.restored(DOMID, 2, 1)
        assert guest.read("control/xenpbr/ack") == b"2 restored:1"
        assert guest.read("control/xenpbr/generation") == b"1"
        with pytest.raises(PermissionDenied):
            other.read(ack_path(DOMID))


def test_guest_text_never_becomes_a_dom0_path(server: FakeXenstoreServer) -> None:
    """After every hostile request, dom0 has written nothing outside control/xenpbr."""
    with server.connect(0) as dom0, server.connect(DOMID) as guest:
        proto = PhaseProtocol(dom0, RequestGate(RateLimit(10_000, 1)))
        proto.register(DOMID)
        before = set(server.dump())
        for _, data, _ in HOSTILE:
            try:
                guest.write("data/xenpbr/request", data)
            except XenpbrError:
                continue  # too large for one xenstore message: xenstore refuses it first
            assert proto.poll(DOMID).outcome is Outcome.REFUSED
        new = set(server.dump()) - before
        guest_dir = request_path(DOMID).rsplit("/", 1)[0]  # created by the guest's write
        assert new <= {ack_path(DOMID), request_path(DOMID), guest_dir}, new


@pytest.mark.parametrize("raw, expected", [
    (b"acked 3", ("acked", 3)),
    (b"ready 12", ("ready", 12)),
    (b"steps-failed 1", ("steps-failed", 1)),
    (None, None), (b"", None), (b"ready 0", None), (b"ready -1", None),
    (b"ready 3 ", None), (b"READY 3", None), (b"ready 1234567890", None),
    (b"ready " + b"9" * 40, None), (b"\xff\xfe 1", None), (b"acked 3\n", None),
])
def test_guest_status_notes_are_parsed_strictly(raw, expected) -> None:
    status = wire.parse_guest_status(raw)
    assert (None if status is None else (status.state, status.generation)) == expected


def test_status_watch_tokens_are_not_request_tokens() -> None:
    path, token = control.status_watch(7)
    assert path == "/local/domain/7/data/xenpbr/status"
    assert control.domid_from_status_token(token) == 7
    assert control.domid_from_token(token) is None
    assert control.domid_from_status_token(control.request_watch(7)[1]) is None
