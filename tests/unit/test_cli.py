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
    assert code == 1 and "domain name already in use" in err


def test_bad_config_is_an_error_naming_the_setting(tmp_path, xl_log, capsys) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG + "xenpbr_crash_loop_limit = 0\n")
    code, _, err = run(tmp_path / "s", "create", str(cfg), capsys=capsys)
    assert code == 1 and "xenpbr_crash_loop_limit" in err
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
    assert row["images"] == {"valid": 2, "phases": 2} and row["recoveries"] == 1
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
        assert code == 1 and "'nope' is not registered" in err, argv


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


# --- issue 12: a Unix tool (point 4), typed JSON (5), why a recovery happened (7),
# --- disk policies in status (2)

OWNED_ELSEWHERE = {"create", "check", "unregister"}  # their help is tested with them


def subparsers() -> dict[str, "argparse.ArgumentParser"]:
    import argparse
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version_prints_and_exits_0(capsys) -> None:
    from xenpbr import __version__
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and __version__ in capsys.readouterr().out


def test_help_has_no_rest_markup_and_every_option_has_help(capsys) -> None:
    top = cli.build_parser()
    texts = [top.format_help()]
    assert all(a.help for a in top._actions), "a global option has no help"
    for name, sub in subparsers().items():
        texts.append(sub.format_help())
        if name not in OWNED_ELSEWHERE:
            assert all(a.help for a in sub._actions), f"{name}: an option has no help"
    for text in texts:
        assert "``" not in text and ":meth:" not in text and ":mod:" not in text, text
        assert "exit codes:" in text and "2    usage error" in text


def test_usage_errors_exit_2_runtime_errors_exit_1(registered, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--state-dir", str(registered), "images"])  # DOMAIN missing
    assert done.value.code == 2 and "required: domain" in capsys.readouterr().err
    code, _, err = run(registered, "history", "nope", capsys=capsys)
    assert code == 1 and err.startswith("xenpbr: error:") and "Traceback" not in err


def test_missing_xl_is_a_clear_error(registered, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = run(registered, "inject", "web", capsys=capsys)
    assert code == 1 and "`xl` was not found on PATH" in err and len(err.splitlines()) == 1


def test_unusable_state_directory_is_a_clear_error(tmp_path, capsys) -> None:
    root = tmp_path / "s"
    (root / "domains" / "web" / "domain.json").mkdir(parents=True)  # not a file
    code, _, err = run(root, "images", "web", capsys=capsys)
    assert code == 1 and f"state directory {root} is unusable" in err
    assert "--state-dir" in err and len(err.splitlines()) == 1


def test_history_json_into_a_closed_pipe_exits_quietly(registered) -> None:
    """``xenpbr history D --json | head -1``: no BrokenPipe traceback."""
    import subprocess
    import sys
    state = StateDir(registered)
    for i in range(300):  # more than a pipe buffer of JSON
        t = Timeline("web", "crash", method="phase:app", outcome="recovered")
        t.mark("crash_seen", now=float(i))
        state.add_history(t)
    proc = subprocess.run(
        f"{sys.executable} -m xenpbr.cli --state-dir {registered} history web --json"
        " | head -1", shell=True, capture_output=True, text=True, check=False)
    assert proc.stdout.strip() == "[" and proc.stderr == "", proc.stderr


def test_images_table_says_yes_no_never_python_values(registered, capsys) -> None:
    p = StateDir(registered).phases("web")
    p.phases = ("kernel", "app", "extra")
    p.images["app"] = ImageInfo(A_ID, "app", "F", 2000.0, verified=False, seq=2)
    StateDir(registered).save_phases(p)
    code, out, _ = run(registered, "images", "web", capsys=capsys)
    assert code == 0
    for word in ("True", "False", "None"):
        assert word not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["kernel"][2] == "yes" and rows["app"][2] == "no" and rows["extra"][1] == "-"


def test_forget_an_unknown_phase_is_an_error_naming_the_phases(registered, capsys) -> None:
    code, out, err = run(registered, "forget", "web", "--phase", "typo", capsys=capsys)
    assert code == 1 and "no phase 'typo'" in err and "kernel, app" in err
    assert len(StateDir(registered).phases("web").images) == 2  # nothing dropped


def test_status_json_is_typed(registered, capsys) -> None:
    code, out, _ = run(registered, "status", "--json", capsys=capsys)
    (row,) = json.loads(out)
    assert row["phases"] == ["kernel", "app"] and row["generation"] == 0
    assert row["newest_image_at"] == "1970-01-01T00:33:20+00:00"
    last = row["last_recovery"]
    assert last["method"] == "phase:app" and last["downtime_s"] == 2.0
    assert last["outcome"] == "recovered" and last["started_at"].endswith("+00:00")


def test_status_shows_each_disks_policy(tmp_path, capsys) -> None:
    root = tmp_path / "s"
    state = StateDir(root)
    disks = ["vdev=xvda, target=/img/root", "/img/data,raw,xvdb,rw", "/img/iso,raw,xvdc,r"]
    state.register("web", {"name": "web", "disk": disks,
                           "xenpbr_disks": ["xvda=snapshot", "xvdb=persistent"]}, "", "c")
    state.register("old", {"name": "old", "disk": disks,
                           "xenpbr_disks": ["xvdb=bogus"]}, "", "c")
    code, out, _ = run(root, "status", capsys=capsys)
    assert code == 0 and "xvda=snapshot,xvdb=persistent,xvdc=readonly" in out
    code, out, _ = run(root, "status", "--json", capsys=capsys)
    rows = {r["name"]: r["disk_policies"] for r in json.loads(out)}
    assert rows["web"] == {"xvda": "snapshot", "xvdb": "persistent", "xvdc": "readonly"}
    assert rows["old"] == {"xvda": "unset", "xvdb": "bogus", "xvdc": "unset"}


def test_history_table_shows_every_attempt_and_skipped_image(registered, capsys) -> None:
    t = Timeline("web", "crash", attempts=[f"phase:app failed: manifest of image {A_ID} "
                                           "has a checksum mismatch", "phase:kernel"],
                 skipped=[f"{K_ID} (kernel): stale fingerprint",
                          "crash loop: 3 crashes within 60 s of a recovery"])
    t.mark("crash_seen", now=1.0)
    t.mark("restore_finished", now=4.5)
    t.method, t.outcome = "phase:kernel", "recovered"
    StateDir(registered).add_history(t)
    code, out, _ = run(registered, "history", "web", capsys=capsys)
    assert code == 0 and all(len(line) <= 100 for line in out.splitlines()), out
    text = " ".join(out.split())  # long lines are wrapped
    assert "attempt 1: phase:app failed: manifest of image" in text
    assert "checksum mismatch" in text
    assert "attempt 2: phase:kernel (brought it back)" in text
    assert f"skipped {K_ID} (kernel): stale fingerprint" in text
    assert "skipped crash loop: 3 crashes" in text


def test_daemon_refuses_json_it_would_ignore(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["daemon", "--json"])
    assert done.value.code == 2 and "unrecognized arguments: --json" in capsys.readouterr().err
