"""``xenpbr ... --json`` against its contract, docs/cli-json.md.

The schema is not written twice: this test parses the doc's tables (key, type, null
when) and checks each command's real output on a populated state directory against
them, key by key, so the doc and the code cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from xenpbr import cli
from xenpbr.phases import ImageInfo
from xenpbr.state import StateDir
from xenpbr.timeline import AppResurrection, Timeline

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli-json.md"
Spec = dict[str, tuple[str, bool]]  # key path -> (type, nullable)

#: Keys the test data cannot give a value (documented as null in that case).
ALWAYS_NULL_HERE = {"images": {"raw_bytes", "stored_bytes"}}  # no store manifests


def contract() -> dict[str, tuple[bool, Spec]]:
    """command -> (is a list, {key path: (type, nullable)}) from the doc's sections."""
    sections = re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]
    found: dict[str, tuple[bool, Spec]] = {}
    for section in sections:
        head = re.match(r"`xenpbr ([\w-]+)", section)
        rows = re.findall(r"^\| `([^`]+)` \| ([^|]+?) \| ([^|]+?) \|$", section, flags=re.M)
        if head and rows:
            is_list = "\nA list of" in section
            found[head.group(1)] = (is_list, {k: (t, not n.startswith("never"))
                                              for k, t, n in rows})
    return found


def is_type(value: Any, typ: str) -> bool:
    """Does ``value`` (not None) have the doc's type ``typ``?"""
    if typ.startswith("list of "):
        return isinstance(value, list) and all(is_type(v, typ[8:]) for v in value)
    if typ.startswith("map of "):
        return isinstance(value, dict) and all(is_type(v, typ[7:]) for v in value.values())
    if typ == "time":
        return isinstance(value, str) and datetime.fromisoformat(value).utcoffset() is not None
    simple = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
              "object": dict}[typ]
    return isinstance(value, simple) and (typ == "boolean" or not isinstance(value, bool))


def check(obj: dict[str, Any], spec: Spec, prefix: str, seen: set[str]) -> None:
    """Every key of ``obj`` documented under ``prefix``, none missing, each typed."""
    documented = {k[len(prefix):] for k in spec
                  if k.startswith(prefix) and "." not in k[len(prefix):]}
    assert set(obj) == documented, f"{prefix or 'top level'}: keys differ from the doc"
    for key, value in obj.items():
        path = prefix + key
        typ, nullable = spec[path]
        if value is None:
            assert nullable, f"{path} is null but the doc says never"
            continue
        seen.add(path)
        assert is_type(value, typ), f"{path} = {value!r} is not {typ}"
        if typ == "object":
            check(value, spec, path + ".", seen)
        elif typ == "list of object":
            for item in value:
                check(item, spec, path + "[].", seen)


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A registered domain with images, a missing one, two recoveries; a fake xl."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "xl").write_text("#!/bin/sh\nexit 0\n")
    (bindir / "xl").chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    state = StateDir(tmp_path / "s")
    state.register("web", {"name": "web", "on_crash": "phasereboot",
                           "disk": ["vdev=xvda, target=/img/root", "/img/d,raw,xvdb,rw"],
                           "xenpbr_disks": ["xvda=snapshot", "xvdb=persistent"]}, "", "c")
    phases = state.phases("web")
    phases.phases, phases.fingerprint = ("kernel", "app", "late"), "F"
    phases.record_image(ImageInfo("20261123T201535.123456Z-3fa9c2", "kernel", "F", 1000.0, seq=1, capture_s=1.5,
                                  paused_s=0.2, disks_s=0.1, disk_mechanisms="xvda=copy"))
    phases.record_image(ImageInfo("20261123T201599.123456Z-3fa9c3", "app", "OLD", 2000.0, seq=2))
    state.save_phases(phases)
    ok = Timeline("web", "crash", attempts=["phase:app failed: corrupt", "phase:kernel"],
                  skipped=["img-x (app): stale fingerprint"], generation=1, domid=12)
    for i, mark in enumerate(("crash_seen", "image_chosen", "restore_finished")):
        ok.mark(mark, "detail" if i == 1 else "", now=10.0 + i)
    ok.method, ok.outcome = "phase:kernel", "recovered"
    ok.resurrection = [AppResurrection("kv", 1, 12, {"crc": 1}, 16384, 0.01)]
    ok.mark("extracted", "1 regions read", now=10.5)
    keep_resurrected(state)
    failed = Timeline("web", "operator", outcome="failed", attempts=["normal-reboot failed"])
    state.add_history(failed)
    state.add_history(ok)  # the last one: status shows it
    (state.images_root / "standby").mkdir(parents=True)
    (state.images_root / "standby" / "web.json").write_text(json.dumps({
        "domain": "web", "image_id": "20261123T201535.123456Z-3fa9c2", "name": "web--standby",
        "domid": 14, "snapshot_disks": ["xvda"], "memory_mib": 128, "prepared_s": 2.5}))
    (tmp_path / "api.cfg").write_text(
        'name = "api"\non_crash = "phasereboot"\nuuid = "5a4c5e6b-1111-2222-3333-444455556666"\n'
        'disk = ["vdev=xvda, target=/img/api"]\nxenpbr_disks = ["xvda=snapshot"]\n')
    return state.root


def keep_resurrected(state: StateDir) -> None:
    """The vault holds one good application (with a lost record) and one damaged file."""
    from xenpbr.resurrection.model import AppExtraction, Extraction, Record, Rejection
    from xenpbr.resurrection.vault import Vault
    vault = Vault.in_state(state.root)
    lost = [Rejection("kv", "crc", slot=3, seq=9, key=b"k9"), Rejection("kv", "torn", slot=4)]
    vault.keep("web", Extraction(12, [AppExtraction("kv", 2, [Record(b"k", 1, b"v")], lost),
                                      AppExtraction("db", 1, [Record(b"d", 1, b"x")])]), 1e9)
    damaged = vault.root / "web" / "db.vault"
    damaged.write_bytes(damaged.read_bytes() + b"!")


def run_json(root: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> Any:
    assert cli.main(["--state-dir", str(root), *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


COMMANDS = {"status": ["status"], "images": ["images", "web"], "history": ["history", "web"],
            "inject": ["inject", "web"], "resurrected": ["resurrected", "web"], "gc": ["gc"], "scrub": ["scrub"],
            "forget": ["forget", "web", "--phase", "app"],  # these last: they change state
            "create": ["create", "{tmp}/api.cfg"], "check": ["check", "{tmp}/api.cfg"],
            "unregister": ["unregister", "web"]}
#: ``--export`` with a damaged file exits 1: test_resurrected_export covers it (test_cli).
ALWAYS_NULL_HERE["resurrected"] = {"exported_to"}
#: Keys the test's fake xl cannot give a value (no domain runs).
ALWAYS_NULL_HERE["unregister"] = {"domid"}
#: Read from xenstore, which the test has not (tests/unit/test_why.py covers each value).
ALWAYS_NULL_HERE["status"] = {"no_image_why"}
#: ``inject web`` is a sysrq crash, which changes no byte; the memory faults' keys are
#: checked by test_faults.py::test_inject_json_of_a_memory_fault_matches_the_contract,
#: the provoked ones' by test_provoke.py::test_inject_lkdtm_json_matches_the_contract.
ALWAYS_NULL_HERE["inject"] = {k for k in contract().get("inject", (False, {}))[1]
                              if k.startswith(("change", "provoked", "reach"))
                              or k in ("seed", "domid")}
NOT_RUN = {"reboot"}  # needs Xen and xenstore; its object is a history entry
#: Needs a guest's kernel memory: test_faults.py::test_fault_check_json_matches_the_contract
#: runs it over the fake hypervisor's synthetic guest.
CHECKED_ELSEWHERE = {"fault-check"}
#: An empty store gives empty lists; test_scrub_json_on_a_damaged_store fills them.
ALWAYS_NULL_HERE["scrub"] = {k for k in contract().get("scrub", (False, {}))[1] if "[]." in k}


def test_the_doc_covers_every_command_the_test_runs() -> None:
    assert set(contract()) == set(COMMANDS) | CHECKED_ELSEWHERE, \
        "a section of docs/cli-json.md is not tested"
    assert all(f"`xenpbr {c} " in DOC.read_text() for c in NOT_RUN)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_json_output_matches_the_documented_contract(command: str, state_dir: Path,
                                                     capsys) -> None:
    is_list, spec = contract()[command]
    argv = [a.replace("{tmp}", str(state_dir.parent)) for a in COMMANDS[command]]
    out = run_json(state_dir, *argv, capsys=capsys)
    items = out if is_list else [out]
    assert isinstance(out, list) == is_list and items, f"{command}: shape or no rows"
    seen: set[str] = set()
    for item in items:
        check(item, spec, "", seen)
    unseen = set(spec) - seen - ALWAYS_NULL_HERE.get(command, set())
    assert not unseen, f"{command}: test data never gave these a value: {sorted(unseen)}"


def test_scrub_json_on_a_damaged_store(state_dir: Path, capsys) -> None:
    """A flipped page (its image marked invalid) and a flipped hot stream: every list of
    the scrub report has rows (an unusable pack index is covered by its own type)."""
    import io

    from tests.unit.streams import synth
    from xenpbr.images import hotcache
    from xenpbr.images.pagestore import PACK_HEADER, RECORD
    from xenpbr.images.store import ImageStore
    from xenpbr.stream import read_stream
    store = ImageStore(StateDir(state_dir).images_root)
    web_pack = None
    for domain, salt in (("web", b"a"), ("api", b"b")):
        data = b"".join(synth.iter_pv_stream(synth.PvStreamSpec(
            nr_pfns=64, content=lambda pfn, s=salt: s * 8 + pfn.to_bytes(8, "little") * 511)))
        with store.begin_capture(domain, "boot") as writer:
            meta = writer.commit(read_stream(io.BytesIO(data), on_page=writer.on_page))
        hot = hotcache.warm(store, domain, meta.image_id)  # api's stays: flipped below
        web_pack = web_pack if domain == "api" else next(store.pages.dir.glob("*.pack"))
    for path, offset in ((web_pack, PACK_HEADER.size + RECORD.size + 9), (hot, 100)):
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 1
        path.write_bytes(bytes(raw))
    _, spec = contract()["scrub"]
    report = run_json(state_dir, "scrub", capsys=capsys)
    seen: set[str] = set()
    check(report, spec, "", seen)
    assert report["clean"] is False
    assert not set(spec) - seen - {k for k in spec if k.startswith("unusable_packs[].")}


def test_an_invalid_config_has_the_same_check_keys(state_dir: Path, capsys) -> None:
    _, spec = contract()["check"]
    bad = state_dir.parent / "bad.cfg"
    bad.write_text('name = "api"\non_crash = "phasereboot"\nxenpbr_disk = ["xvda=snapshot"]\n')
    assert cli.main(["--state-dir", str(state_dir), "check", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    check(report, spec, "", set())
    assert report["valid"] is False and "xenpbr_disks" in report["errors"][0]
