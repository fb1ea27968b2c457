"""Issue 12 in the guest agent: no step timeout unless the operator sets one, unknown keys
and sections named with their close match, a broken config still brings the guest up
(the salvage), and ``xenpbr-agent check``.

Commands run through a fake runner, or for real only when harmless (``sh -c`` writing
into tmp_path).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.unit.test_guest_agent import DOMID, FakeRunner
from xenpbr.guestproto.wire import parse_agent_problem
from xenpbr.xenstore import FakeXenstore, FakeXenstoreServer
from xenpbr_agent import EXIT_OK, EXIT_USAGE, ConfigError, cli, poststeps, salvage
from xenpbr_agent.config import parse_config
from xenpbr_agent.poststeps import StepLimit, StepResult, run_command, run_steps


# -- 1. step_timeout is the operator's opt-in ------------------------------------------------


def test_no_step_timeout_by_default() -> None:
    assert parse_config("[phase:a]\n").step_timeout is None
    assert parse_config("[agent]\nstep_timeout = 900\n[phase:a]\n").step_timeout == 900


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "soon", "86401"])
def test_a_set_step_timeout_is_still_validated(value: str) -> None:
    with pytest.raises(ConfigError, match=r"\[agent\] step_timeout"):
        parse_config(f"[agent]\nstep_timeout = {value}\n[phase:a]\n", "a.conf")


def test_steps_get_no_timeout_by_default_and_the_operators_when_set() -> None:
    runner = FakeRunner()
    cfg = parse_config("[phase:a]\nstart = warm-up --long\n[after-last-phase]\n"
                       "mount = /dev/xvdb /srv\nstart = svc\n")
    assert poststeps.before_boundary(cfg, "a", runner=runner)
    assert poststeps.after_boundary(cfg, "a", None, runner=runner,
                                    mounts_path="/nonexistent")
    seen: list[float | None] = []
    poststeps.before_boundary(cfg, "a", runner=lambda c, t: seen.append(t) or
                              StepResult(c, 0, ""))
    assert seen == [None]
    limited = parse_config("[agent]\nstep_timeout = 7\n[phase:a]\nstart = x\n")
    poststeps.before_boundary(limited, "a", runner=lambda c, t: seen.append(t) or
                              StepResult(c, 0, ""))
    assert seen == [None, 7]


def test_a_step_outliving_the_old_default_is_not_killed() -> None:
    """Without a limit a step runs to its end (0.5 s here; 60 s killed it before)."""
    start = time.monotonic()
    result = run_command(("sh", "-c", "sleep 0.5; echo warmed up"), None)
    assert result.ok and result.output == "warmed up" and not result.timed_out
    assert time.monotonic() - start >= 0.5


def test_an_operators_timeout_says_which_step_how_long_and_what_to_change(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limit = StepLimit(0.3, "/etc/xenpbr/agent.conf")
    assert not run_steps((("sh", "-c", "sleep 30"),), limit, "phase app")
    text = caplog.text
    assert "phase app: step \"sh -c 'sleep 30'\" was killed after it ran 0." in text
    assert "because of [agent] step_timeout = 0.3 in /etc/xenpbr/agent.conf" in text
    assert "raise step_timeout, or remove it" in text


def test_a_mount_killed_by_the_timeout_names_the_setting(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    def slow(command: tuple[str, ...], timeout: float | None) -> StepResult:
        return StepResult(command, None, "", "killed", 2.0, timed_out=True)

    assert not poststeps.mount_disks(parse_config(
        f"[phase:a]\n[after-last-phase]\nmount = /dev/xvdb {tmp_path}/d\n")
        .after_last_phase_mounts, StepLimit(2, "g.conf"), "after-last-phase", runner=slow,
        mounts_path=str(tmp_path / "none"))
    assert "cannot mount /dev/xvdb" in caplog.text
    assert "[agent] step_timeout = 2 in g.conf" in caplog.text


# -- 2. unknown keys and sections: the close match -------------------------------------------


@pytest.mark.parametrize("text,message", [
    ("[agent]\nstep_timout = 3\n[phase:a]\n",
     "c.conf: unknown key 'step_timout' in [agent] (did you mean 'step_timeout'?)"),
    ("[agent]\nack_timeot = 3\n",
     "c.conf: unknown key 'ack_timeot' in [agent] (did you mean 'ack_timeout'?)"),
    ("[phase:a]\n[after-last-phase]\nstrat = x\n",
     "c.conf: unknown key 'strat' in [after-last-phase] (did you mean 'start'?)"),
    ("[phase:a]\n[after-last-phse]\nstart = x\n",
     "c.conf: unknown section [after-last-phse] (did you mean [after-last-phase]?)"),
    ("[phse:app]\n", "c.conf: unknown section [phse:app] (did you mean [phase:app]?)"),
    ("[agnet]\n", "c.conf: unknown section [agnet] (did you mean [agent]?)"),
    ("[zzz]\n", "c.conf: unknown section [zzz] (allowed: [after-last-phase], "
                "[after-restore], [agent], [phase:NAME], [resurrect])"),
])
def test_unknown_names_come_with_their_close_match(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.conf")
    assert info.value.problems == (message,)


def test_every_error_is_collected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[agent]\nstep_timout = 1\nack_timeout = 0\n[phase:A]\n[aftr-restore]\n",
                     "c.conf")
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert "(and 3 more: run 'xenpbr-agent check')" in str(info.value)


# -- 3. a broken config still brings the guest up ----------------------------------------------

BROKEN = ("[agent]\nstep_timout = 30\n[phase:kernel]\n[phase:services]\nstart = ssh start\n"
          "[phase:app]\nstart = app --warm\n[after-restore]\nrun = hwclock\n"
          "[after-last-phase]\nmount = /dev/xvdb {data} ext4\nstart = auditd\n  cron\n")


def test_salvage_runs_the_last_phase_and_the_deferred_work(tmp_path: Path) -> None:
    text = BROKEN.format(data=tmp_path / "data")
    runner = FakeRunner()
    rescue = salvage.plan(text, "c.conf", "app")
    assert rescue.is_last and rescue.notes == []
    assert salvage.run(rescue, runner=runner, mounts_path=str(tmp_path / "none"))
    assert runner.ran == [("app", "--warm"),
                          ("mount", "-t", "ext4", "/dev/xvdb", str(tmp_path / "data")),
                          ("auditd",), ("cron",)]
    runner.ran.clear()
    salvage.run(salvage.plan(text, "c.conf", "services"), runner=runner)
    assert runner.ran == [("ssh", "start")]  # not the last phase: no deferred work


def test_salvage_survives_errors_configparser_stops_at(tmp_path: Path) -> None:
    """A line before any section and a duplicate section end configparser's reading;
    the sections that are fine are still found."""
    text = "stray = 1\n[phase:a]\n[phase:a]\n[phase:b]\n[after-last-phase]\nstart = svc\n"
    with pytest.raises(ConfigError):
        parse_config(text)
    runner = FakeRunner()
    assert salvage.run(salvage.plan(text, "c.conf", "b"), runner=runner)
    assert runner.ran == [("svc",)]
    rescue = salvage.plan(text, "c.conf", "a")
    assert rescue.phase_config is None and "appears 2 times" in rescue.notes[0]


def test_a_section_that_is_itself_broken_is_not_run() -> None:
    text = "[phase:a]\n[after-last-phase]\nstart = svc\nstrat = typo\n"
    rescue = salvage.plan(text, "c.conf", "a")
    assert rescue.last_config is None
    assert "[after-last-phase] is itself invalid" in rescue.notes[0]
    assert "did you mean 'start'" in rescue.notes[0]
    assert salvage.describe(rescue) == "phase a: nothing salvaged from the broken config"


@pytest.fixture
def agent(tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
    """``run(config text, argv) -> (code, stdout, log)`` over an in-memory xenstore whose
    dom0 side is prepared (a request would be visible there)."""
    from xenpbr.guestproto.control import prepare_domain
    server = FakeXenstoreServer()
    server.create_domain(DOMID)
    with server.connect(0) as dom0:
        prepare_domain(dom0, DOMID, generation=0)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/xvda1 / ext4 rw 0 0\n/dev/xvdb {tmp_path}/data ext4 rw 0 0\n")
    (tmp_path / "proc" / "self").mkdir(parents=True)

    def run(text: str, argv: list[str]) -> tuple[int, str, str]:
        (tmp_path / "agent.conf").write_text(text)
        code = cli.main([*argv, "--config", str(tmp_path / "agent.conf")],
                        xs_factory=lambda: FakeXenstore(server, domid=DOMID),
                        mounts_path=str(mounts), proc_path=str(tmp_path / "proc"))
        out = capsys.readouterr().out
        log = caplog.text
        caplog.clear()
        return code, out, log

    run.server = server  # type: ignore[attr-defined]
    return run


def test_a_misspelled_key_still_starts_the_after_last_phase_services(agent, tmp_path) -> None:
    ran = tmp_path / "ran"
    text = (f"[agent]\nstep_timout = 30\nstate_dir = {tmp_path}/state\n[phase:kernel]\n"
            f"[phase:app]\nstart = sh -c 'echo app >> {ran}'\n[after-last-phase]\n"
            f"mount = /dev/xvdb {tmp_path}/data\nstart = sh -c 'echo svc >> {ran}'\n")
    code, out, log = agent(text, ["phase", "kernel"])
    assert (code, out) == (EXIT_USAGE, "kernel not-marked\n") and not ran.exists()
    code, out, log = agent(text, ["phase", "app"])
    assert (code, out) == (EXIT_USAGE, "app not-marked\n")
    assert ran.read_text() == "app\nsvc\n"
    assert "unknown key 'step_timout' in [agent] (did you mean 'step_timeout'?)" in log
    assert "boundary app is not marked" in log and "xenpbr-agent check" in log
    assert f"{tmp_path}/data is already mounted" in log  # the mount line was considered
    with agent.server.connect(0) as dom0:  # no request: no image of a broken guest
        assert dom0.read_or(f"/local/domain/{DOMID}/data/xenpbr/request", None) is None
        assert dom0.read_or(f"/local/domain/{DOMID}/data/xenpbr/agent", None) is None
        problem = dom0.read(f"/local/domain/{DOMID}/data/xenpbr/problem")
    # ... but dom0 is told why there is none (xenpbr status shows it)
    told = parse_agent_problem(problem)
    assert told is not None and (told.kind, told.phase) == ("config", "app")
    assert "unknown key 'step_timout' in [agent] (did you mean" in told.detail


def test_an_unreadable_config_has_nothing_to_salvage(tmp_path, capsys, caplog) -> None:
    path = tmp_path / "agent.conf"
    path.write_bytes(b"[phase:a]\n[after-last-phase]\nstart = touch \xff\n")
    code = cli.main(["phase", "a", "--config", str(path)])
    assert (code, capsys.readouterr().out) == (EXIT_USAGE, "a not-marked\n")
    assert f"cannot read agent config {path}" in caplog.text
    assert "nothing to salvage (the config cannot be read)" in caplog.text


# -- 4. xenpbr-agent check ----------------------------------------------------------------------

GOOD = ("[agent]\nidentity = v2\n[phase:kernel]\n[phase:services]\nstart = ssh start\n"
        "[after-restore]\nrun = hwclock --hctosys\n[after-last-phase]\n"
        "mount = /dev/xvdb /data ext4 noatime\nstart = auditd\n")


def test_check_a_valid_config(agent) -> None:
    code, out, _ = agent(GOOD, ["check"])
    assert code == EXIT_OK
    lines = out.splitlines()
    assert lines[0].endswith("agent.conf: valid")
    for expected in ("identity: v2", "ack_timeout: 120 s",
                     "step_timeout: none (steps run as long as they need)",
                     "phases, in boot order:", "  1. kernel", "  2. services",
                     "       start: ssh start", "after-restore:", "  run: hwclock --hctosys",
                     "after-last-phase:", "  mount: /dev/xvdb on /data (ext4, noatime)",
                     "  start: auditd"):
        assert expected in lines, (expected, lines)


def test_check_json_is_typed(agent) -> None:
    code, out, _ = agent(GOOD.replace("[phase:kernel]", "step_timeout = 600\n[phase:kernel]"),
                         ["check", "--json"])
    report = json.loads(out)
    assert code == EXIT_OK and report["valid"] is True and report["errors"] == []
    assert report["step_timeout"] == 600 and report["ack_timeout"] == 120
    assert report["phases"] == [{"name": "kernel", "start": []},
                                {"name": "services", "start": [["ssh", "start"]]}]
    assert report["after_last_phase"]["mount"] == [
        {"device": "/dev/xvdb", "mount_point": "/data", "fstype": "ext4", "options": "noatime"}]


def test_check_lists_every_error_and_touches_nothing(agent, tmp_path) -> None:
    text = GOOD.replace("identity", "identiy").replace("[after-restore]", "[after-restre]")
    code, out, _ = agent(text, ["check"])
    assert code == EXIT_USAGE
    assert "agent.conf: invalid, 2 errors:" in out
    assert "unknown key 'identiy' in [agent] (did you mean 'identity'?)" in out
    assert "unknown section [after-restre] (did you mean [after-restore]?)" in out
    assert "phase services: still running [phase:services] start and [after-last-phase]" in out
    code, out, _ = agent(text, ["check", "--json"])
    report = json.loads(out)
    assert code == EXIT_USAGE and report["valid"] is False and len(report["errors"]) == 2
    with agent.server.connect(0) as dom0:
        assert dom0.read_or(f"/local/domain/{DOMID}/data/xenpbr/agent", None) is None
        assert dom0.read_or(f"/local/domain/{DOMID}/data/xenpbr/problem", None) is None


def test_check_a_missing_file(tmp_path, capsys) -> None:
    code = cli.main(["check", "--config", str(tmp_path / "nope.conf")])
    out = capsys.readouterr().out
    assert code == EXIT_USAGE and "no agent config" in out and "nothing to salvage" in out


def test_every_option_has_help(capsys) -> None:
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in {"xenpbr-agent": parser, **subparsers}.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
    assert cli.main(["check", "--help"]) == EXIT_OK
    assert "exit codes" in capsys.readouterr().out


def test_errors_reach_the_journal_at_priority_error(tmp_path, monkeypatch) -> None:
    """Under systemd (stderr is the journal stream) each line carries its priority."""
    import logging
    import os
    import sys
    err = open(tmp_path / "stream", "w")
    st = os.fstat(err.fileno())
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert cli._stderr_is_journal()
    line = cli._JournalFormatter("%(levelname)s: %(message)s").format(
        logging.LogRecord("x", logging.ERROR, __file__, 1, "config error: boom", None, None))
    assert line == "<3>ERROR: config error: boom"
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not cli._stderr_is_journal()
    err.close()
