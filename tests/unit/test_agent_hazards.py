"""The agent's hazard scan: files open for writing without O_APPEND on a disk."""

from __future__ import annotations

import os
from pathlib import Path

from xenpbr.guestproto.wire import HAZARD, MAX_HAZARDS
from xenpbr_agent import hazards
from xenpbr_agent.hazards import OpenWrite

MOUNTINFO = ("22 1 0:20 / / rw - rootfs rootfs rw\n"
             "30 22 202:16 / /data rw,relatime shared:1 - ext4 /dev/xvdb rw\n"
             "31 22 0:25 / /run rw - tmpfs tmpfs rw\n")


def fake_proc(root: Path, processes: dict[int, tuple[str, list[tuple[str, int, int]]]]) -> Path:
    """A /proc tree: pid -> (comm, [(target, flags, mnt_id)])."""
    (root / "self").mkdir(parents=True)
    (root / "self" / "mountinfo").write_text(MOUNTINFO)
    for pid, (comm, fds) in processes.items():
        d = root / str(pid)
        (d / "fd").mkdir(parents=True)
        (d / "fdinfo").mkdir()
        (d / "comm").write_text(comm + "\n")
        for n, (target, flags, mnt) in enumerate(fds):
            os.symlink(target, d / "fd" / str(n))
            (d / "fdinfo" / str(n)).write_text(f"pos:\t0\nflags:\t{flags:o}\nmnt_id:\t{mnt}\n")
    return root


def test_only_non_append_writes_on_block_devices_are_hazards(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", {
        100: ("auditd", [("/data/audit.log", 0o100001, 30)]),       # O_WRONLY: hazard
        101: ("logger", [("/data/app.log", 0o102001, 30)]),         # O_APPEND: safe
        102: ("reader", [("/data/db", 0o100000, 30)]),              # read-only: safe
        103: ("cache", [("/run/cache", 0o100002, 31)]),             # tmpfs: in the image
        104: ("sock", [("socket:[1234]", 0o2, 0), ("/dev/null", 0o1, 22)]),
        105: ("db", [("/data/my file.db", 0o100002, 30)]),          # O_RDWR: hazard
    })
    found = hazards.scan(str(proc))
    assert found == [OpenWrite(100, "auditd", "/data/audit.log", "xvdb"),
                     OpenWrite(105, "db", "/data/my file.db", "xvdb")]
    assert hazards.hazard_strings(found) == ("xvdb 100 auditd /data/audit.log",
                                             "xvdb 105 db /data/my file.db")


def test_the_agent_itself_and_vanished_processes_are_skipped(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", {7: ("agent", [("/data/state", 0o100001, 30)])})
    (proc / "8").mkdir()  # exited between listdir and reading: no comm, no fd
    assert hazards.scan(str(proc), skip_pids=frozenset({7})) == []


def test_writers_on_a_device_include_appenders_and_only_that_device(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", {
        7: ("agent", [("/data/state", 0o100001, 30)]),              # the agent: skipped
        100: ("auditd", [("/data/audit.log", 0o102001, 30)]),       # O_APPEND: named
        101: ("db", [("/data/db", 0o100002, 30)]),                  # O_RDWR: named
        102: ("reader", [("/data/ro", 0o100000, 30)]),              # read-only: not
        103: ("cache", [("/run/cache", 0o100002, 31)]),             # another device
    })
    assert hazards.writers_on("xvdb", str(proc), skip_pids=frozenset({7})) == [
        OpenWrite(100, "auditd", "/data/audit.log", "xvdb"),
        OpenWrite(101, "db", "/data/db", "xvdb")]
    assert hazards.writers_on("xvdc", str(proc)) == []


def test_a_writer_in_another_mount_namespace_is_found_by_its_files_device(
        tmp_path: Path, monkeypatch) -> None:
    """auditd on Debian 12 runs in its own mount namespace: its fd's mnt_id is unknown to
    the agent's mountinfo, but the open file's st_dev names the disk."""
    log = tmp_path / "audit.log"
    log.write_text("")
    proc = fake_proc(tmp_path / "proc", {252: ("auditd", [(str(log), 0o102001, 999)])})
    dev = os.stat(log).st_dev
    sys_block = tmp_path / "sys-dev-block"
    sys_block.mkdir()
    os.symlink("../../devices/vbd-51728/block/xvdb",
               sys_block / f"{os.major(dev)}:{os.minor(dev)}")
    monkeypatch.setattr(hazards, "SYS_DEV_BLOCK", str(sys_block))
    assert hazards.writers_on("xvdb", str(proc)) == [OpenWrite(252, "auditd", str(log),
                                                               "xvdb")]
    assert hazards.scan(str(proc)) == []  # it appends: no hazard


def test_hazard_strings_respect_the_protocol(tmp_path: Path) -> None:
    many = [OpenWrite(i, "w\x1bi th", "/data/" + "é" * 200, "xvdb") for i in range(40)]
    strings = hazards.hazard_strings(many)
    assert len(strings) == MAX_HAZARDS
    assert all(HAZARD.fullmatch(h) for h in strings)
    assert strings[0].startswith("xvdb 0 w?i?th /data/\\xe9")


def _on_block_device(path: Path) -> bool:
    """Whether ``path``'s file system is mounted from /dev (longest mount-point match)."""
    best, source = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount = left.split()[4]
        if str(path).startswith(mount.rstrip("/") + "/") and len(mount) >= len(best):
            best, source = mount, right.split()[1]
    return source.startswith("/dev/")


def test_real_proc_sees_this_process_writing(tmp_path: Path) -> None:
    """On the real kernel: a file this test opens without O_APPEND is a hazard if it is on
    a block device, one opened with O_APPEND never is."""
    target, appended = tmp_path / "offset-writer.log", tmp_path / "appender.log"
    with open(target, "w"), open(appended, "a"):
        paths = {w.path for w in hazards.scan() if w.pid == os.getpid()}
    assert (str(target) in paths) == _on_block_device(tmp_path)
    assert str(appended) not in paths
