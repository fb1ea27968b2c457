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
    assert [f["fault"] for f in StateDir(registered).faults("web")] == ["crash"]


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
    assert rows["old"] == {"xvda": "unset", "xvdb": "bogus", "xvdc": "readonly"}


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


# -- issue 12 points 2, 3 and 6: create, check, unregister ------------------------------

DISKS = 'disk = ["/srv/root.img,raw,xvda,rw", "/srv/data.img,raw,xvdb,rw"]\n'


def test_create_refuses_a_rw_disk_without_a_policy_and_registers_nothing(
        tmp_path, xl_log, capsys) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG + DISKS + 'xenpbr_disks = ["xvdb=persistent"]\n')
    code, _, err = run(tmp_path / "s", "create", str(cfg), capsys=capsys)
    assert code == 1 and "xvda (target /srv/root.img)" in err
    assert 'xenpbr_disks = ["xvdb=persistent", "xvda=snapshot"]' in err
    assert not xl_log.exists() and StateDir(tmp_path / "s").domains() == []


def test_create_gives_the_domain_a_uuid_and_records_it(tmp_path, xl_log, capsys) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG + DISKS + 'xenpbr_disks = ["xvda=snapshot", "xvdb=persistent"]\n')
    code, out, _ = run(tmp_path / "s", "create", str(cfg), "--json", capsys=capsys)
    row = json.loads(out)
    state = StateDir(tmp_path / "s")
    assert code == 0 and row["disk_policies"] == {"xvda": "snapshot", "xvdb": "persistent"}
    assert state.registered_uuid("web") == row["uuid"]
    assert f'uuid = "{row["uuid"]}"' in state.xl_config_path("web").read_text()


def test_create_with_an_xl_failure_registers_nothing(tmp_path, xl_log, capsys,
                                                     monkeypatch) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG)
    monkeypatch.setenv("FAKE_XL_FAIL", "kernel image /nonexistent/vmlinuz not found")
    code, _, err = run(tmp_path / "s", "create", str(cfg), capsys=capsys)
    assert code == 1 and "xl exit status 1" in err and "nothing was registered" in err
    assert "kernel image /nonexistent/vmlinuz not found" in err
    assert StateDir(tmp_path / "s").domains() == []
    assert not (tmp_path / "s" / "domains" / "web").exists()


def test_create_twice_is_refused_unless_update(tmp_path, xl_log, capsys, monkeypatch) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG)
    assert run(tmp_path / "s", "create", str(cfg), capsys=capsys)[0] == 0
    first = StateDir(tmp_path / "s").registered_uuid("web")
    code, _, err = run(tmp_path / "s", "create", str(cfg), capsys=capsys)
    assert code == 1 and "already registered" in err and "--update" in err
    cfg.write_text(CONFIG.replace("memory = 128", "memory = 256"))
    monkeypatch.setenv("FAKE_XL_FAIL", "domain with name web already exists")
    code, _, err = run(tmp_path / "s", "create", "--update", str(cfg), capsys=capsys)
    state = StateDir(tmp_path / "s")
    assert code == 1 and "previous registration is kept" in err
    assert state.load_record("web")["settings"]["memory"] == 128  # put back as it was
    monkeypatch.delenv("FAKE_XL_FAIL")
    code, out, _ = run(tmp_path / "s", "create", "--update", str(cfg), "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["updated"] is True
    assert state.load_record("web")["settings"]["memory"] == 256
    assert state.registered_uuid("web") == first  # the same domain, the same UUID


def test_check_names_a_misspelled_key_and_exits_1(tmp_path, xl_log, capsys) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG + 'xenpbr_disk = ["xvda=persistent"]\n')
    code, out, _ = run(tmp_path / "s", "check", str(cfg), capsys=capsys)
    assert code == 1 and "did you mean xenpbr_disks?" in out
    assert not xl_log.exists()


def test_check_runs_xl_dry_run_on_the_translated_config(tmp_path, xl_log, capsys,
                                                        monkeypatch) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG + DISKS + 'xenpbr_disks = ["xvda=snapshot", "xvdb=persistent"]\n')
    code, out, _ = run(tmp_path / "s", "check", str(cfg), "--json", capsys=capsys)
    report = json.loads(out)
    assert code == 0 and report["valid"] and report["xl_dry_run_ok"]
    assert report["actions"] == {"on_crash": "phasereboot", "on_watchdog": "phasereboot"}
    translated = Path(report["translated_config"])
    assert xl_log.read_text() == f"-N create {translated}\n"
    assert 'on_crash = "preserve"' in translated.read_text()
    assert not (tmp_path / "s").exists()  # nothing registered, no state written
    code, out, _ = run(tmp_path / "s", "check", str(cfg), capsys=capsys)
    assert "xl -N create: ok" in out and "xvda=snapshot, xvdb=persistent" in out
    monkeypatch.setenv("FAKE_XL_FAIL", "Unknown on_poweroff action")
    code, out, _ = run(tmp_path / "s", "check", str(cfg), capsys=capsys)
    assert code == 1 and "INVALID" in out and "Unknown on_poweroff action" in out


def test_check_without_xl_says_so(tmp_path, capsys, monkeypatch) -> None:
    cfg = tmp_path / "web.cfg"
    cfg.write_text(CONFIG)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = run(tmp_path / "s", "check", str(cfg), capsys=capsys)
    assert code == 1 and "`xl` was not found on PATH" in err


def test_unregister_drops_images_and_state(registered, xl_log, capsys) -> None:
    from xenpbr.images import hotcache
    from xenpbr.images.store import ImageStore
    store = ImageStore(StateDir(registered).images_root)
    hot = hotcache.path_of(store, "web", A_ID)
    hot.parent.mkdir(parents=True)
    hot.write_bytes(b"stream")
    code, out, _ = run(registered, "unregister", "web", capsys=capsys)
    assert code == 0 and "no longer managed by xenpbr" in out
    assert StateDir(registered).domains() == [] and not hot.parent.exists()
    code, _, err = run(registered, "remove", "web", capsys=capsys)
    assert code == 1 and "not registered" in err


def test_unregister_drops_the_resurrected_data_dom0_holds(registered, capsys) -> None:
    from xenpbr.resurrection.model import AppExtraction, Extraction, Record
    from xenpbr.resurrection.vault import Vault
    vault = Vault.in_state(StateDir(registered).root)
    app = AppExtraction("kv", 1, records=[Record(b"k", 1, b"v")])
    assert vault.keep("web", Extraction(domid=3, apps=[app]), at=0.0) == ["kv"]
    code, out, _ = run(registered, "unregister", "web", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["resurrected_dropped"] == 1
    assert vault.held("web") == []
    code, _, err = run(registered, "remove", "web", capsys=capsys)
    assert code == 1 and "not registered" in err


def test_unregister_of_a_running_domain_says_it_keeps_running(registered, tmp_path,
                                                               capsys, monkeypatch) -> None:
    bindir = tmp_path / "bin2"
    bindir.mkdir()
    (bindir / "xl").write_text('#!/bin/sh\n[ "$1" = domid ] && echo 7\nexit 0\n')
    (bindir / "xl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    code, out, _ = run(registered, "unregister", "web", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["domid"] == 7
    run(StateDir(registered).root, "status", capsys=capsys)
    from xenpbr import lifecycle
    text = cli._unregister_text({"name": "web", "images_dropped": 2, "resurrected_dropped": 0,
                                 "unpublished": False, "domid": 7})
    assert "not destroyed" in text and "on_crash = preserve" in text
    assert lifecycle.running_domid("web") == 7



def test_config_file_sets_the_state_dir_and_a_typo_in_it_is_an_error(
        tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("XENPBR_STATE_DIR", raising=False)
    state = StateDir(tmp_path / "from-file")
    state.register("web", {"name": "web"}, "", "c")
    conf = tmp_path / "xenpbr.conf"
    conf.write_text(f"[state]\ndir = {state.root}\n")
    assert cli.main(["--config", str(conf), "status", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["web"]
    conf.write_text(f"[state]\ndri = {state.root}\n")
    assert cli.main(["--config", str(conf), "status"]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'dri'" in err and "did you mean 'dir'" in err
