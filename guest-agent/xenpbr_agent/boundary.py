"""Marking one boundary: choose a seq, write the request, wait for dom0's ack of it.

The wait is the heart of phase-based reboot: dom0 captures the image while this process
sits in it, so after a restore the very same wait returns ``restored:<generation>``. The
loop therefore re-reads the ack after every watch event (the guest kernel re-registers
watches on resume, which fires them) and once more when the deadline passes, so a clock
that jumped across a save/restore cannot make it miss the answer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from xenpbr.guestproto.request import encode_request
from xenpbr.guestproto.wire import (
    ACK_KEY,
    AGENT_KEY,
    CONTROL_DIR,
    DETAIL_KEY,
    DEVICE,
    MAX_DETAIL,
    MAX_DISKS,
    MOUNT,
    PROBLEM_KEY,
    REQUEST_KEY,
    SEQ_LIMIT,
    STATUS_KEY,
    Ack,
    AckMalformed,
    AgentProblem,
    BoundaryRequest,
    DiskState,
    GuestStatus,
    RequestRefused,
    Verdict,
)
from xenpbr.xenstore import NoSuchKey, PermissionDenied, XenstoreClient, XenstoreError
from xenpbr_agent import AgentError, __version__, hazards
from xenpbr_agent.config import AgentConfig
from xenpbr_agent.state import AgentState, StateStore

log = logging.getLogger(__name__)

MOUNTS = "/proc/self/mounts"
PROC = "/proc"

#: Opens a xenstore client (``XenstoreClient`` itself; tests pass a ``FakeXenstore``).
XenstoreFactory = Callable[[], XenstoreClient]
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class BoundaryResult:
    """The outcome of one boundary; ``verdict`` None means no ack came in time."""

    phase: str
    seq: int
    verdict: Verdict | None
    local: bool = False  # decided by the agent itself (dom0 has not enabled xenpbr)
    detail: str = ""  # dom0's explanation of a refusal (control/xenpbr/detail)

    @property
    def text(self) -> str:
        return str(self.verdict) if self.verdict is not None else "timeout"


def unescape_mount(field: str) -> str:
    """A mount point as a path: ``/proc/self/mounts`` writes space, tab, newline and
    backslash as octal escapes (``/mnt/with\\040space``)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def collect_disks(mounts_text: str) -> tuple[DiskState, ...]:
    """Block devices mounted in the guest, from ``/proc/self/mounts`` text.

    Raises :class:`AgentError` when a mount cannot be reported within the protocol's
    bounds: hiding a read-write disk from dom0 could let it capture an inconsistent image.
    """
    disks: list[DiskState] = []
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].startswith("/dev/"):
            continue
        dev = os.path.basename(os.path.realpath(fields[0]))  # /dev/mapper/x -> dm-0
        disk = DiskState(dev, fields[1], fields[3].split(",")[0] == "rw")
        if not DEVICE.fullmatch(disk.dev) or not MOUNT.fullmatch(disk.mount):
            raise AgentError(f"cannot report mount {fields[0]} on {fields[1]} to dom0 (device "
                             f"names must match {DEVICE.pattern!r}, mount points "
                             f"{MOUNT.pattern!r}); unmount it before this boundary")
        if disk not in disks:
            disks.append(disk)
    if len(disks) > MAX_DISKS:
        raise AgentError(f"{len(disks)} block-device mounts, the protocol reports at most "
                         f"{MAX_DISKS}; unmount some before this boundary")
    return tuple(disks)


def read_detail(xs: XenstoreClient) -> str:
    """dom0's explanation of its last refusal ('' if none): printable ASCII only."""
    try:
        raw = xs.read_or(DETAIL_KEY, b"") or b""
    except XenstoreError:
        return ""
    return "".join(c for c in raw[:MAX_DETAIL].decode("ascii", "replace") if c.isprintable())


def read_ack(xs: XenstoreClient) -> Ack | None:
    """dom0's current ack, or None if there is none or it is malformed (logged)."""
    raw = xs.read_or(ACK_KEY, None)
    if raw is None:
        return None
    try:
        return Ack.parse(raw)
    except AckMalformed as exc:
        log.warning("ignoring malformed ack from dom0: %s", exc)
        return None


def next_seq(state: AgentState, current: Ack | None) -> int:
    """Above both our own last seq and the seq dom0 last answered: the state in /run may
    be gone (agent reinstalled, tmpfs cleared) and dom0 refuses reused seqs."""
    seq = max(state.seq, current.seq if current else 0) + 1
    if seq >= SEQ_LIMIT:
        raise AgentError(f"sequence numbers exhausted ({seq}); reboot the guest normally")
    return seq


def dom0_enabled(xs: XenstoreClient) -> bool:
    """False if dom0 has not created ``control/xenpbr`` (xenpbr does not manage this
    domain): there is nobody to answer, so do not wait."""
    try:
        xs.read(CONTROL_DIR)
    except NoSuchKey:
        return False
    except PermissionDenied:
        return True  # cannot tell; dom0 will answer if it is there
    return True


def announce(xs: XenstoreClient) -> None:
    """``data/xenpbr/agent`` = ``"<version> <pid>"`` (informational)."""
    try:
        xs.write(AGENT_KEY, f"{__version__} {os.getpid()}")
    except XenstoreError as exc:
        log.warning("cannot write %s: %s", AGENT_KEY, exc)


def report_status(xs_factory: XenstoreFactory, status: GuestStatus) -> None:
    """Tell dom0 how far a restored guest got (``acked``/``ready``): the guest_ack and
    service_ready marks of its recovery timeline. Informational: a failure is logged,
    never raised (the guest's recovery matters more than its timeline)."""
    try:
        with xs_factory() as xs:
            xs.write(STATUS_KEY, status.encode())
    except (XenstoreError, OSError) as exc:
        log.warning("cannot write %s: %s", STATUS_KEY, exc)


def report_problem(xs_factory: XenstoreFactory, problem: AgentProblem) -> None:
    """Tell dom0 why this boot marks no boundary (``data/xenpbr/problem``), so that
    ``xenpbr status`` can say why the guest has no image. Informational: a failure is
    logged, never raised (the salvaged boot matters more)."""
    try:
        with xs_factory() as xs:
            xs.write(PROBLEM_KEY, problem.encode())
    except (XenstoreError, OSError) as exc:
        log.warning("cannot write %s: %s", PROBLEM_KEY, exc)


def wait_for_ack(xs: XenstoreClient, seq: int, deadline: float,
                 clock: Callable[[], float] = time.monotonic) -> Verdict | None:
    """Block until ``control/xenpbr/ack`` answers ``seq`` (acks for other seqs are
    ignored) or ``deadline`` (on ``clock``) passes; a watch on the ack must be set."""
    while True:
        ack = read_ack(xs)
        if ack is not None and ack.seq == seq:
            return ack.verdict
        if ack is not None:
            log.debug("ack for seq %d is not ours (%d), still waiting", ack.seq, seq)
        remaining = deadline - clock()
        if remaining <= 0:
            return None
        xs.read_watch(timeout=remaining)


def exchange(xs: XenstoreClient, raw: bytes, seq: int, deadline: float,
             clock: Callable[[], float] = time.monotonic) -> Verdict | None:
    """Write the request and wait for its ack. The watch is set *before* the write, so an
    ack written at once cannot be missed."""
    token = f"xenpbr-agent-{os.getpid()}-{seq}"
    xs.watch(ACK_KEY, token)
    try:
        xs.write(REQUEST_KEY, raw)
        log.info("request %d written, waiting for dom0", seq)
        return wait_for_ack(xs, seq, deadline, clock)
    finally:
        with contextlib.suppress(XenstoreError):
            xs.unwatch(ACK_KEY, token)


def read_disks(mounts_path: str = MOUNTS) -> tuple[DiskState, ...]:
    """:func:`collect_disks` of the mounts file at ``mounts_path``."""
    try:
        with open(mounts_path) as f:
            return collect_disks(f.read())
    except OSError as exc:
        raise AgentError(f"cannot read {mounts_path} to report disks: {exc}") from None


def prepare_request(config: AgentConfig, phase: str, seq: int, timeout: float,
                    mounts_path: str = MOUNTS, proc_path: str = PROC) -> BoundaryRequest:
    """The request for ``phase``, checked with dom0's own parser (a request dom0 would
    refuse as malformed is an agent/config problem: report it here, before writing)."""
    disks = read_disks(mounts_path)
    found = hazards.scan(proc_path, skip_pids=frozenset({os.getpid()}))
    if found:
        log.warning("boundary %s: %d file(s) open for writing without O_APPEND on a disk: "
                    "%s", phase, len(found), "; ".join(w.encode() for w in found[:4]))
    request = BoundaryRequest(seq=seq, phase=phase, phases=config.phase_names,
                              identity=config.identity, wait=max(1, math.ceil(timeout)),
                              disks=disks, hazards=hazards.hazard_strings(found))
    encode_checked(request)
    return request


def encode_checked(request: BoundaryRequest) -> bytes:
    """``encode_request``, with dom0's refusal turned into an actionable AgentError."""
    try:
        return encode_request(request)
    except RequestRefused as exc:
        raise AgentError(f"this boundary request would be refused by dom0 ({exc.reason}: "
                         f"{exc.detail}); fix the config or the guest") from None


def mark_boundary(xs: XenstoreClient, config: AgentConfig, phase: str, store: StateStore,
                  timeout: float, *, clock: Callable[[], float] = time.monotonic,
                  mounts_path: str = MOUNTS, proc_path: str = PROC) -> BoundaryResult:
    """Mark boundary ``phase``: request, wait (at most ``timeout`` s), record the verdict.

    Nothing is frozen: dom0 snapshots the ``snapshot`` disks while xl holds the whole
    guest paused at the instant its memory was saved (docs/consistency.md). A frozen
    file system used to be the agent's job here, and writers blocked on it kept a busy
    systemd guest from suspending for the capture at all."""
    config.phase(phase)  # ConfigError if undeclared
    with store.locked():
        if not dom0_enabled(xs):
            log.warning("dom0 has not enabled phase-based reboot for this domain (no %s); "
                        "boundary %s not marked", CONTROL_DIR, phase)
            return BoundaryResult(phase, 0, Verdict.refused("disabled"), local=True)
        state = store.load()
        seq = next_seq(state, read_ack(xs))
        request = prepare_request(config, phase, seq, timeout, mounts_path, proc_path)
        store.save(AgentState(seq, phase, "pending", state.generation))
        announce(xs)
        verdict = exchange(xs, encode_checked(request), seq, clock() + timeout, clock)
        detail = read_detail(xs) if verdict is not None and verdict.reason else ""
        result = BoundaryResult(phase, seq, verdict, detail=detail)
        generation = verdict.generation if verdict is not None else None
        store.save(AgentState(seq, phase, result.text,
                              generation if generation is not None else state.generation))
    log.info("boundary %s (seq %d): %s", phase, seq, result.text)
    return result
