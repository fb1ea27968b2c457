"""The ``xenpbr`` CLI over a temporary state directory and a stand-in ``xl``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from xenpbr import cli
from xenpbr.phases import ImageInfo
from xenpbr.state import StateDir
from xenpbr.timeline import Timeline

K_ID, A_ID = "20261123T201535.123456Z-3fa9c2", "20261123T201599.123456Z-3fa9c3"
CONFIG = ('name = "web"\nkernel = "/nonexistent/vmlinuz"\nmemory = 128\n'
          'on_crash = "phasereboot"\non_watchdog = "phasereboot"\n')


@pytest.fixture
def xl_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``xl`` first on PATH: records its argv, fails if $FAKE_XL_FAIL is set."""
    bindir, log = tmp_path / "bin", tmp_path / "xl.log"
    bindir.mkdir()
    script = bindir / "xl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                      '[ -n "$FAKE_XL_FAIL" ] && { echo "xl: $FAKE_XL_FAIL" >&2; exit 1; }\n'
                      'exit 0\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def run(state: Path, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["--state-dir", str(state), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_registers_translates_and_calls_xl(tmp_path, xl_log, capsys) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG)
    code, out, _ = run(tmp_path / "s", "create", str(cfg), "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["on_crash"] == "phasereboot"
    xl_cfg = StateDir(tmp_path / "s").xl_config_path("web")
    assert xl_log.read_text() == f"create {xl_cfg}\n"
    assert 'on_crash = "preserve"' in xl_cfg.read_text()
    assert 'on_watchdog = "preserve"' in xl_cfg.read_text()


def test_create_reports_xl_failure(tmp_path, xl_log, capsys, monkeypatch) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG)
    monkeypatch.setenv("FAKE_XL_FAIL", "domain name already in use")
    code, _, err = run(tmp_path / "s", "create", str(cfg), capsys=capsys)
    assert code == 2 and "domain name already in use" in err


def test_bad_config_is_an_error_naming_the_setting(tmp_path, xl_log, capsys) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG + "xenpbr_crash_loop_limit = 0\n")
    code, _, err = run(tmp_path / "s", "create", str(cfg), capsys=capsys)
    assert code == 2 and "xenpbr_crash_loop_limit" in err
    assert not xl_log.exists()  # nothing was handed to xl


@pytest.fixture
def registered(tmp_path: Path) -> Path:
    root = tmp_path / "s"
    state = StateDir(root)
    state.register("web", {"name": "web", "on_crash": "phasereboot"}, 'name = "web"\n', "c")
    p = state.phases("web")
    p.phases, p.fingerprint = ("kernel", "app"), "F"
    p.record_image(ImageInfo(K_ID, "kernel", "F", 1000.0, seq=1))
    p.record_image(ImageInfo(A_ID, "app", "F", 2000.0, seq=2))
    state.save_phases(p)
    t = Timeline("web", "crash")
    for i, mark in enumerate(("crash_seen", "image_chosen", "restore_finished")):
        t.mark(mark, now=10.0 + i)
    t.method, t.outcome = "phase:app", "recovered"
    state.add_history(t)
    return root


def test_status_images_history_tables_and_json(registered, capsys) -> None:
    code, out, _ = run(registered, "status", capsys=capsys)
    assert code == 0 and "web" in out and "phase:app (2.0 s)" in out
    code, out, _ = run(registered, "status", "--json", capsys=capsys)
    (row,) = json.loads(out)
    assert row["images"] == "2/2" and row["recoveries"] == 1
    code, out, _ = run(registered, "images", "web", "--json", capsys=capsys)
    assert [(r["phase"], r["image"], r["valid"]) for r in json.loads(out)] == [
        ("kernel", K_ID, True), ("app", A_ID, True)]
    code, out, _ = run(registered, "history", "web", "--json", capsys=capsys)
    assert json.loads(out)[0]["since_crash"]["restore_finished"] == 2.0


def test_forget_drops_the_phase_and_later_ones(registered, capsys) -> None:
    code, out, err = run(registered, "forget", "web", "--phase", "kernel", "--json",
                       capsys=capsys)
    assert code == 0, err
    assert {r["phase"] for r in json.loads(out)} == {"kernel", "app"}
    assert StateDir(registered).phases("web").images == {}


def test_unknown_domain_is_a_clear_error(registered, capsys) -> None:
    for argv in (["images", "nope"], ["history", "nope"], ["forget", "nope"],
                 ["inject", "nope"]):
        code, _, err = run(registered, *argv, capsys=capsys)
        assert code == 2 and "'nope' is not registered" in err, argv


def test_inject_crashes_the_kernel_with_sysrq(registered, xl_log, capsys) -> None:
    code, out, _ = run(registered, "inject", "web", capsys=capsys)
    assert code == 0 and "crash injected" in out
    assert xl_log.read_text() == "sysrq web c\n"


def test_gc_reclaims_what_forget_dropped(tmp_path, capsys) -> None:
    from xenpbr.cli import main
    from xenpbr.images.store import ImageStore
    from xenpbr.state import StateDir
    state = StateDir(tmp_path)
    store = ImageStore(state.images_root)
    (store.pages.dir / "orphan.pack").write_bytes(b"x" * 100)  # an interrupted capture
    assert main(["--state-dir", str(tmp_path), "gc", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["reclaimed_bytes"] == 100 and not (store.pages.dir / "orphan.pack").exists()
