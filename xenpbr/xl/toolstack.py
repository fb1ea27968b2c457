""":class:`XlToolstack`: the domain lifecycle operations recovery needs, over ``xl``.

Separate from :mod:`xenpbr.xl.commands` because it adapts xl to recovery's
``Toolstack`` protocol (:class:`xenpbr.recovery.Toolstack`): failures become
:class:`~xenpbr.recovery.CandidateFailed`, which recovery answers by trying its next
candidate.

The unpause that hands a recovered guest back goes through libxc when xenpbrd has a
hypervisor handle: for a PV guest ``xl unpause`` does nothing else (libxl resumes a
device model first only for HVM), and it saves starting a process on the path to
service (0.2-0.3 s under TCG, measured in the lab's recovery timelines). Renames (a
crashed domain set aside for a standby) go through the ``renamer`` given, xenpbrd's
being libxl in its own process (:mod:`xenpbr.xl.inprocess`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from xenpbr.errors import XenpbrError
from xenpbr.hypervisor.base import Hypervisor
from xenpbr.recovery import CandidateFailed
from xenpbr.xl import commands

__all__ = ["XlToolstack"]


class XlToolstack:
    """:class:`~xenpbr.recovery.Toolstack` over the ``xl`` command."""

    def __init__(self, xl: tuple[str, ...] = commands.XL, timeout: float = 300.0,
                 hypervisor: Hypervisor | None = None,
                 renamer: Callable[[str, str], str | None] | None = None) -> None:
        self.xl, self.timeout, self.hypervisor = xl, timeout, hypervisor
        # renamer(old, new): None or why not; xenpbrd's is libxl in-process
        self.renamer = renamer or partial(commands.rename, xl)

    def _run(self, *args: str) -> str:
        proc = commands.call(self.xl, *args, timeout=self.timeout)
        if proc.returncode != 0:
            raise CandidateFailed(f"xl {' '.join(args)} failed: "
                                  f"{(proc.stderr or proc.stdout).strip()[-600:]}")
        return proc.stdout

    def destroy(self, name: str) -> None:
        problem = commands.destroy(self.xl, name, self.timeout)
        if problem:
            raise CandidateFailed(f"could not destroy {name}: {problem}")

    def create(self, config: Path) -> int:
        self._run("create", str(config))
        from xenpbr.domconfig import load
        found = commands.domid(self.xl, load(config).name)
        if found is None:
            raise CandidateFailed(f"xl create {config} succeeded but the domain is missing")
        return found

    def unpause(self, domid: int) -> None:
        if self.hypervisor is None:
            self._run("unpause", str(domid))
            return
        try:
            self.hypervisor.unpause(domid)
        except XenpbrError as exc:
            raise CandidateFailed(f"could not unpause domain {domid}: {exc}") from exc

    def rename(self, old: str, new: str) -> None:
        problem = self.renamer(old, new)
        if problem:
            raise CandidateFailed(f"could not rename {old} to {new}: {problem}")

    def state(self, name: str) -> str | None:
        """xl's six state letters for ``name`` (``-b----``), or None if no such domain."""
        return commands.domain_state(self.xl, name, self.timeout)
