"""The agent's memory between runs: ``<state_dir>/state.json`` (``/run`` by default, so a
fresh boot starts afresh, while a restored image keeps what the agent had written before
the image was taken).

Every ``phase`` run holds ``<state_dir>/lock`` (``flock``) from choosing its seq until it
has recorded the verdict, so two boundaries marked at once cannot share a seq.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from xenpbr_agent import AgentError

log = logging.getLogger(__name__)


@dataclass
class AgentState:
    seq: int = 0                   # the last seq this agent wrote
    phase: str | None = None       # the phase of that request
    verdict: str | None = None     # its verdict ("pending" while waiting, "timeout")
    generation: int | None = None  # recovery generation from the last restored:<g>
    updated: float | None = None   # wall-clock time of the last change

    @classmethod
    def from_json(cls, data: object) -> AgentState:
        if not isinstance(data, dict):
            raise ValueError("state is not a JSON object")
        seq = data.get("seq", 0)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise ValueError(f"bad seq {seq!r}")
        gen = data.get("generation")
        return cls(seq, _opt_str(data.get("phase")), _opt_str(data.get("verdict")),
                   gen if isinstance(gen, int) and not isinstance(gen, bool) else None,
                   data.get("updated") if isinstance(data.get("updated"), (int, float)) else None)


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


class StateStore:
    """Load, save (atomically) and lock the agent's state in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "state.json"

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise AgentError(f"cannot create the agent's state directory {self.directory}: "
                             f"{exc}; run as root or set [agent] state_dir") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the agent's lock (blocks while another boundary is being marked)."""
        self._ensure_dir()
        with open(self.directory / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> AgentState:
        """The saved state; a missing or unreadable file gives a fresh state (the seq is
        resynchronised from dom0's last ack anyway, see boundary.next_seq)."""
        try:
            return AgentState.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable agent state %s (%s); starting afresh", self.path, exc)
            return AgentState()

    def save(self, state: AgentState) -> None:
        """Write ``state`` atomically (temp file, fsync, rename)."""
        self._ensure_dir()
        state.updated = time.time()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            json.dump(asdict(state), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
