"""Running the configured commands, and which ones run when.

When (docs/phase-protocol.md, "Which steps run when"), for ``xenpbr-agent phase P``:

1. ``[phase:P] start``, before the boundary is marked (so P's image contains what they
   start); the first failure stops here: the boundary is not marked;
2. the boundary (request, ack);
3. ``[after-restore] run`` if the verdict is ``restored:<g>``, then the hand-over of
   resurrected data (``[resurrect]``, :mod:`xenpbr_agent.resurrected`);
4. ``[after-last-phase]`` if P is the last declared phase, whatever the verdict
   (refused or timed out included: the guest must come up fully either way): first its
   ``mount`` lines (the persistent disks, which dom0 refuses to capture while they are
   mounted read-write, and which the ``start`` services may need), then its ``start``
   commands. A mount point that is already mounted is left alone, so this is safe to
   run again after every restore into the last phase's image.

Later phases are not run from here after a restore: the restored init system resumes
the boot where the image was taken and invokes ``xenpbr-agent phase`` for them.

Commands run without a shell, stdin from /dev/null, output to a temporary *file* (a
daemon started by an init script inherits it and may keep it open; a pipe would make us
wait for that daemon forever), each in its own session so a timeout kills the whole
process group. Output is logged.

No step has a time limit unless the operator sets ``[agent] step_timeout``: on a loaded
machine an application's warm-up can take many times its usual time, and killing it
leaves the guest without its application, which is worse than a slow boot. When an
operator's limit fires, the log names the step, how long it ran, the setting and the file.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Optional

from xenpbr.guestproto.wire import Verdict, VerdictKind
from xenpbr_agent.boundary import MOUNTS, unescape_mount
from xenpbr_agent.config import AgentConfig, Command, MountSpec

log = logging.getLogger(__name__)

#: Bytes of a command's output kept for the log.
OUTPUT_LIMIT = 4096


@dataclass(frozen=True)
class StepResult:
    command: Command
    returncode: int | None  # None: did not start, or killed on timeout
    output: str
    error: str | None = None
    elapsed: float = 0.0
    timed_out: bool = False  # killed because [agent] step_timeout passed

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        text = shlex.join(self.command)
        if self.error:
            return f"{text!r}: {self.error}"
        return f"{text!r} exited {self.returncode}"


def _read_output(out: IO[bytes]) -> str:
    out.seek(0)
    data = out.read(OUTPUT_LIMIT + 1)
    text = data[:OUTPUT_LIMIT].decode("utf-8", "replace").rstrip()
    return text + (" [...]" if len(data) > OUTPUT_LIMIT else "")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_command(command: Command, timeout: float | None,
                env: dict[str, str] | None = None) -> StepResult:
    """Run one command (``timeout`` None: for as long as it takes; ``env`` None: the
    agent's environment); never raises for a command that fails, hangs or does not exist."""
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True, env=env)
        except OSError as exc:
            return StepResult(command, None, "", f"cannot start: {exc.strerror or exc}")
        try:
            code: int | None = proc.wait(timeout=timeout)
            error, timed_out = None, False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code, timed_out = None, True
            error = f"killed after {time.monotonic() - start:.1f} s (step_timeout = {timeout:g})"
        return StepResult(command, code, _read_output(out), error,
                          time.monotonic() - start, timed_out)


Runner = Callable[[Command, Optional[float]], StepResult]  # evaluated: 3.9 has no X | None


@dataclass(frozen=True)
class StepLimit:
    """The operator's ``[agent] step_timeout`` (None: none) and the file that set it,
    so the message of a killed step can say which setting to change, and where."""

    seconds: float | None = None
    source: str | None = None

    @classmethod
    def of(cls, config: AgentConfig) -> StepLimit:
        return cls(config.step_timeout, config.path)


def failure_message(result: StepResult, what: str, limit: StepLimit) -> str:
    """Why a step failed, in words an operator can act on."""
    if not result.timed_out:
        return f"{what}: step failed: {result.describe()}"
    return (f"{what}: step {shlex.join(result.command)!r} was killed after it ran "
            f"{result.elapsed:.1f} s, because of [agent] step_timeout = {limit.seconds:g} in "
            f"{limit.source or 'the agent config'}: raise step_timeout, or remove it so "
            "that steps run as long as they need (the default)")


def run_steps(commands: tuple[Command, ...], limit: StepLimit, what: str,
              stop_on_failure: bool = False, runner: Runner = run_command) -> bool:
    """Run ``commands`` in order, logging each; return True if all succeeded."""
    ok = True
    for command in commands:
        log.info("%s: running %s", what, shlex.join(command))
        result = runner(command, limit.seconds)
        for line in result.output.splitlines():
            log.info("%s: | %s", what, line)
        if result.ok:
            continue
        log.error("%s", failure_message(result, what, limit))
        ok = False
        if stop_on_failure:
            break
    return ok


def mounted_points(mounts_path: str = MOUNTS) -> set[str]:
    """The mount points in use, from ``/proc/self/mounts`` (octal escapes such as
    ``\\040`` decoded); empty, with a warning, if it cannot be read."""
    try:
        with open(mounts_path) as f:
            text = f.read()
    except OSError as exc:
        log.warning("cannot read %s (%s); mounting without checking", mounts_path, exc)
        return set()
    fields = (line.split() for line in text.splitlines())
    return {unescape_mount(f[1]) for f in fields if len(f) > 1}


def mount_disks(mounts: tuple[MountSpec, ...], limit: StepLimit, what: str, *,
                runner: Runner = run_command, mounts_path: str = MOUNTS) -> bool:
    """Mount each of ``mounts`` not mounted yet (creating the mount point); return True
    if none failed. A failure is logged with mount's own message and the rest go on."""
    mounted = mounted_points(mounts_path) if mounts else set()
    ok = True
    for spec in mounts:
        if spec.mount_point in mounted:
            log.info("%s: %s is already mounted, leaving it", what, spec.mount_point)
            continue
        try:
            os.makedirs(spec.mount_point, exist_ok=True)
        except OSError as exc:
            log.error("%s: cannot create mount point %s: %s", what, spec.mount_point,
                      exc.strerror or exc)
            ok = False
            continue
        log.info("%s: running %s", what, shlex.join(spec.command()))
        result = runner(spec.command(), limit.seconds)
        if result.ok:
            mounted.add(spec.mount_point)
            continue
        reason = (failure_message(result, what, limit) if result.timed_out
                  else result.describe())
        log.error("%s: cannot mount %s on %s: %s: %s", what, spec.device, spec.mount_point,
                  reason, result.output or "(no output)")
        ok = False
    return ok


def before_boundary(config: AgentConfig, phase: str, *,
                    runner: Runner = run_command) -> bool:
    """Step 1: the phase's own ``start`` commands; stops at the first failure."""
    return run_steps(config.phase(phase).start, StepLimit.of(config), f"phase {phase}",
                     stop_on_failure=True, runner=runner)


def after_boundary(config: AgentConfig, phase: str, verdict: Verdict | None, *,
                   runner: Runner = run_command, mounts_path: str = MOUNTS,
                   resurrect: Callable[[], bool] | None = None) -> bool:
    """Steps 3 and 4 (``verdict`` None: timed out). Every step runs even if an earlier
    one failed: bringing the guest up matters more than stopping at the first error.
    After a restore, ``resurrect`` (the ``[resurrect]`` hand-over,
    :mod:`xenpbr_agent.resurrected`) runs right after the ``[after-restore]`` steps."""
    ok = True
    limit = StepLimit.of(config)
    if verdict is not None and verdict.kind is VerdictKind.RESTORED:
        ok &= run_steps(config.after_restore, limit, "after-restore", runner=runner)
        if resurrect is not None:
            ok &= resurrect()
    if config.is_last(phase):
        ok &= after_last_phase(config, limit, runner=runner, mounts_path=mounts_path)
    return ok


def after_last_phase(config: AgentConfig, limit: StepLimit, *, runner: Runner = run_command,
                     mounts_path: str = MOUNTS) -> bool:
    """Step 4 alone: the ``[after-last-phase]`` mounts, then its ``start`` commands (also
    the salvage of a broken config, :mod:`xenpbr_agent.salvage`)."""
    ok = mount_disks(config.after_last_phase_mounts, limit, "after-last-phase",
                     runner=runner, mounts_path=mounts_path)
    return run_steps(config.after_last_phase, limit, "after-last-phase", runner=runner) and ok
