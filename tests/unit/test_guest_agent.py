"""The guest agent against dom0's protocol code, end to end over the in-memory xenstore.

A guest connection runs ``xenpbr-agent`` (``xenpbr_agent.cli.main``); a dom0 connection
runs a responder thread built on :class:`xenpbr.guestproto.control.PhaseProtocol` that answers
each accepted request as the test scripts it.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from xenpbr.guestproto.control import PhaseProtocol, prepare_domain, request_watch, write_ack
from xenpbr.guestproto.gate import Outcome, RateLimit, RequestGate
from xenpbr.guestproto.request import parse_request
from xenpbr.guestproto.wire import Ack, BoundaryRequest, Verdict
from xenpbr.xenstore import (
    FakeXenstore,
    FakeXenstoreServer,
    PermissionDenied,
    XenstoreError,
)
from xenpbr_agent import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STEP_FAILED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    AgentError,
    ConfigError,
    __version__,
    cli,
)
from xenpbr_agent.boundary import collect_disks, mark_boundary
from xenpbr_agent.config import AgentConfig, MountSpec, load_config, parse_config
from xenpbr_agent.poststeps import (
    StepResult,
    after_boundary,
    mounted_points,
    run_command,
)
from xenpbr_agent.state import StateStore

DOMID = 5
Plan = Callable[[PhaseProtocol, BoundaryRequest], None]


def answer(verdict: Verdict) -> Plan:
    return lambda proto, req: proto.answer(DOMID, req.seq, verdict)


def restore(generation: int) -> Plan:
    return lambda proto, req: proto.restored(DOMID, req.seq, generation)


class Responder(threading.Thread):
    """Dom0: watch the guest's request, admit it with the real protocol code, answer by
    ``plans[phase]`` (no entry: never answer)."""

    def __init__(self, server: FakeXenstoreServer, plans: dict[str, Plan]) -> None:
        super().__init__(daemon=True)
        self.server, self.plans = server, plans
        self.requests: list[BoundaryRequest] = []
        self.refusals: list[str] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with self.server.connect(0) as dom0:
            proto = PhaseProtocol(dom0, RequestGate(RateLimit(100, 1)))
            path, token = request_watch(DOMID)
            dom0.watch(path, token)
            self.ready.set()
            while not self.stop.is_set():
                if dom0.read_watch(timeout=0.02) is None:
                    continue
                adm = proto.poll(DOMID)
                if adm.outcome is Outcome.REFUSED:
                    self.refusals.append(adm.refusal.reason)
                if adm.outcome is Outcome.ACCEPTED:
                    self.requests.append(adm.request)
                    plan = self.plans.get(adm.request.phase)
                    if plan is not None:
                        plan(proto, adm.request)

    def __enter__(self) -> Responder:
        self.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join(5)


@pytest.fixture
def server() -> FakeXenstoreServer:
    srv = FakeXenstoreServer()
    srv.create_domain(DOMID)
    with srv.connect(0) as dom0:
        prepare_domain(dom0, DOMID, generation=0)
    return srv


@pytest.fixture
def env(tmp_path: Path, server: FakeXenstoreServer, caplog: pytest.LogCaptureFixture):
    """Run the agent as domain DOMID; ``run(argv, capsys) -> (code, stdout, stderr+log)``
    (under pytest the agent's log goes to caplog, not stderr)."""
    mounts = tmp_path / "mounts"
    mounts.write_text("rootfs / rootfs rw 0 0\n/dev/xvda1 / ext4 rw,relatime 0 0\n"
                      "/dev/xvdb /srv ext4 ro 0 0\nproc /proc proc rw 0 0\n")
    write_config(tmp_path, "")
    proc = tmp_path / "proc"  # no processes: hazards are tested in test_agent_hazards.py
    (proc / "self").mkdir(parents=True)

    def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
        code = cli.main([*argv, "--config", str(tmp_path / "agent.conf")],
                        xs_factory=lambda: FakeXenstore(server, domid=DOMID),
                        mounts_path=str(mounts), proc_path=str(proc))
        out, err = capsys.readouterr()
        log = caplog.text
        caplog.clear()
        return code, out, err + log

    return run


def write_config(tmp_path: Path, extra: str, phases: str = "kernel,services,app") -> Path:
    sections = "".join(f"[phase:{p}]\n" for p in phases.split(","))
    path = tmp_path / "agent.conf"
    path.write_text(f"[agent]\nidentity = test.1\nack_timeout = 10\nstep_timeout = 10\n"
                    f"state_dir = {tmp_path / 'state'}\n{sections}{extra}")
    return path


def state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state" / "state.json").read_text())


# -- the boundary exchange --------------------------------------------------------------------


def test_captured(env, server, tmp_path, capsys) -> None:
    with Responder(server, {"kernel": answer(Verdict.captured())}) as dom0:
        code, out, _ = env(["phase", "kernel"], capsys)
    assert (code, out) == (EXIT_OK, "kernel captured\n")
    (req,) = dom0.requests
    assert (req.seq, req.phase, req.phases, req.identity) == (1, "kernel",
                                                               ("kernel", "services", "app"),
                                                               "test.1")
    assert [(d.dev, d.mount, d.rw, d.frozen) for d in req.disks] == [
        ("xvda1", "/", True, False), ("xvdb", "/srv", False, False)]
    assert req.wait == 10
    assert state(tmp_path)["seq"] == 1 and state(tmp_path)["verdict"] == "captured"
    with server.connect(0) as dom0x:
        presence = dom0x.read(f"/local/domain/{DOMID}/data/xenpbr/agent").decode()
        assert presence.startswith(f"{__version__} ")


def test_seqs_increase_across_runs_and_follow_dom0s_last_ack(env, server, tmp_path,
                                                             capsys) -> None:
    plans = {p: answer(Verdict.skipped()) for p in ("kernel", "services", "app")}
    with Responder(server, plans) as dom0:
        assert env(["phase", "kernel"], capsys)[:2] == (EXIT_OK, "kernel skipped\n")
        assert env(["phase", "services"], capsys)[0] == EXIT_OK
        (tmp_path / "state" / "state.json").unlink()  # /run wiped: resync from the ack
        assert env(["phase", "app"], capsys)[0] == EXIT_OK
    assert [r.seq for r in dom0.requests] == [1, 2, 3]


def test_refused_exit_code_and_reason(env, server, tmp_path, capsys) -> None:
    with Responder(server, {"services": answer(Verdict.refused("persistent-disk-rw"))}):
        code, out, err = env(["phase", "services"], capsys)
    assert code == EXIT_REFUSED and out == "services refused:persistent-disk-rw\n"
    assert "unmount persistent disks" in err
    assert state(tmp_path)["verdict"] == "refused:persistent-disk-rw"


def test_timeout(env, server, tmp_path, capsys) -> None:
    code, out, err = env(["phase", "kernel", "--timeout", "0.3"], capsys)
    assert code == EXIT_TIMEOUT and out == "kernel timeout\n"
    assert "no answer from dom0" in err
    assert state(tmp_path)["verdict"] == "timeout"


def test_ack_for_another_seq_is_ignored(env, server, capsys) -> None:
    def confuse(proto: PhaseProtocol, req: BoundaryRequest) -> None:
        write_ack(proto.xs, DOMID, Ack(req.seq + 5, Verdict.refused("busy")))
        write_ack(proto.xs, DOMID, Ack(0, Verdict.refused("bad-request:json")))
        time.sleep(0.2)
        proto.answer(DOMID, req.seq, Verdict.captured())

    with Responder(server, {"kernel": confuse}):
        assert env(["phase", "kernel"], capsys)[:2] == (EXIT_OK, "kernel captured\n")


def test_malformed_ack_is_ignored(env, server, capsys) -> None:
    def garble(proto: PhaseProtocol, req: BoundaryRequest) -> None:
        proto.xs.write(f"/local/domain/{DOMID}/control/xenpbr/ack", f"{req.seq} maybe")
        time.sleep(0.1)
        proto.answer(DOMID, req.seq, Verdict.skipped())

    with Responder(server, {"kernel": garble}):
        code, out, err = env(["phase", "kernel"], capsys)
    assert (code, out) == (EXIT_OK, "kernel skipped\n") and "malformed ack" in err


def test_restored_runs_post_restore_steps_exactly_once(env, server, tmp_path, capsys) -> None:
    marks = tmp_path / "marks"
    write_config(tmp_path, f"[after-restore]\nrun = sh -c 'echo restore >> {marks}'\n"
                           f"[after-last-phase]\nstart = sh -c 'echo last >> {marks}'\n"
                           f"  sh -c 'echo last2 >> {marks}'\n")
    with Responder(server, {"services": restore(1), "app": answer(Verdict.captured())}):
        code, out, _ = env(["phase", "services"], capsys)
        assert (code, out) == (EXIT_OK, "services restored:1\n")
        assert marks.read_text() == "restore\n"  # not the last phase: no non-candidates
        assert state(tmp_path)["generation"] == 1
        assert guest_status(server) == b"ready 1"  # dom0's service_ready mark
        code, out, _ = env(["phase", "app"], capsys)
        assert (code, out) == (EXIT_OK, "app captured\n")
    assert marks.read_text() == "restore\nlast\nlast2\n"
    assert guest_status(server) == b"ready 1"  # a capture reports nothing


def guest_status(server: FakeXenstoreServer) -> bytes | None:
    with server.connect(0) as dom0:
        return dom0.read_or(f"/local/domain/{DOMID}/data/xenpbr/status", None)


def test_a_capture_writes_no_status_note(env, server, capsys) -> None:
    with Responder(server, {"kernel": answer(Verdict.captured())}):
        assert env(["phase", "kernel"], capsys)[:2] == (EXIT_OK, "kernel captured\n")
    assert guest_status(server) is None


def test_restored_at_the_last_phase_runs_both_step_lists(env, server, tmp_path,
                                                         capsys) -> None:
    marks = tmp_path / "marks"
    write_config(tmp_path, f"[after-restore]\nrun = sh -c 'echo restore >> {marks}'\n"
                           f"[after-last-phase]\nstart = sh -c 'echo last >> {marks}'\n")
    with Responder(server, {"app": restore(4)}):
        assert env(["phase", "app"], capsys)[:2] == (EXIT_OK, "app restored:4\n")
    assert marks.read_text() == "restore\nlast\n"
    code, out, _ = env(["status", "--json"], capsys)
    status = json.loads(out)
    assert code == EXIT_OK
    assert status["generation"] == 4 and status["dom0_generation"] == 4
    assert status["last_verdict"] == "restored:4" and status["dom0_ack"] == "1 restored:4"


def test_non_candidates_start_even_when_the_last_boundary_is_refused(env, server, tmp_path,
                                                                     capsys) -> None:
    marks = tmp_path / "marks"
    write_config(tmp_path, f"[after-last-phase]\nstart = sh -c 'echo last >> {marks}'\n")
    with Responder(server, {"app": answer(Verdict.refused("quota"))}):
        assert env(["phase", "app"], capsys)[0] == EXIT_REFUSED
    assert marks.read_text() == "last\n"


def test_phase_start_commands_run_before_the_boundary(env, server, tmp_path, capsys) -> None:
    marks = tmp_path / "marks"
    seen: list[str] = []

    def check(proto: PhaseProtocol, req: BoundaryRequest) -> None:
        seen.append(marks.read_text())
        proto.answer(DOMID, req.seq, Verdict.captured())

    write_config(tmp_path, "", phases="kernel")
    (tmp_path / "agent.conf").write_text((tmp_path / "agent.conf").read_text()
                                         + f"start = sh -c 'echo svc >> {marks}'\n")
    with Responder(server, {"kernel": check}):
        assert env(["phase", "kernel"], capsys)[0] == EXIT_OK
    assert seen == ["svc\n"]


def test_failing_start_command_leaves_the_boundary_unmarked(env, server, tmp_path,
                                                            capsys) -> None:
    write_config(tmp_path, "", phases="kernel,app")
    text = (tmp_path / "agent.conf").read_text().replace("[phase:app]\n",
                                                         "[phase:app]\nstart = false\n")
    (tmp_path / "agent.conf").write_text(text)
    with Responder(server, {}) as dom0:
        code, out, err = env(["phase", "app"], capsys)
    assert (code, out) == (EXIT_STEP_FAILED, "app not-marked\n")
    assert "'false' exited 1" in err and dom0.requests == []


def test_failing_post_restore_step_gives_exit_5_after_running_the_rest(env, server, tmp_path,
                                                                       capsys) -> None:
    marks = tmp_path / "marks"
    write_config(tmp_path, f"[after-restore]\nrun = /nonexistent/tool\n"
                           f"  sh -c 'echo still >> {marks}'\n")
    with Responder(server, {"kernel": restore(2)}):
        code, out, err = env(["phase", "kernel"], capsys)
    assert (code, out) == (EXIT_STEP_FAILED, "kernel restored:2\n")
    assert "cannot start" in err and marks.read_text() == "still\n"
    assert guest_status(server) == b"steps-failed 2"


def test_dom0_not_managing_the_domain_answers_disabled_at_once(tmp_path, capsys,
                                                              caplog) -> None:
    srv = FakeXenstoreServer()
    srv.create_domain(DOMID)  # no control/xenpbr
    write_config(tmp_path, "")
    code = cli.main(["phase", "kernel", "--config", str(tmp_path / "agent.conf")],
                    xs_factory=lambda: FakeXenstore(srv, domid=DOMID), mounts_path="/dev/null")
    out, err = capsys.readouterr()
    assert (code, out) == (EXIT_REFUSED, "kernel refused:disabled\n")
    assert "xenpbr create" in err + caplog.text
    with srv.connect(0) as dom0:
        assert dom0.read_or(f"/local/domain/{DOMID}/data/xenpbr/request") is None


def test_guest_cannot_forge_its_own_ack(server) -> None:
    with FakeXenstore(server, domid=DOMID) as guest:
        for key in ("control/xenpbr/ack", "control/xenpbr/generation", "control/xenpbr/x"):
            with pytest.raises(PermissionDenied):
                guest.write(key, "1 captured")
        with pytest.raises(PermissionDenied):
            guest.rm("control/xenpbr")
        assert guest.read_or("control/xenpbr/ack") is None


def test_hostile_writes_from_the_guest_are_refused_and_dom0_keeps_serving(env, server,
                                                                          capsys) -> None:
    with Responder(server, {"kernel": answer(Verdict.captured())}) as dom0, \
            FakeXenstore(server, domid=DOMID) as guest:
        for bad in (b"\xff", b'{"v": 1, "seq": 1, "phase": "../x"}', b"[[[[[1]]]]]"):
            guest.write("data/xenpbr/request", bad)
            time.sleep(0.1)
        assert env(["phase", "kernel"], capsys)[:2] == (EXIT_OK, "kernel captured\n")
    assert dom0.refusals == ["bad-request:encoding", "bad-request:phase", "bad-request:json"]
    assert dom0.requests[0].seq == 2  # the agent stepped past the seq the garbage used


# -- usage and config errors -------------------------------------------------------------------


def test_usage_errors(env, tmp_path, capsys, caplog) -> None:
    code, _, err = env(["phase", "nosuch"], capsys)
    assert code == EXIT_USAGE and "[phase:nosuch]" in err
    code, _, err = env(["phase", "kernel", "--timeout", "-1"], capsys)
    assert code == EXIT_USAGE and "--timeout" in err
    assert cli.main(["bogus"]) == EXIT_USAGE
    code = cli.main(["phase", "kernel", "--config", str(tmp_path / "missing.conf")])
    assert (code, capsys.readouterr().out) == (EXIT_USAGE, "kernel not-marked\n")
    assert "no agent config" in caplog.text and "nothing to salvage" in caplog.text


def test_status_without_state(env, capsys) -> None:
    code, out, _ = env(["status"], capsys)
    assert code == EXIT_OK and "last seq: 0" in out and "dom0 ack: -" in out


def test_config_parsing() -> None:
    cfg = parse_config("[agent]\nidentity = v1.2\n[phase:kernel]\n[phase:services]\n"
                       "start = /etc/init.d/ssh start\n  sh -c 'a; b # not a comment'\n"
                       "# a comment\n[after-restore]\nrun = hwclock --hctosys\n")
    assert cfg.phase_names == ("kernel", "services") and cfg.is_last("services")
    assert cfg.phase("services").start == (("/etc/init.d/ssh", "start"),
                                           ("sh", "-c", "a; b # not a comment"))
    assert cfg.after_restore == (("hwclock", "--hctosys"),) and cfg.after_last_phase == ()
    assert cfg.ack_timeout == 120 and cfg.identity == "v1.2"


@pytest.mark.parametrize("text,needle", [
    ("[phase:Kernel]\n", "phase names"),
    ("[phase:a/b]\n", "phase names"),
    ("[phases:kernel]\n", "unknown section"),
    ("[DEFAULT]\nx = 1\n", "unknown section"),
    ("[agent]\nidentiy = x\n", r"unknown key 'identiy' in \[agent\] \(did you mean 'identity'\?\)"),
    ("[agent]\nidentity = a/b\n", "identity"),
    ("[agent]\nack_timeout = soon\n", "seconds"),
    ("[agent]\nack_timeout = 0\n", "between"),
    ("[agent]\nstep_timeout = nan\n", "between"),
    ("[phase:a]\nstop = x\n", r"unknown key 'stop' in \[phase:a\] \(allowed: 'start'\)"),
    ("[after-restore]\nstart = x\n", r"unknown key 'start' in \[after-restore\] \(allowed: 'run'\)"),
    ("[phase:a]\nstart = echo 'unterminated\n", "cannot split"),
    ("[phase:a]\n[phase:a]\n", "already exists"),
    ("".join(f"[phase:p{i}]\n" for i in range(9)), "at most 8"),
    ("no section\n", "section"),
    ("[after-last-phase]\nmount = xvdb /data\n", "must be a /dev/ path"),
    ("[after-last-phase]\nmount = /dev/ /data\n", "must be a /dev/ path"),
    ("[after-last-phase]\nmount = /dev/xvdb data\n", "must be absolute"),
    ("[after-last-phase]\nmount = /dev/xvdb\n", "2 to 4 fields, got 1"),
    ("[after-last-phase]\nmount = /dev/xvdb /data ext4 noatime ro\n", "2 to 4 fields, got 5"),
    ("[after-last-phase]\nmount = /dev/xvdb /data -o ro\n", "file system type '-o'"),
    ("[after-last-phase]\nmount = /dev/xvdb /data ext4 -oro\n", "mount options"),
    ("[after-last-phase]\nmount = /dev/xvdb '/data\n", "cannot split"),
    ("[after-last-phase]\nmount = /dev/xvda /a\n  /dev/xvdb b\n", "'b'"),
    ("[after-restore]\nmount = /dev/xvdb /data\n", "unknown key 'mount' in"),
])
def test_config_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(text, "test.conf")


def test_load_config_env_and_missing(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.conf"
    path.write_text("[phase:one]\n")
    monkeypatch.setenv("XENPBR_AGENT_CONFIG", str(path))
    assert load_config().phase_names == ("one",)
    with pytest.raises(ConfigError, match="no agent config"):
        load_config(str(tmp_path / "nope"))


# -- pieces ------------------------------------------------------------------------------------


def test_collect_disks() -> None:
    text = ("/dev/xvda1 / ext4 rw,relatime 0 0\n/dev/xvda1 / ext4 rw,relatime 0 0\n"
            "/dev/xvdb /mnt/with\\040space ext4 ro 0 0\ntmpfs /run tmpfs rw 0 0\n")
    disks = collect_disks(text)
    assert [(d.dev, d.mount, d.rw) for d in disks] == [("xvda1", "/", True),
                                                       ("xvdb", "/mnt/with\\040space", False)]
    with pytest.raises(AgentError, match="at most 16"):
        collect_disks("".join(f"/dev/xvd{chr(97 + i)} /m{i} ext4 rw 0 0\n" for i in range(17)))
    with pytest.raises(AgentError, match="cannot report"):
        collect_disks("/dev/xvda /m\u00e9 ext4 rw 0 0\n")


def test_request_written_by_the_agent_follows_the_contract(env, server, capsys) -> None:
    env(["phase", "kernel", "--timeout", "0.1"], capsys)
    with server.connect(0) as dom0:
        data = dom0.read(f"/local/domain/{DOMID}/data/xenpbr/request")
    req = parse_request(data)
    assert req.seq == 1 and req.services == () and req.hazards == ()
    assert set(json.loads(data)) == {"v", "seq", "phase", "phases", "identity", "wait",
                                     "disks", "services", "hazards"}


def test_run_command_does_not_wait_for_daemons_holding_its_output() -> None:
    result = run_command(("sh", "-c", "sleep 30 & echo started"), timeout=20)
    assert result.ok and result.output == "started"


def test_run_command_timeout_kills_the_group() -> None:
    result = run_command(("sh", "-c", "echo before; sleep 30"), timeout=0.3)
    assert not result.ok and "killed after" in result.error and result.output == "before"


def test_state_store_is_atomic_and_tolerates_garbage(tmp_path) -> None:
    store = StateStore(tmp_path / "s")
    assert store.load().seq == 0
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "state.json").write_text("{not json")
    assert store.load().seq == 0
    with store.locked():
        pass


def test_a_refusal_shows_dom0s_explanation(env, server, capsys) -> None:
    why = "pid 42 (logger) has /data/log open for writing without O_APPEND on persistent disk xvdb"
    plan = {"kernel": lambda proto, req: proto.answer(DOMID, req.seq, Verdict.refused("hazard"),
                                                      why)}
    with Responder(server, plan):
        code, out, err = env(["phase", "kernel"], capsys)
    assert (code, out) == (EXIT_REFUSED, "kernel refused:hazard\n")
    assert why in err


def test_a_persistent_disk_refusal_names_who_writes_there(env, server, tmp_path,
                                                         capsys) -> None:
    """dom0 names the disk; the agent names the processes writing to it, appenders too
    (auditd appends: it is no hazard, but it keeps the persistent disk mounted)."""
    from tests.unit.test_agent_hazards import fake_proc
    import shutil
    shutil.rmtree(tmp_path / "proc")
    fake_proc(tmp_path / "proc", {405: ("auditd", [("/data/audit.log", 0o102001, 30)]),
                                  406: ("cron", [("/run/cron.pid", 0o100001, 31)])})
    why = ("persistent disk xvdb is mounted read-write on /data: mount it after the last "
           "phase ([after-last-phase] in the agent config), or declare it 'snapshot' in "
           "xenpbr_disks")
    plan = {"kernel": lambda proto, req: proto.answer(
        DOMID, req.seq, Verdict.refused("persistent-disk-rw"), why)}
    with Responder(server, plan):
        code, out, err = env(["phase", "kernel"], capsys)
    assert (code, out) == (EXIT_REFUSED, "kernel refused:persistent-disk-rw\n")
    assert why in err
    assert "writing to xvdb now: pid 405 (auditd) /data/audit.log; start it after" in err
    assert "cron" not in err


def test_config_mount_lines() -> None:
    cfg = parse_config("[phase:a]\n[after-last-phase]\nstart = svc start\n"
                       "mount = /dev/xvdb /data ext4 noatime,errors=remount-ro\n"
                       "  /dev/xvdc '/srv/my data'\n  /dev/disk/by-label/x /x/ xfs\n")
    assert cfg.after_last_phase_mounts == (
        MountSpec("/dev/xvdb", "/data", "ext4", "noatime,errors=remount-ro"),
        MountSpec("/dev/xvdc", "/srv/my data"),
        MountSpec("/dev/disk/by-label/x", "/x", "xfs"))
    assert cfg.after_last_phase == (("svc", "start"),)
    assert cfg.after_last_phase_mounts[0].command() == (
        "mount", "-t", "ext4", "-o", "noatime,errors=remount-ro", "/dev/xvdb", "/data")
    assert cfg.after_last_phase_mounts[1].command() == ("mount", "/dev/xvdc", "/srv/my data")
    assert parse_config("[phase:a]\n").after_last_phase_mounts == ()


# -- nothing is frozen ----------------------------------------------------------------------
# dom0 snapshots disks while xl holds the guest paused (docs/consistency.md); the conftest
# fails any test that reaches a freeze ioctl.


def test_rw_disks_are_reported_unfrozen_and_the_guest_keeps_writing(env, server, tmp_path,
                                                                     capsys) -> None:
    (tmp_path / "mounts").write_text(
        "/dev/xvda1 / ext4 rw,relatime 0 0\n/dev/xvdb /srv ext4 ro 0 0\n"
        "/dev/xvdc /mnt/my\\040data ext4 rw 0 0\n")
    written_while_waiting: list[bool] = []

    def check(proto: PhaseProtocol, req: BoundaryRequest) -> None:
        probe = tmp_path / "written-during-the-boundary"
        probe.write_text("the disks take writes while dom0 decides")
        written_while_waiting.append(probe.exists())
        proto.answer(DOMID, req.seq, Verdict.captured())

    with Responder(server, {"kernel": check}) as dom0:
        code, out, err = env(["phase", "kernel"], capsys)
    assert (code, out) == (EXIT_OK, "kernel captured\n") and written_while_waiting == [True]
    (req,) = dom0.requests
    assert [(d.dev, d.mount, d.rw) for d in req.disks] == [
        ("xvda1", "/", True), ("xvdb", "/srv", False), ("xvdc", "/mnt/my\\040data", True)]
    with server.connect(0) as dom0x:
        wire = json.loads(dom0x.read(f"/local/domain/{DOMID}/data/xenpbr/request"))
    assert all("frozen" not in d for d in wire["disks"]) and "frozen" not in err


def test_state_is_pending_when_xenstore_fails_while_waiting(server, tmp_path) -> None:
    class LostXenstore(FakeXenstore):
        def read_watch(self, timeout: float | None = None) -> None:
            raise XenstoreError("connection to xenstored lost")

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/xvda1 / ext4 rw 0 0\n/dev/xvdb /data ext4 rw 0 0\n")
    (tmp_path / "proc" / "self").mkdir(parents=True)
    config = parse_config(write_config(tmp_path, "").read_text())
    with LostXenstore(server, domid=DOMID) as xs, pytest.raises(XenstoreError, match="lost"):
        mark_boundary(xs, config, "kernel", StateStore(tmp_path / "state"), 5,
                      mounts_path=str(mounts), proc_path=str(tmp_path / "proc"))
    assert state(tmp_path)["verdict"] == "pending"


# -- [after-last-phase] mount ------------------------------------------------------------------


class FakeRunner:
    """Records the commands poststeps runs; ``fail`` maps argv[0] to (code, output)."""

    def __init__(self, fail: dict[str, tuple[int, str]] | None = None) -> None:
        self.ran: list[tuple[str, ...]] = []
        self.fail = fail or {}

    def __call__(self, command: tuple[str, ...], timeout: float) -> StepResult:
        self.ran.append(command)
        code, output = self.fail.get(command[0], (0, ""))
        return StepResult(command, code, output)


def _mount_config(tmp_path: Path, mounts: str) -> AgentConfig:
    return parse_config("[phase:a]\n[phase:b]\n[after-last-phase]\nstart = svc1\n  svc2\n"
                        f"mount = {mounts}\n")


def test_last_phase_mounts_before_its_starts_and_skips_mounted_ones(tmp_path) -> None:
    data = tmp_path / "new" / "data"
    proc_mounts = tmp_path / "mounts"
    proc_mounts.write_text(f"/dev/xvda1 / ext4 rw 0 0\n"
                           f"/dev/xvdc {tmp_path}/already\\040there ext4 ro 0 0\n")
    cfg = _mount_config(tmp_path, f"/dev/xvdb {data} ext4 noatime\n"
                                  f"  /dev/xvdc '{tmp_path}/already there'")
    runner = FakeRunner()
    assert after_boundary(cfg, "b", None, runner=runner, mounts_path=str(proc_mounts))
    assert runner.ran == [("mount", "-t", "ext4", "-o", "noatime", "/dev/xvdb", str(data)),
                          ("svc1",), ("svc2",)]
    assert data.is_dir()  # mkdir -p
    runner.ran.clear()
    assert after_boundary(cfg, "a", Verdict.captured(), runner=runner,
                          mounts_path=str(proc_mounts))
    assert runner.ran == []  # not the last phase


def test_last_phase_mounts_again_after_a_restore(tmp_path) -> None:
    proc_mounts = tmp_path / "mounts"
    proc_mounts.write_text("/dev/xvda1 / ext4 rw 0 0\n")
    cfg = _mount_config(tmp_path, f"/dev/xvdb {tmp_path}/data")
    runner = FakeRunner()
    assert after_boundary(cfg, "b", Verdict.restored(2), runner=runner,
                          mounts_path=str(proc_mounts))
    assert runner.ran[0] == ("mount", "/dev/xvdb", f"{tmp_path}/data")


def test_a_failed_mount_is_a_failed_step_and_the_starts_still_run(tmp_path, caplog) -> None:
    proc_mounts = tmp_path / "mounts"
    proc_mounts.write_text("")
    (tmp_path / "afile").write_text("")
    cfg = _mount_config(tmp_path, f"/dev/xvdb {tmp_path}/data ext4\n"
                                  f"  /dev/xvdc {tmp_path}/afile/sub\n"
                                  f"  /dev/xvdd {tmp_path}/other")
    runner = FakeRunner({"mount": (32, "mount: /data: wrong fs type, bad superblock")})
    assert not after_boundary(cfg, "b", None, runner=runner, mounts_path=str(proc_mounts))
    assert [c[-1] for c in runner.ran] == [f"{tmp_path}/data", f"{tmp_path}/other",
                                           "svc1", "svc2"]
    assert f"cannot mount /dev/xvdb on {tmp_path}/data" in caplog.text
    assert "wrong fs type" in caplog.text and "exited 32" in caplog.text
    assert f"cannot create mount point {tmp_path}/afile/sub" in caplog.text


def test_mounted_points_decodes_escapes_and_tolerates_a_missing_file(tmp_path) -> None:
    path = tmp_path / "mounts"
    path.write_text("/dev/xvda1 / ext4 rw 0 0\n/dev/xvdb /a\\040b\\134c ext4 rw 0 0\n")
    assert mounted_points(str(path)) == {"/", "/a b\\c"}
    assert mounted_points(str(tmp_path / "missing")) == set()
