"""Lab failures, each naming what failed and where its log is."""

from __future__ import annotations

from pathlib import Path

from xenpbr.errors import XenpbrError


class LabError(XenpbrError):
    """Something in the lab (build, QEMU, dom0) failed."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        self.log = log
        if log is not None:
            message = f"{message} (log: {log})"
        super().__init__(message)


class MissingHostTool(LabError):
    """A host program the lab needs (qemu-system-x86_64, apt-get, dpkg) is absent."""


class PackageError(LabError):
    """A Debian package could not be resolved, downloaded or unpacked."""


class DiskSpaceError(LabError):
    """Not enough free space for the lab cache or artefacts."""


class QemuDied(LabError):
    """The QEMU process we started exited while we still needed it."""


class Dom0NotReady(LabError):
    """Dom0 did not answer on the control channel in time."""


class ChannelError(LabError):
    """The dom0 control channel broke or returned a malformed frame."""


class CommandFailed(LabError):
    """A command run in dom0 exited non-zero (or timed out)."""

    def __init__(self, argv: str, rc: int, stdout: str, stderr: str) -> None:
        self.rc, self.stdout, self.stderr = rc, stdout, stderr
        tail = (stderr or stdout).strip().splitlines()[-15:]
        detail = "\n    ".join(tail) if tail else "(no output)"
        super().__init__(f"dom0 command failed with exit code {rc}: {argv}\n    {detail}")


class LabTimeout(LabError):
    """A bounded wait in the lab ran out."""
