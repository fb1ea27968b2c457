"""xenpbrd's delivery of resurrected data over the fake hypervisor and fake xenstore: a crash
is extracted (fake extract), the recovered guest gets the data before its ack (or at
adoption after a normal reboot), the agent's hand-over confirms, the vault empties; a
``bad`` answer keeps the data, hostile answers change nothing and cost bounded reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_controller_resurrect import MARK, crash_with_region, world  # noqa: F401
from tests.unit.test_daemon import published, settle
from xenpbr.controller import publishing
from xenpbr.daemon import READ_BUDGET
from xenpbr.guestproto import control
from xenpbr.guestproto.resurrection_delivery import CONFIRM_DIR, DELIVERY_DIR
from xenpbr.resurrection.deliver import manifest_path
from xenpbr.resurrection.model import Record
from xenpbr.resurrection.vault import Vault
from xenpbr_agent.config import parse_config
from xenpbr_agent.resurrected import hand_over_all, load_resurrected

ON = "xenpbr_resurrect = 1"


def recovered_domid(w) -> int:
    return [c for c in w.rec.calls if c[0] == "unpause"][-1][1]


def held(w) -> list:
    return Vault.in_state(w.state.root).held("web")


def agent_hands_over(w, domid: int, root: Path) -> list:
    """The guest agent's ``xenpbr-agent resurrected``, run as the guest ``domid``."""
    with w.server.connect(domid) as guest:
        return hand_over_all(guest, parse_config("", "agent.conf"), root=str(root))


def test_the_data_is_delivered_before_the_ack_while_the_domain_is_paused(world) -> None:
    w = world(ON)
    seen: list[tuple[bytes | None, bool]] = []
    protocol = w.daemon.controller.protocol
    restored = protocol.restored

    def recording(domid: int, seq: int, generation: int) -> None:
        manifest = w.server.connect(0).read_or(manifest_path(domid, "kv"), None)
        seen.append((manifest, w.hv.domain_state(domid).paused))
        restored(domid, seq, generation)
    protocol.restored = recording
    crash_with_region(w)
    [(manifest, paused)] = seen
    assert manifest is not None and manifest.startswith(b"1 1 ") and paused
    new = recovered_domid(w)
    assert w.server.connect(0).read(control.ack_path(new)) == b"1 restored:1"
    assert published(w.server)["resurrected/waiting"] == "1"
    assert published(w.server)["resurrected/apps/kv"] == "waiting generation=1"


def test_the_agents_confirmation_empties_the_vault_and_clears_the_keys(world,
                                                                       tmp_path) -> None:
    w = world(ON)
    crash_with_region(w, value=b"acked-7")
    new = recovered_domid(w)
    [outcome] = agent_hands_over(w, new, tmp_path / "run")
    assert outcome.confirmation is not None and outcome.confirmation.ok
    assert load_resurrected("kv", str(tmp_path / "run")) == {b"k": b"acked-7"}
    settle(w.daemon)
    assert held(w) == []
    dom0 = w.server.connect(0)
    assert dom0.read_or(manifest_path(new, "kv"), None) is None
    assert dom0.read_or(f"/local/domain/{new}/{CONFIRM_DIR}/kv", None) is None
    [timeline] = w.state.history("web")
    [mark] = [m for m in timeline.marks if m.name == "delivered"]
    assert mark.detail == "kv generation 1"
    assert published(w.server)["resurrected/waiting"] == "0"
    assert "resurrected/apps/kv" not in published(w.server)


def crash_without_image(w, value: bytes = b"acked-9", pfn: int = 7) -> int:
    """A crash with a region but no image: the recovery falls back to a normal reboot."""
    domid = w.hv.create_domain(name="web")
    settle(w.daemon)
    w.hv.write_pfn(domid, pfn, MARK + value + b"\0")
    w.server.connect(domid).write("data/xenpbr/resurrect/kv", f"1 1 4 {pfn} {pfn + 1}".encode())
    w.hv.crash(domid)
    settle(w.daemon)
    return domid


def test_a_normal_reboot_is_delivered_to_at_adoption(world, tmp_path) -> None:
    w = world(ON)
    crashed = crash_without_image(w)
    [timeline] = w.state.history("web")
    assert timeline.method == "normal-reboot"
    new = timeline.domid
    assert new is not None and new != crashed
    assert w.server.connect(0).read_or(manifest_path(new, "kv"), None) is not None
    [outcome] = agent_hands_over(w, new, tmp_path)
    assert outcome.confirmation is not None and outcome.confirmation.ok
    settle(w.daemon)
    assert held(w) == []


def test_a_fresh_boot_of_a_domain_with_data_in_the_vault_is_delivered_to(world) -> None:
    w = world(ON)
    crash_with_region(w)
    old = recovered_domid(w)
    w.hv.destroy(old)  # the operator shut it down before the agent ran
    settle(w.daemon)
    assert len(held(w)) == 1
    fresh = w.hv.create_domain(name="web")
    settle(w.daemon)
    assert w.server.connect(0).read_or(manifest_path(fresh, "kv"), None) is not None


def test_adoption_keeps_a_complete_delivery_and_its_confirmation(world) -> None:
    w = world(ON)
    crash_with_region(w)
    new = recovered_domid(w)
    guest = w.server.connect(new)
    guest.write(f"{CONFIRM_DIR}/kv", b"bad 1 procedure-failed")
    deliveries = w.daemon.controller.deliveries
    assert deliveries.at_adoption("web", new) == 0  # nothing rewritten ...
    assert guest.read(f"{CONFIRM_DIR}/kv") == b"bad 1 procedure-failed"  # ... nor voided


def test_a_bad_confirmation_keeps_the_data_and_is_published(world, monkeypatch,
                                                              caplog) -> None:
    monkeypatch.setattr(publishing, "PUBLISH_EVERY_S", 0.0)
    w = world(ON)
    crash_with_region(w)
    new = recovered_domid(w)
    guest = w.server.connect(new)
    for _ in range(3):  # said three times: logged once
        guest.write(f"{CONFIRM_DIR}/kv", b"bad 1 crc")
        settle(w.daemon)
    assert len(held(w)) == 1
    assert w.server.connect(0).read_or(manifest_path(new, "kv"), None) is not None
    assert published(w.server)["resurrected/apps/kv"] == "bad generation=1 reason=crc"
    assert caplog.text.count("refused its resurrected data") == 1


@pytest.mark.parametrize("answer", [
    b"ok 2",              # another generation
    b"ok 1 extra",        # ok takes no reason
    b"yes",               # garbage
    b"ok 0001",           # not a strict integer
    b"\xff" * 90,         # binary
])
def test_a_hostile_confirmation_changes_nothing(world, answer: bytes) -> None:
    w = world(ON)
    crash_with_region(w)
    new = recovered_domid(w)
    guest = w.server.connect(new)
    guest.write(f"{CONFIRM_DIR}/kv", answer)
    guest.write(f"{CONFIRM_DIR}/other", b"ok 1")  # an app dom0 never delivered
    settle(w.daemon)
    assert [h.records for h in held(w)] == [[Record(b"k", 1, b"acked-42")]]
    assert w.server.connect(0).read_or(manifest_path(new, "kv"), None) is not None
    assert published(w.server)["resurrected/apps/kv"] == "waiting generation=1"
    [timeline] = w.state.history("web")
    assert timeline.at("delivered") is None


def test_a_confirmation_flood_costs_the_same_read_budget_as_requests(world) -> None:
    w = world(ON)
    now = [0.0]  # the budgets' clock: time stands still (no refill) until moved
    w.daemon.controller.protocol.gate.clock = lambda: now[0]
    crash_with_region(w)
    new = recovered_domid(w)
    deliveries = w.daemon.controller.deliveries
    served = []
    on_confirmation = deliveries.on_confirmation

    def counting(name: str, domid: int) -> bool:
        served.append(domid)
        return on_confirmation(name, domid)
    deliveries.on_confirmation = counting
    guest = w.server.connect(new)
    for i in range(300):  # a turn after each write: as fast as the guest can write
        guest.write(f"{CONFIRM_DIR}/kv", f"bad 1 r{i}".encode())
        w.daemon.turn()
    # at most the burst of the read budget (the watch's first firing may have spent one)
    assert 0 < len(served) <= READ_BUDGET.requests
    guest.write(f"{CONFIRM_DIR}/kv", b"ok 1")
    w.daemon.turn()
    assert len(held(w)) == 1  # out of budget: not read yet (its mark is kept) ...
    now[0] = 10.0
    w.daemon.turn()
    assert held(w) == []  # ... and served once the budget refills


def test_a_delivery_that_fails_never_fails_the_recovery(world, monkeypatch) -> None:
    from xenpbr.controller import delivery

    def refused(*args, **kwargs):
        raise delivery.XenpbrError("xenstored said no")
    monkeypatch.setattr(delivery, "write_delivery", refused)
    w = world(ON)
    crash_with_region(w)
    [timeline] = w.state.history("web")
    assert timeline.outcome == "recovered" and timeline.method == "phase:app"
    assert len(held(w)) == 1  # kept for the next try


def test_the_watch_is_on_the_guests_confirmation_directory() -> None:
    path, token = control.resurrected_watch(12)
    assert path == f"/local/domain/12/{CONFIRM_DIR}"
    assert control.domid_from_resurrected_token(token) == 12
    assert control.domid_from_token(token) is None
    assert control.domid_from_resurrected_token("xenpbr-resurrected-12x") is None
    assert DELIVERY_DIR.startswith("control/")  # dom0's side, read-only for the guest


def test_a_restarted_daemon_still_honours_the_confirmation(world, tmp_path) -> None:
    from tests.unit.test_daemon import Recorder
    from xenpbr.daemon import Daemon
    from xenpbr.images.store import ImageStore
    w = world(ON)
    crash_with_region(w)
    new = recovered_domid(w)
    rec = Recorder(w.hv)
    again = Daemon(w.state, ImageStore(w.state.images_root), w.hv, w.server.connect(0),
                   w.server.connect(0), toolstack=rec, restorer=rec, capture_fn=rec.capture)
    again.watcher.start()
    settle(again)  # adopts the running domid: its complete delivery is kept, not rewritten
    [outcome] = agent_hands_over(w, new, tmp_path)
    assert outcome.confirmation is not None and outcome.confirmation.ok
    settle(again)
    assert held(w) == []


def test_the_delivered_mark_is_once_per_extracted_application() -> None:
    from xenpbr.timeline import AppResurrection, Timeline
    timeline = Timeline("web", "crash", resurrection=[AppResurrection("kv")])
    assert not timeline.note_delivered("other", 1, now=1.0)  # not extracted by it
    assert timeline.note_delivered("kv", 3, now=2.0)
    assert not timeline.note_delivered("kv", 3, now=3.0)
    assert [(m.name, m.detail) for m in timeline.marks] == [("delivered", "kv generation 3")]
    assert Timeline.from_json(timeline.to_json()).at("delivered") == 2.0


def test_published_delivery_keys_count_all_and_name_only_safe_apps() -> None:
    from xenpbr.publish import MAX_PUBLISHED_APPS, delivery_keys
    lines = {f"app{i:02d}": "waiting generation=1" for i in range(MAX_PUBLISHED_APPS + 3)}
    lines["../evil"] = "waiting generation=1"
    keys = delivery_keys(lines)
    assert keys["resurrected/waiting"] == str(len(lines))
    apps = [k for k in keys if k.startswith("resurrected/apps/")]
    assert len(apps) == MAX_PUBLISHED_APPS and "resurrected/apps/../evil" not in keys


def test_status_counts_the_applications_waiting_for_confirmation(tmp_path, capsys) -> None:
    import json

    from xenpbr import cli
    from xenpbr.resurrection.model import AppExtraction, Extraction
    from xenpbr.state import StateDir
    state = StateDir(tmp_path)
    state.register("web", {"name": "web", "on_crash": "phasereboot"}, "", "web.cfg")
    vault = Vault.in_state(state.root)
    vault.keep("web", Extraction(3, [AppExtraction(app, 1, [Record(b"k", 1, b"v")])
                                     for app in ("kv", "db")]), at=1.0)
    assert cli.main(["--state-dir", str(tmp_path), "status", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["resurrected_waiting"] == 2
    vault.drop("web", "kv")  # what a confirmation does
    assert cli.main(["--state-dir", str(tmp_path), "status"]) == 0
    out = capsys.readouterr().out
    header, line = out.splitlines()[:2]
    column = header.index("RESURRECTED")  # the table aligns its columns
    assert line[column:].split()[0] == "1"


def test_books_of_an_earlier_domain_with_the_same_domid_are_not_used(world) -> None:
    w = world(ON)
    crash_with_region(w)
    new = recovered_domid(w)
    deliveries = w.daemon.controller.deliveries
    w.server.connect(new).write(f"{CONFIRM_DIR}/kv", b"ok 1")
    assert not deliveries.on_confirmation("calm", new)  # another domain's name: ignored
    assert len(held(w)) == 1
    assert deliveries.on_confirmation("web", new) and held(w) == []
