"""The agent's file-system freeze (``xenpbr_agent.freeze``), against a fake kernel.

The fake never touches a real file system: freezing the test host's disks would hang it.
One real test issues FIFREEZE on a tmpfs only (tmpfs cannot freeze, so nothing happens).
"""

from __future__ import annotations

import errno
import os
import signal
import sys

import pytest

from xenpbr_agent import AgentError
from xenpbr_agent.freeze import FIFREEZE, FITHAW, KERNEL, frozen


class FakeFreezer:
    """A kernel whose mount points are names: ``devices`` maps them to device numbers
    (default: one per mount), ``errors`` makes an ioctl fail with an errno."""

    def __init__(self, devices: dict[str, int] | None = None,
                 errors: dict[tuple[str, int], int] | None = None,
                 busy: set[int] | None = None) -> None:
        self.devices = devices or {}
        self.errors = errors or {}
        self.busy = busy or set()
        self.calls: list[tuple[str, str]] = []
        self.frozen: set[str] = set()

    def device(self, mount: str) -> int:
        if mount not in self.devices:
            self.devices[mount] = 1000 + len(self.devices)
        return self.devices[mount]

    def ioctl(self, mount: str, request: int) -> None:
        assert request in (FIFREEZE, FITHAW)
        name = "freeze" if request == FIFREEZE else "thaw"
        self.calls.append((name, mount))
        code = self.errors.get((mount, request))
        if code is not None:
            raise OSError(code, os.strerror(code))
        (self.frozen.add if request == FIFREEZE else self.frozen.discard)(mount)

    def output_devices(self) -> set[int]:
        return self.busy


def test_freezes_in_order_and_thaws_in_reverse() -> None:
    fake = FakeFreezer()
    with frozen(["/", "/var", "/data"], fake) as done:
        assert done == {"/", "/var", "/data"}
        assert fake.frozen == {"/", "/var", "/data"}
        assert [c for c in fake.calls if c[0] == "thaw"] == []
    assert fake.calls == [("freeze", "/"), ("freeze", "/var"), ("freeze", "/data"),
                          ("thaw", "/data"), ("thaw", "/var"), ("thaw", "/")]
    assert fake.frozen == set()


def test_nothing_to_freeze() -> None:
    fake = FakeFreezer()
    with frozen([], fake) as done:
        assert done == set()
    assert fake.calls == []


def test_ebusy_counts_as_frozen_but_is_not_thawed() -> None:
    fake = FakeFreezer(errors={("/data", FIFREEZE): errno.EBUSY})
    with frozen(["/", "/data"], fake) as done:
        assert done == {"/", "/data"}
    assert ("thaw", "/data") not in fake.calls
    assert fake.calls[-1] == ("thaw", "/")


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL])
def test_a_file_system_that_cannot_freeze_is_reported_not_frozen(code, caplog) -> None:
    fake = FakeFreezer(errors={("/scratch", FIFREEZE): code})
    with frozen(["/", "/scratch", "/data"], fake) as done:
        assert done == {"/", "/data"}
    assert ("thaw", "/scratch") not in fake.calls
    assert fake.frozen == set()
    assert "/scratch: this file system cannot be frozen" in caplog.text


@pytest.mark.parametrize("code,needle", [(errno.EIO, "unmount it or fix it"),
                                         (errno.EPERM, "run xenpbr-agent as root")])
def test_an_error_mid_way_thaws_the_earlier_ones_and_names_the_mount(code, needle) -> None:
    fake = FakeFreezer(errors={("/var", FIFREEZE): code})
    match = f"cannot freeze the file system on /var: .*{needle}"
    with pytest.raises(AgentError, match=match), frozen(["/", "/data", "/var", "/later"], fake):
        pytest.fail("the body must not run")
    assert fake.calls == [("freeze", "/"), ("freeze", "/data"), ("freeze", "/var"),
                          ("thaw", "/data"), ("thaw", "/")]
    assert fake.frozen == set()


def test_a_mount_point_that_cannot_be_stated_is_an_error() -> None:
    class Gone(FakeFreezer):
        def device(self, mount: str) -> int:
            if mount == "/gone":
                raise FileNotFoundError(errno.ENOENT, "No such file or directory")
            return super().device(mount)

    fake = Gone()
    with pytest.raises(AgentError, match="cannot stat mount point /gone"), \
            frozen(["/", "/gone"], fake):
        pass
    assert fake.calls == [("freeze", "/"), ("thaw", "/")]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_thaws_when_the_body_raises(exc) -> None:
    fake = FakeFreezer()
    with pytest.raises(type(exc)), frozen(["/", "/data"], fake):
        raise exc
    assert fake.calls[-2:] == [("thaw", "/data"), ("thaw", "/")]
    assert fake.frozen == set()


def test_thaw_errors_are_logged_not_raised_and_the_rest_still_thaws(caplog) -> None:
    fake = FakeFreezer(errors={("/data", FITHAW): errno.EIO, ("/var", FITHAW): errno.EINVAL})
    with frozen(["/", "/var", "/data"], fake):
        pass
    assert fake.calls[-3:] == [("thaw", "/data"), ("thaw", "/var"), ("thaw", "/")]
    assert "cannot thaw /data" in caplog.text and "fsfreeze --unfreeze /data" in caplog.text
    assert "/var was not frozen any more" in caplog.text


def test_ctrl_c_during_a_thaw_still_thaws_the_others() -> None:
    class Interrupted(FakeFreezer):
        def ioctl(self, mount: str, request: int) -> None:
            super().ioctl(mount, request)
            if (mount, request) == ("/data", FITHAW):
                raise KeyboardInterrupt

    fake = Interrupted()
    with pytest.raises(KeyboardInterrupt), frozen(["/", "/var", "/data"], fake):
        pass
    assert fake.calls[-3:] == [("thaw", "/data"), ("thaw", "/var"), ("thaw", "/")]


def test_ctrl_c_right_after_a_freeze_still_thaws_it() -> None:
    class Interrupted(FakeFreezer):
        def ioctl(self, mount: str, request: int) -> None:
            super().ioctl(mount, request)
            if (mount, request) == ("/data", FIFREEZE):
                raise KeyboardInterrupt  # the ioctl succeeded, the return did not

    fake = Interrupted()
    with pytest.raises(KeyboardInterrupt), frozen(["/", "/data"], fake):
        pass
    assert fake.frozen == set()
    assert fake.calls[-2:] == [("thaw", "/data"), ("thaw", "/")]


def test_each_super_block_is_frozen_once() -> None:
    fake = FakeFreezer(devices={"/": 1, "/srv/bind": 1, "/data": 2, "/data2": 2})
    with frozen(["/", "/data", "/srv/bind", "/", "/data2"], fake) as done:
        assert done == {"/", "/srv/bind", "/data", "/data2"}  # all are frozen
    assert fake.calls == [("freeze", "/"), ("freeze", "/data"),
                          ("thaw", "/data"), ("thaw", "/")]


def test_a_bind_mount_of_a_file_system_that_cannot_freeze_is_not_frozen_either() -> None:
    fake = FakeFreezer(devices={"/": 1, "/shm": 7, "/shm2": 7},
                       errors={("/shm", FIFREEZE): errno.EOPNOTSUPP})
    with frozen(["/", "/shm", "/shm2"], fake) as done:
        assert done == {"/"}
    assert ("freeze", "/shm2") not in fake.calls


def test_the_file_system_holding_our_output_file_is_not_frozen(caplog) -> None:
    fake = FakeFreezer(devices={"/": 1, "/var": 2}, busy={2})
    with frozen(["/", "/var"], fake) as done:
        assert done == {"/"}
    assert ("freeze", "/var") not in fake.calls
    assert "/var holds this process's stdout/stderr" in caplog.text


def test_the_window_is_logged_with_its_length(caplog) -> None:
    ticks = iter([100.0, 102.5])
    caplog.set_level("INFO", logger="xenpbr_agent")
    with frozen(["/", "/data"], FakeFreezer(), clock=lambda: next(ticks)):
        pass
    assert "frozen for this boundary: /, /data" in caplog.text
    assert "thawed /data, / after 2.500 s frozen" in caplog.text


def test_no_bytecode_is_written_while_frozen_and_sigterm_raises() -> None:
    before_bytecode, before_term = sys.dont_write_bytecode, signal.getsignal(signal.SIGTERM)
    fake = FakeFreezer()
    with pytest.raises(SystemExit) as info, frozen(["/"], fake):
        assert sys.dont_write_bytecode is True
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            pass
        pytest.fail("SIGTERM did not end the window")
    assert info.value.code == 128 + signal.SIGTERM
    assert fake.calls == [("freeze", "/"), ("thaw", "/")]
    assert sys.dont_write_bytecode == before_bytecode
    assert signal.getsignal(signal.SIGTERM) == before_term


def _tmpfs_mount() -> str | None:
    """A tmpfs mount point of this machine (from /proc/self/mounts), or None."""
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "tmpfs" and "\\" not in fields[1] \
                and os.path.isdir(fields[1]):
            return fields[1]
    return None


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                    reason="FIFREEZE needs root on Linux")
def test_real_fifreeze_on_tmpfs_is_reported_cannot_freeze(caplog) -> None:
    """Only ever a tmpfs: the kernel answers EOPNOTSUPP (checked on Linux 6.18), so the
    real ioctl path runs without freezing anything. Never point this at a disk."""
    mount = _tmpfs_mount()
    if mount is None:
        pytest.skip("no tmpfs mount on this machine")
    with frozen([mount], KERNEL) as done:
        assert done == set()
    assert f"{mount}: this file system cannot be frozen" in caplog.text
