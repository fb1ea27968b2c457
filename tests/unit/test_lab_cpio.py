"""The newc writer produces archives the kernel (and cpio(1)) can read back."""

from __future__ import annotations

import gzip
import io
import stat
from pathlib import Path

from xenpbr_lab.cpio import CpioWriter, write_initramfs


def parse_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A minimal independent newc reader: name -> (mode, contents, (rmajor, rminor))."""
    entries, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, (rmaj, rmin))


def test_files_dirs_links_and_devices_round_trip() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file("/usr/bin/tool", b"#!/bin/sh\n", 0o755)
    w.symlink("/bin/sh", "/bin/busybox")
    w.char_device("/dev/console", 5, 1)
    w.file("/usr/bin/tool", b"duplicate ignored")
    w.close()
    entries = parse_newc(buf.getvalue())
    assert stat.S_ISDIR(entries["usr"][0]) and stat.S_ISDIR(entries["usr/bin"][0])
    mode, body, _ = entries["usr/bin/tool"]
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755 and body == b"#!/bin/sh\n"
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"/bin/busybox"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)


def test_initramfs_is_deterministic_and_keeps_modes(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    (stage / "sbin").mkdir(parents=True)
    (stage / "sbin/init").write_text("#!/bin/sh\n")
    (stage / "sbin/init").chmod(0o700)
    (stage / "sh").symlink_to("sbin/init")
    write_initramfs(stage, tmp_path / "a.cpio.gz")
    (stage / "sbin/init").touch()  # mtime changes must not change the image
    write_initramfs(stage, tmp_path / "b.cpio.gz")
    a = (tmp_path / "a.cpio.gz").read_bytes()
    assert a == (tmp_path / "b.cpio.gz").read_bytes()
    entries = parse_newc(gzip.decompress(a))
    assert stat.S_IMODE(entries["sbin/init"][0]) == 0o700
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["sh"][1] == b"sbin/init"
