"""capture() and restore() against a fake ``xl`` (FIFO handling, errors, cleanup).

The fake speaks just enough of xl's command line: ``save -c [-p] NAME FILE`` copies a
prepared stream into FILE (``-p``: then marks the domain paused, as xl does after a
complete save; ``unpause NAME`` clears the mark and fails on a domain not paused), ``restore [-p] [-e] [CFG] FILE`` reads FILE and "creates"
the domain named in the stream's embedded config as soon as the header arrives (as
libxl does before the pages), ``domid`` and ``destroy`` manage those fake domains.
Knobs are files in the fake's state directory. Real xl is exercised in
tests/lab/test_images_real.py.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import pytest

from tests.unit.streams import synth
from xenpbr.images import (
    CaptureFailed,
    CorruptObject,
    ImageStore,
    QuotaExceeded,
    RestoreFailed,
    capture,
    restore,
)
from xenpbr.images.pagestore import PACK_HEADER, RECORD

FAKE_XL = r'''#!PYTHON
import json, os, sys, time
state = os.environ["FAKE_XL_STATE"]
def path(*p): return os.path.join(state, *p)
def knob(name):
    try:
        with open(path(name)) as f: return f.read()
    except FileNotFoundError: return None
with open(path("calls.log"), "a") as log: log.write(json.dumps(sys.argv[1:]) + "\n")
cmd, args = sys.argv[1], sys.argv[2:]
domains = path("domains")
os.makedirs(domains, exist_ok=True)
if cmd == "save":
    name, target = args[-2], args[-1]
    if not os.path.exists(os.path.join(domains, name)):
        sys.stderr.write(f"libxl: error: domain {name} not found\n"); sys.exit(1)
    if knob("hang") is not None:
        time.sleep(60)
    sys.stderr.write(f"Saving to {target} new xl format (info 0x3/0x0/1234)\n")
    data = open(path("stream.xl"), "rb").read()
    cut = knob("truncate")
    with open(target, "wb") as out:
        out.write(data[:int(cut)] if cut else data)
    if cut:
        sys.stderr.write("libxl: error: domain died during save\n"); sys.exit(3)
    open(path("save_done"), "w").close()
    if "-p" in args:
        open(os.path.join(domains, name + ".paused"), "w").close()
elif cmd == "migrate":  # migrate -s "" NAME RUNE: the rune is the receiver (xl_migrate.c)
    import subprocess
    name, rune = args[-2], args[-1]
    if not os.path.exists(os.path.join(domains, name)):
        sys.stderr.write(f"libxl: error: domain {name} not found\n"); sys.exit(1)
    child = subprocess.Popen(["sh", "-c", rune], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    banner = b"xl migration receiver ready, send binary domain data.\n"
    if child.stdout.read(len(banner)) != banner:
        sys.stderr.write("migration receiver stream contained unexpected data instead of banner\n")
        sys.exit(1)
    data = open(path("stream.xl"), "rb").read()
    if knob("no_logdirty") is not None:  # Debian 12's Xen: no shadow paging, no log-dirty
        child.stdin.write(data[:2795]); child.stdin.close(); child.wait()
        sys.stderr.write("xc: error: Failed to enable logdirty: 95,22,0 (22 = Invalid argument)"
                         ": Internal error\nmigration sender: libxl_domain_suspend failed "
                         "(rc=-8)\nMigration failed, failed to suspend at sender.\n")
        sys.exit(1)
    cut = knob("truncate")
    suspended = os.path.join(domains, name + ".suspended")
    try:
        if cut:
            child.stdin.write(data[:int(cut)])
            raise BrokenPipeError
        child.stdin.write(data[:len(data) // 2])
        child.stdin.flush()
        open(suspended, "w").close()  # the last pass: the guest is suspended
        child.stdin.write(data[len(data) // 2:])
        if knob("trailing") is not None:
            child.stdin.write(b"more")
        child.stdin.flush()
        got = child.stdout.read(1)  # the receiver's "ready" message, or EOF
    except BrokenPipeError:  # xl's failed_resume: close the stream, then wait 2 s at most
        sys.stderr.write("migration sender: libxl_domain_suspend failed (rc=-3)\n")
        got = b"(not read)"
    child.stdin.close()
    try:
        child.wait(2)
    except subprocess.TimeoutExpired:
        sys.stderr.write("migration child not exiting, no longer waiting\n")
    open(path("migrate_done"), "w").write(repr(got))
    if knob("stay_suspended") is None and os.path.exists(suspended):
        os.unlink(suspended)
    sys.stderr.write("Migration failed, resuming at sender.\n")
    sys.exit(1)
elif cmd == "unpause":
    mark = os.path.join(domains, args[0] + ".paused")
    if knob("unpause_fail") is not None or not os.path.exists(mark):
        sys.stderr.write("libxl: error: unpausing domain: Invalid argument\n"); sys.exit(1)
    os.unlink(mark)
elif cmd == "restore":
    src = args[-1]
    got = b""
    with open(src, "rb") as f:
        got = f.read(4096)
        start = got.index(b'"name": "') + 9
        name = got[start:got.index(b'"', start)].decode()
        open(os.path.join(domains, name), "w").write("7")
        while True:
            chunk = f.read(1 << 16)
            if not chunk: break
            got += chunk
    open(path("restored.xl"), "wb").write(got)
    if knob("restore_fail"):
        sys.stderr.write(knob("restore_fail")); sys.exit(1)
    want = open(path("stream.xl"), "rb").read()
    def body(b): return b[48 + int.from_bytes(b[44:48], "little"):]  # after the xl header
    if knob("accept_any") is not None:  # an allocate-only stream: checked by the test
        sys.exit(0)
    if got != want and (knob("renamed") is None or body(got) != body(want)):
        sys.stderr.write("xc: error: truncated stream\n"); sys.exit(2)
elif cmd == "domid":
    p = os.path.join(domains, args[0])
    if not os.path.exists(p):
        sys.stderr.write(f"Can't get domid of domain name '{args[0]}', maybe this domain does not exist.\n")
        sys.exit(1)
    print(open(p).read())
elif cmd == "destroy":
    os.unlink(os.path.join(domains, args[0]))
elif cmd == "rename":
    if knob("rename_fail") is not None or not os.path.exists(os.path.join(domains, args[0])):
        sys.stderr.write(f"libxl: error: domain {args[0]} not found\n"); sys.exit(1)
    os.rename(os.path.join(domains, args[0]), os.path.join(domains, args[1]))
elif cmd == "info":
    print("total_memory           : 4096")
    print("free_memory            : " + (knob("free_memory") or "3000"))
else:
    sys.exit(99)
'''


class FakeXl:
    def __init__(self, tmp: Path, data: bytes) -> None:
        self.state = tmp / "xlstate"
        (self.state / "domains").mkdir(parents=True)
        (self.state / "stream.xl").write_bytes(data)
        self.script = tmp / "xl"
        self.script.write_text(FAKE_XL.replace("PYTHON", sys.executable))
        self.script.chmod(0o755)
        self.argv = (str(self.script),)

    def knob(self, name: str, value: str = "") -> None:
        (self.state / name).write_text(value)

    def add_domain(self, name: str) -> None:
        (self.state / "domains" / name).write_text("5")

    def domains(self) -> list[str]:
        return sorted(p.name for p in (self.state / "domains").iterdir()
                      if p.suffix not in (".paused", ".suspended"))

    def suspended(self, name: str) -> bool:
        return (self.state / "domains" / f"{name}.suspended").exists()

    def paused(self, name: str) -> bool:
        return (self.state / "domains" / f"{name}.paused").exists()

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in (self.state / "calls.log").read_text().splitlines()]


@pytest.fixture(scope="module")
def data() -> bytes:
    return b"".join(synth.iter_pv_stream(synth.PvStreamSpec()))


@pytest.fixture
def fake(tmp_path, data, monkeypatch) -> FakeXl:
    xl = FakeXl(tmp_path, data)
    monkeypatch.setenv("FAKE_XL_STATE", str(xl.state))
    xl.add_domain("vm1")
    return xl


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def test_capture_stores_the_stream_xl_writes(store, fake, data) -> None:
    seen = []
    result = capture("vm1", store, "boot", seq=3, fingerprint="f", xl=fake.argv,
                     progress=seen.append)
    assert fake.calls()[0][:3] == ["save", "-c", "vm1"]
    assert result.raw_bytes == len(data) and result.meta.seq == 3
    assert result.stats.new_pages == result.meta.distinct_pages
    assert result.paused_s is not None and 0 <= result.paused_s <= result.total_s
    assert [p.pages for p in seen] == [1024, 1500]
    assert "Saving to" in result.xl_output
    out = io.BytesIO()
    store.regenerate(store.load("vm1", result.meta.image_id), out)
    assert out.getvalue() == data
    assert json.dumps(result.to_json())


def test_capture_of_a_missing_domain_reports_xl_message(store, fake) -> None:
    with pytest.raises(CaptureFailed, match="exit status 1.*domain ghost not found"):
        capture("ghost", store, "boot", xl=fake.argv)
    assert store.images("ghost") == []


def test_xl_dying_mid_stream_stores_nothing(store, fake) -> None:
    fake.knob("truncate", "300000")
    with pytest.raises(CaptureFailed, match="exit status 3.*domain died during save.*truncated"):
        capture("vm1", store, "boot", xl=fake.argv)
    assert store.images("vm1") == []
    assert not list(store.pages.dir.glob("*.pack"))


def test_quota_refusal_still_lets_xl_finish(store, fake) -> None:
    store.set_quota("vm1", 100_000)
    with pytest.raises(QuotaExceeded):
        capture("vm1", store, "boot", xl=fake.argv)
    assert (fake.state / "save_done").exists()  # the FIFO was drained: guest resumed
    assert store.images("vm1") == []


def test_capture_timeout_kills_xl(store, fake) -> None:
    fake.knob("hang")
    t0 = time.monotonic()
    with pytest.raises(CaptureFailed, match="timeout"):
        capture("vm1", store, "boot", xl=fake.argv, timeout=1.0)
    assert time.monotonic() - t0 < 30


# -- while_paused: xl save -c -p, the hook, the unpause --------------------------------------


def test_the_hook_runs_while_xl_holds_the_domain_paused_then_it_is_unpaused(store, fake,
                                                                           data) -> None:
    seen: list[tuple[str, bool, list[str]]] = []

    def hook(image_id: str) -> None:
        seen.append((image_id, fake.paused("vm1"), store.images("vm1")))
        time.sleep(0.3)  # the disk snapshots take a while

    result = capture("vm1", store, "boot", xl=fake.argv, while_paused=hook)
    assert fake.calls()[0][:4] == ["save", "-c", "-p", "vm1"]
    assert fake.calls()[1] == ["unpause", "vm1"] and not fake.paused("vm1")
    # paused, before anything was published, with the id the image then got:
    assert seen == [(result.meta.image_id, True, [])]
    assert store.images("vm1") and result.raw_bytes == len(data)
    assert result.paused_s is not None and result.paused_s >= 0.3  # the hook counts


def test_a_failing_hook_stores_nothing_and_still_unpauses(store, fake) -> None:
    def hook(image_id: str) -> None:
        raise CaptureFailed("the snapshot went wrong")

    with pytest.raises(CaptureFailed, match="the snapshot went wrong"):
        capture("vm1", store, "boot", xl=fake.argv, while_paused=hook)
    assert store.images("vm1") == [] and not fake.paused("vm1")
    assert ["unpause", "vm1"] in fake.calls()


def test_no_unpause_after_xl_failed_on_its_own(store, fake) -> None:
    """xl resumes a domain whose save failed without pausing it: an unpause then could
    undo somebody else's pause (pauses nest)."""
    fake.knob("truncate", "300000")
    hooked = []
    with pytest.raises(CaptureFailed, match="exit status 3"):
        capture("vm1", store, "boot", xl=fake.argv, while_paused=hooked.append)
    assert hooked == [] and all(c[0] != "unpause" for c in fake.calls())


def test_a_rejected_stream_still_unpauses(store, fake) -> None:
    store.set_quota("vm1", 100_000)
    with pytest.raises(QuotaExceeded):
        capture("vm1", store, "boot", xl=fake.argv, while_paused=lambda _: None)
    assert not fake.paused("vm1") and ["unpause", "vm1"] in fake.calls()


def test_an_unpause_that_fails_is_an_error_naming_the_command(store, fake) -> None:
    fake.knob("unpause_fail")
    with pytest.raises(CaptureFailed, match=r"left paused.*run `xl unpause vm1`"):
        capture("vm1", store, "boot", xl=fake.argv, while_paused=lambda _: None)
    assert [c for c in fake.calls() if c[0] == "unpause"] == [["unpause", "vm1"]] * 3
    assert store.images("vm1") == []


def test_missing_xl_binary(store, tmp_path) -> None:
    with pytest.raises(CaptureFailed, match="cannot run"):
        capture("vm1", store, "boot", xl=(str(tmp_path / "no-such-xl"),))


def captured(store, fake):
    result = capture("vm1", store, "boot", xl=fake.argv)
    return store.load("vm1", result.meta.image_id)


def test_restore_feeds_xl_the_regenerated_stream(store, fake, data) -> None:
    image = captured(store, fake)
    (fake.state / "domains" / "vm1").unlink()  # the crashed domain was destroyed
    result = restore(store, image, xl=fake.argv)
    assert result.domid == 7 and result.name == "pbr-guest"  # name from embedded config
    assert (fake.state / "restored.xl").read_bytes() == data
    assert result.stream_bytes == len(data)
    restore_call = next(c for c in fake.calls() if c[0] == "restore")
    assert restore_call[1:3] == ["-p", "-e"] and len(restore_call) == 4


def test_restore_options_config_file_and_unpaused(store, fake, tmp_path) -> None:
    image = captured(store, fake)
    cfg = tmp_path / "vm.cfg"
    restore(store, image, paused=False, monitor=True, config_file=cfg, verify_first=True,
            xl=fake.argv)
    restore_call = next(c for c in fake.calls() if c[0] == "restore")
    assert restore_call[1:] == [str(cfg), restore_call[-1]]


def test_restore_refuses_when_the_domain_exists(store, fake) -> None:
    image = captured(store, fake)
    fake.add_domain("pbr-guest")
    with pytest.raises(RestoreFailed, match="already exists.*domid 5"):
        restore(store, image, xl=fake.argv)
    assert "pbr-guest" in fake.domains()  # not ours to destroy


def test_corrupt_page_kills_xl_and_destroys_the_partial_domain(store, fake) -> None:
    image = captured(store, fake)
    # a page of the second PAGE_DATA record: xl has built the domain from the first
    _flip_stored_page(store, 1100)
    with pytest.raises(CorruptObject, match=r"page #1\d\d\d .*partial domain pbr-guest "
                                            r"\(domid 7\) destroyed"):
        restore(store, image, xl=fake.argv)
    assert "pbr-guest" not in fake.domains()


def test_corrupt_page_of_the_first_record_stops_xl_before_any_page(store, fake) -> None:
    """Pages are read and checked a whole record (1024 pages) ahead of what xl gets."""
    image = captured(store, fake)
    _flip_stored_page(store, 600)
    with pytest.raises(CorruptObject, match=r"page #\d+ .*no partial domain left"):
        restore(store, image, xl=fake.argv)
    assert "pbr-guest" not in fake.domains()
    assert "corrupt" in (store.invalid_reason("vm1", image.meta.image_id) or "")


def _flip_stored_page(store, n: int) -> None:
    """Flip one bit of the ``n``-th page record of the (only) pack."""
    (pack,) = store.pages.dir.glob("*.pack")
    raw = bytearray(pack.read_bytes())
    raw[PACK_HEADER.size + n * (RECORD.size + 4096) + RECORD.size + 7] ^= 0x80
    pack.write_bytes(bytes(raw))


def test_corruption_found_before_xl_with_verify_first(store, fake) -> None:
    image = captured(store, fake)
    (pack,) = store.pages.dir.glob("*.pack")
    raw = bytearray(pack.read_bytes())
    raw[-1] ^= 1
    pack.write_bytes(bytes(raw))
    with pytest.raises(CorruptObject):
        restore(store, image, verify_first=True, xl=fake.argv)
    assert not any(c[0] == "restore" for c in fake.calls())


def test_xl_restore_failure_reports_its_message_and_cleans_up(store, fake) -> None:
    image = captured(store, fake)
    fake.knob("restore_fail", "libxl: error: cannot allocate memory for the domain\n")
    with pytest.raises(RestoreFailed, match="exit status 1.*cannot allocate memory.*"
                                            "partial domain pbr-guest .* destroyed"):
        restore(store, image, xl=fake.argv)
    assert "pbr-guest" not in fake.domains()


def test_xl_outlives_its_caller_without_sigpipe(tmp_path) -> None:
    """xenpbrd killed mid-save must not kill xl on its next message (xl would then never
    resume the guest it suspended): xl's output goes to a file, not a pipe."""
    import subprocess
    import sys
    import time
    marker = tmp_path / "xl-finished"
    script = tmp_path / "fake-xl"
    script.write_text(f"#!/bin/sh\nsleep 0.5\necho 'Failed to save domain, resuming domain' >&2\n"
                      f"echo resumed > {marker}\n")
    script.chmod(0o755)
    caller = ("import os, sys; sys.path.insert(0, {root!r});"
              "from xenpbr.xl.fifo import XlProcess;"
              "XlProcess([{xl!r}], 30); os._exit(9)").format(
                  root=str(__import__("pathlib").Path(__file__).parents[2]), xl=str(script))
    subprocess.run([sys.executable, "-c", caller], check=False)
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "resumed\n"


def test_domain_state_reads_xls_state_letters(tmp_path) -> None:
    from xenpbr.xl.commands import domain_state
    script = tmp_path / "xl"
    script.write_text('#!/bin/sh\n[ "$2" = web ] || { echo "invalid domain identifier" >&2; exit 1; }\n'
                      'printf "Name  ID   Mem VCPUs\\tState\\tTime(s)\\nweb   7   128  1     --p---   0.1\\n"\n')
    script.chmod(0o755)
    assert domain_state((str(script),), "web") == "--p---"
    assert domain_state((str(script),), "other") is None
    assert domain_state((str(tmp_path / "missing-xl"),), "web") is None


# -- the hot stream: the newest image's stream, ready for `xl restore FILE` ------------------

def test_a_warmed_image_is_restored_from_its_file_verified_first(store, fake, data) -> None:
    """The default, ``hot_mode="file"``: hashed whole, then xl reads the file itself."""
    from xenpbr.images import hotcache
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    assert path is not None and path.read_bytes() == data  # regenerated from verified pages
    assert hotcache.sums_of(path).exists()  # its chunk checksums beside it
    (fake.state / "domains" / "vm1").unlink()
    result = restore(store, image, xl=fake.argv)
    assert result.hot and (fake.state / "restored.xl").read_bytes() == data
    assert result.verify_s > 0  # every chunk hashed before xl started
    restore_call = next(c for c in fake.calls() if c[0] == "restore")
    assert restore_call[-1] == str(path)  # xl read the file itself


def test_a_hot_stream_of_the_wrong_size_is_not_used(store, fake, data) -> None:
    from xenpbr.images import hotcache
    image = captured(store, fake)
    path = hotcache.warm(store, "vm1", image.meta.image_id)
    with open(path, "ab") as f:
        f.write(b"junk")
    result = restore(store, image, xl=fake.argv)
    assert not result.hot and not path.exists()
    assert (fake.state / "restored.xl").read_bytes() == data


def test_only_the_newest_image_keeps_a_hot_stream(store, fake) -> None:
    import threading

    from xenpbr.images import hotcache
    old = captured(store, fake)
    hotcache.warm(store, "vm1", old.meta.image_id)
    new = captured(store, fake)
    assert hotcache.warm(store, "vm1", new.meta.image_id) is not None
    assert hotcache.lookup(store, old) is None and hotcache.lookup(store, new) is not None
    assert hotcache.warm(store, "vm1", old.meta.image_id) is None  # stale: not written
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(hotcache.Cancelled):
        hotcache.warm(store, "vm1", new.meta.image_id, cancel)
    assert hotcache.lookup(store, new) is not None  # the finished one stays
    store.delete("vm1", new.meta.image_id)
    assert hotcache.lookup(store, new) is None  # deleted with its image
    hotcache.warm(store, "vm1", old.meta.image_id)
    store.pages.dir.parent.joinpath("images", "vm1", f"{old.meta.image_id}.manifest").unlink()
    assert store.gc().hot_streams_removed == 1


def test_no_hot_stream_when_it_would_crowd_the_store(store, fake, monkeypatch) -> None:
    import collections

    from xenpbr.images import hotcache
    image = captured(store, fake)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(hotcache.shutil, "disk_usage",
                        lambda _: usage(1 << 30, (1 << 30) - (130 << 20), 130 << 20))
    with pytest.raises(hotcache.NoRoom, match="less than the 128 MiB kept"):
        hotcache.warm(store, "vm1", image.meta.image_id)
    assert hotcache.lookup(store, image) is None


def test_a_crash_during_the_save_stops_xl_at_once(store, fake) -> None:
    import time
    fake.knob("hang")  # xl save waits for a suspend that never comes
    start = time.monotonic()
    crash_at = start + 0.5
    with pytest.raises(CaptureFailed, match="crashed during the capture of phase boot"):
        capture("vm1", store, "boot", xl=fake.argv, timeout=30,
                crashed=lambda: time.monotonic() > crash_at)
    assert time.monotonic() - start < 10  # not xl's 60 s suspend timeout, nor ours
    assert store.images("vm1") == []


def test_the_crash_guard_never_kills_on_an_error(store, fake, data) -> None:
    def broken() -> bool:
        raise OSError("hypercall failed")
    result = capture("vm1", store, "boot", xl=fake.argv, crashed=broken)
    assert result.raw_bytes == len(data)


def test_a_new_image_frees_the_old_stream_before_it_needs_the_room(store, fake, monkeypatch):
    import collections

    from xenpbr.images import hotcache
    old = captured(store, fake)
    hotcache.warm(store, "vm1", old.meta.image_id)
    new = captured(store, fake)
    usage = collections.namedtuple("usage", "total used free")
    seen = []

    def disk_usage(_):
        seen.append(hotcache.lookup(store, old))  # the old stream is gone by now
        return usage(1 << 40, 0, 1 << 39)
    monkeypatch.setattr(hotcache.shutil, "disk_usage", disk_usage)
    assert hotcache.warm(store, "vm1", new.meta.image_id) is not None
    assert seen == [None]


# -- live: xl migrate to the recorder ------------------------------------------------------


@pytest.fixture
def live_data() -> bytes:
    spec = synth.PvStreamSpec(dirty_passes=[[5, 6, 7, 1400], [6]])
    return b"".join(synth.iter_pv_stream(spec))


@pytest.fixture
def live_fake(tmp_path, live_data, monkeypatch) -> FakeXl:
    import importlib
    monkeypatch.setattr(importlib.import_module("xenpbr.images.capture"), "_live_unsupported",
                        None)
    xl = FakeXl(tmp_path, live_data)
    monkeypatch.setenv("FAKE_XL_STATE", str(xl.state))
    xl.add_domain("vm1")
    return xl


def test_a_live_capture_keeps_the_stream_byte_for_byte_and_snapshots_while_suspended(
        store, live_fake, live_data) -> None:
    fake = live_fake
    seen: list[tuple[str, bool, list[str]]] = []

    def hook(image_id: str) -> None:
        seen.append((image_id, fake.suspended("vm1"), store.images("vm1")))
        time.sleep(0.3)  # the disk snapshots take a while

    result = capture("vm1", store, "boot", xl=fake.argv, while_paused=hook, live=True,
                     frozen=lambda: fake.suspended("vm1"))
    call = fake.calls()[0]
    assert call[:4] == ["migrate", "-s", "", "vm1"] and len(call) == 5
    assert seen == [(result.meta.image_id, True, [])]  # suspended, nothing published yet
    assert not fake.suspended("vm1") and result.live
    assert (fake.state / "migrate_done").read_text() == "b''"  # released: no "ready" sent
    assert result.raw_bytes == len(live_data)
    assert result.meta.pfns == 1500 + 5  # the dirtied pages are kept as they were sent
    out = io.BytesIO()
    store.regenerate(store.load("vm1", result.meta.image_id), out)
    assert out.getvalue() == live_data
    # measured by polling the domain: the hook's 0.3 s, suspended, counts
    assert result.paused_s is not None and 0.25 <= result.paused_s < result.total_s
    assert result.to_json()["live"] is True


def test_a_live_capture_whose_save_failed_stores_nothing(store, live_fake) -> None:
    live_fake.knob("truncate", "300000")
    hooked: list[str] = []
    with pytest.raises(CaptureFailed, match="libxl_domain_suspend failed"):
        capture("vm1", store, "boot", xl=live_fake.argv, while_paused=hooked.append,
                live=True)
    assert hooked == [] and store.images("vm1") == []


def test_a_failing_hook_still_releases_the_live_guest(store, live_fake) -> None:
    def hook(image_id: str) -> None:
        raise CaptureFailed("the snapshot went wrong")

    with pytest.raises(CaptureFailed, match="the snapshot went wrong"):
        capture("vm1", store, "boot", xl=live_fake.argv, while_paused=hook, live=True)
    assert store.images("vm1") == [] and not live_fake.suspended("vm1")


def test_a_live_stream_refused_by_the_store_still_releases_the_guest(store, live_fake) -> None:
    store.set_quota("vm1", 100_000)
    with pytest.raises(QuotaExceeded):
        capture("vm1", store, "boot", xl=live_fake.argv, live=True)
    assert not live_fake.suspended("vm1") and (live_fake.state / "migrate_done").exists()


def test_bytes_after_the_live_streams_end_are_refused(store, live_fake) -> None:
    live_fake.knob("trailing")
    with pytest.raises(CaptureFailed, match="4 bytes followed the stream's END"):
        capture("vm1", store, "boot", xl=live_fake.argv, live=True)
    assert store.images("vm1") == []


def test_a_guest_left_suspended_after_a_live_capture_is_an_error(store, live_fake) -> None:
    live_fake.knob("stay_suspended")
    with pytest.raises(CaptureFailed, match="still suspended or paused"):
        capture("vm1", store, "boot", xl=live_fake.argv, live=True,
                frozen=lambda: live_fake.suspended("vm1"))
    assert store.images("vm1") == []


def test_a_live_capture_of_a_missing_domain_reports_xl_message(store, live_fake) -> None:
    with pytest.raises(CaptureFailed, match="domain ghost not found"):
        capture("ghost", store, "boot", xl=live_fake.argv, live=True)


def test_without_log_dirty_the_capture_falls_back_to_xl_save_for_good(store, live_fake,
                                                                     live_data, caplog) -> None:
    """Debian 12's Xen is built without shadow paging: no PV log-dirty mode, no live
    migration. The capture is taken with xl save -c instead, and no later capture of the
    process tries xl migrate again."""
    live_fake.knob("no_logdirty")
    first = capture("vm1", store, "boot", xl=live_fake.argv, live=True)
    second = capture("vm1", store, "later", xl=live_fake.argv, live=True)
    assert [c[0] for c in live_fake.calls()] == ["migrate", "save", "save"]
    assert not first.live and not second.live and first.raw_bytes == len(live_data)
    assert "live capture is not possible on this Xen" in caplog.text
    assert "CONFIG_SHADOW_PAGING" in caplog.text


def test_a_given_lookup_replaces_both_xl_domid_calls(store, fake) -> None:
    image = captured(store, fake)
    (fake.state / "domains" / "vm1").unlink()
    asked = []

    def lookup(name: str) -> int | None:
        asked.append(name)
        return None if len(asked) == 1 else 42
    result = restore(store, image, xl=fake.argv, domid_of=lookup)
    assert result.domid == 42 and asked == ["pbr-guest", "pbr-guest"]
    assert not any(c[0] == "domid" for c in fake.calls())
