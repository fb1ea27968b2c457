"""The daemon's resurrection step over the fake hypervisor and fake xenstore: caps from
the config, registrations from the guest's keys, frames from the crashed domain, the
result in the vault and the timeline; recovery goes on whatever extraction does."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from tests.unit.test_daemon import Recorder, request, settle
from xenpbr.controller.resurrect import (
    HypervisorFrames,
    ResurrectionExtractor,
    frames_opener,
    summarise,
)
from xenpbr.daemon import Daemon
from xenpbr.hypervisor.fake import FakeHypervisor
from xenpbr.hypervisor.guest_memory import PfnNotPresent
from xenpbr.images.store import ImageStore
from xenpbr.resurrection.model import AppExtraction, Caps, Extraction, Record, Rejection
from xenpbr.resurrection.vault import Vault
from xenpbr.state import StateDir
from xenpbr.xenstore import FakeXenstoreServer

MARK = b"XPBRRGN1"


def fake_registrations(xs, domid, limit):
    """What read_registrations would give: the guest's keys, at most ``limit``."""
    base = f"/local/domain/{domid}/data/xenpbr/resurrect"
    apps = sorted(xs.ls(base)) if xs.read_or(base) is not None else []
    return {app: xs.read(f"{base}/{app}") for app in apps[:limit]}


class FakeExtract:
    """Reads the pfn each registration names through the real frame reader, so the
    crashed domain's memory (and the caps) are really involved."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, bytes], Caps, int]] = []

    def __call__(self, memory, registrations, caps, *, domid, clock) -> Extraction:
        self.calls.append((dict(registrations), caps, domid))
        out = Extraction(domid=domid)
        for app, raw in registrations.items():
            pfn = int(raw.split()[3])
            try:
                [page] = memory.read_pfns([pfn])
            except PfnNotPresent as exc:
                out.apps.append(AppExtraction(app, 1, rejections=[
                    Rejection(app, "bounds", str(exc))]))
                continue
            value = page[8:page.index(b"\0", 8)]
            out.apps.append(AppExtraction(app, 1, [Record(b"k", 1, value)], bytes_read=4096,
                                          seconds=0.001))
        return out


@pytest.fixture
def world(tmp_path: Path):
    def make(config_line: str):
        server = FakeXenstoreServer()
        hv = FakeHypervisor(server)
        state = StateDir(tmp_path)
        settings = {"name": "web", "on_crash": "phasereboot"}
        if config_line:
            key, _, value = config_line.partition(" = ")
            settings[key] = value.strip('"') if value.startswith('"') else int(value)
        state.register("web", settings, "", "web.cfg")
        rec = Recorder(hv)
        daemon = Daemon(state, ImageStore(state.images_root), hv, server.connect(0),
                        server.connect(0), toolstack=rec, restorer=rec,
                        capture_fn=rec.capture)
        daemon.watcher.start()
        fake = FakeExtract()
        extractor = daemon.controller.extractor
        extractor.extract_fn, extractor.registrations_fn = fake, fake_registrations
        return types.SimpleNamespace(server=server, hv=hv, state=state, rec=rec,
                                     daemon=daemon, fake=fake)
    return make


def crash_with_region(w, value: bytes = b"acked-42", pfn: int = 7) -> int:
    domid = w.hv.create_domain(name="web")
    settle(w.daemon)
    guest = w.server.connect(domid)
    guest.write("data/xenpbr/request", request(1, "app"))
    settle(w.daemon)
    if pfn < 64 * 256:  # the fake guest's own memory
        w.hv.write_pfn(domid, pfn, MARK + value + b"\0")
    guest.write("data/xenpbr/resurrect/kv", f"1 1 4 {pfn} {pfn + 1}".encode())
    w.hv.crash(domid)
    settle(w.daemon)
    return domid


def test_a_crash_with_resurrection_on_keeps_the_records_before_the_destroy(world) -> None:
    w = world('xenpbr_resurrect = "regions=3,seconds=1"')
    domid = crash_with_region(w)
    [(registrations, caps, seen)] = w.fake.calls
    assert seen == domid and list(registrations) == ["kv"]
    assert caps == Caps(regions=3, seconds=1.0)
    [held] = Vault.in_state(w.state.root).held("web")
    assert held.records == [Record(b"k", 1, b"acked-42")]
    [timeline] = w.state.history("web")
    names = [m.name for m in timeline.marks]
    assert names.index("extracted") < names.index("destroyed")
    assert timeline.outcome == "recovered"
    assert [(a.app, a.regions, a.records) for a in timeline.resurrection] == [("kv", 1, 1)]


def test_resurrection_off_reads_nothing(world) -> None:
    w = world("")
    crash_with_region(w)
    assert w.fake.calls == []
    [timeline] = w.state.history("web")
    assert timeline.at("extracted") is None and timeline.outcome == "recovered"


def test_a_region_outside_the_guest_is_rejected_and_the_vault_keeps_nothing(world) -> None:
    w = world("xenpbr_resurrect = 1")
    crash_with_region(w, pfn=64 * 256 + 5)  # beyond the fake's 64 MiB: not the guest's
    assert Vault.in_state(w.state.root).held("web") == []
    [timeline] = w.state.history("web")
    assert [(a.regions, a.rejected) for a in timeline.resurrection] == [(0, {"bounds": 1})]


def test_an_extraction_that_blows_up_still_recovers(world, caplog) -> None:
    w = world("xenpbr_resurrect = 1")

    def broken(*args, **kwargs):
        raise ValueError("parser bug")
    w.daemon.controller.extractor.extract_fn = broken
    crash_with_region(w)
    [timeline] = w.state.history("web")
    assert timeline.outcome == "recovered" and ("destroy", "web") in w.rec.calls
    assert next(m.detail for m in timeline.marks if m.name == "extracted") == \
        "failed: parser bug"


def test_a_bad_setting_in_a_registered_config_turns_resurrection_off(world, caplog) -> None:
    w = world('xenpbr_resurrect = "regions=0"')
    crash_with_region(w)
    assert w.fake.calls == [] and "resurrection is off" in caplog.text
    assert [t.outcome for t in w.state.history("web")] == ["recovered"]


def test_hypervisor_frames_read_the_domain_and_refuse_foreign_pfns() -> None:
    hv = FakeHypervisor()
    domid = hv.create_domain(memory_mib=1)
    hv.write_pfn(domid, 3, b"hello")
    frames = frames_opener(hv)(domid)
    assert isinstance(frames, HypervisorFrames)
    assert frames.read_pfns([3])[0][:5] == b"hello"
    with pytest.raises(PfnNotPresent):
        frames.read_pfns([256])


def test_summarise_lists_refused_registrations_too() -> None:
    extraction = Extraction(7, apps=[AppExtraction("kv", 2, [Record(b"a", 1, b"x")], [
        Rejection("kv", "crc", slot=3), Rejection("kv", "crc", slot=4),
        Rejection("kv", "torn", slot=5)], 8192, 0.002)],
        refused=[Rejection("big", "cap-bytes"), Rejection("evil", "registration")])
    apps = {a.app: a for a in summarise(extraction)}
    assert (apps["kv"].regions, apps["kv"].records, apps["kv"].rejected) == \
        (1, 1, {"crc": 2, "torn": 1})
    assert apps["big"].rejected == {"cap-bytes": 1} and apps["big"].regions == 0
    assert apps["evil"].rejected == {"registration": 1}


def test_without_the_extract_module_the_failure_is_logged_not_raised(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.register("web", {"name": "web", "xenpbr_resurrect": 1}, "", "web.cfg")
    extractor = ResurrectionExtractor(state, FakeXenstoreServer().connect(0),
                                      lambda domid: HypervisorFrames(FakeHypervisor(), domid),
                                      registrations_fn=lambda xs, domid, limit: {})
    from xenpbr.timeline import Timeline
    t = Timeline("web", "crash")
    extractor.extract_fn = lambda *a, **k: Extraction(domid=3)
    extractor.extract("web", 3, t)  # no registrations: nothing read, still marked
    assert t.at("extracted") is not None and t.resurrection == []


def test_refused_names_are_made_safe_to_show() -> None:
    extraction = Extraction(7, refused=[Rejection("a\x1b[2Jb", "registration"),
                                        Rejection("x" * 300, "registration")])
    names = [a.app for a in summarise(extraction)]
    assert names == ["a\\x1b[2Jb", "x" * 37 + "..."]
