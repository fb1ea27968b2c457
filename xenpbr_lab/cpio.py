"""A deterministic ``newc`` cpio writer for Linux initramfs images.

Written in Python rather than shelling out to cpio(1) so that ownership is always root,
timestamps are fixed (identical inputs give identical images) and device nodes such as
``/dev/console`` can be added without mknod privileges.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path
from typing import BinaryIO

_TRAILER = "TRAILER!!!"
_FIXED_MTIME = 0


class CpioWriter:
    """Append files, directories, symlinks and device nodes to a newc archive."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._seen: set[str] = set()

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0),
                nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, _FIXED_MTIME, size, 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        self._out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad(110 + len(encoded))

    def _pad(self, length: int) -> None:
        self._out.write(b"\0" * (-length % 4))

    def _claim(self, name: str) -> bool:
        name = name.strip("/")
        if name in self._seen:
            return False
        self._seen.add(name)
        return True

    def directory(self, name: str, mode: int = 0o755) -> None:
        """Add a directory (and its missing parents)."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub and self._claim(sub):
                self._header(sub, stat.S_IFDIR | mode, 0, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with ``data`` as its contents."""
        self.directory(os.path.dirname(name.strip("/")))
        if self._claim(name):
            self._header(name.strip("/"), stat.S_IFREG | mode, len(data))
            self._out.write(data)
            self._pad(len(data))

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self.directory(os.path.dirname(name.strip("/")))
        if self._claim(name):
            data = target.encode()
            self._header(name.strip("/"), stat.S_IFLNK | 0o777, len(data))
            self._out.write(data)
            self._pad(len(data))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (e.g. /dev/console for the kernel's first open)."""
        self.directory(os.path.dirname(name.strip("/")))
        if self._claim(name):
            self._header(name.strip("/"), stat.S_IFCHR | mode, 0, rdev=(major, minor))

    def tree(self, src: Path, dest: str = "/") -> None:
        """Add a host directory tree below ``dest``, preserving modes and symlinks."""
        for path in sorted(src.rglob("*")):
            name = os.path.join(dest, str(path.relative_to(src)))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                self.symlink(name, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                self.directory(name, stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                self.file(name, path.read_bytes(), stat.S_IMODE(st.st_mode))

    def close(self) -> None:
        """Write the trailer record."""
        self._header(_TRAILER, 0, 0)


def write_initramfs(stage: Path, out: Path, level: int = 1,
                    with_device_nodes: bool = True) -> None:
    """Pack the staged tree ``stage`` into ``out`` (atomically): gzip-compressed unless
    ``level`` is 0 (an already-compressed payload gains nothing from a second pass).

    ``with_device_nodes`` adds /dev/console and /dev/null, which the kernel needs before
    devtmpfs is mounted; only the first archive of a concatenated initramfs needs them.
    """
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "wb") as raw:
        sink = raw if level == 0 else gzip.GzipFile(filename="", fileobj=raw, mode="wb",
                                                    compresslevel=level, mtime=0)
        writer = CpioWriter(sink)  # type: ignore[arg-type]
        if with_device_nodes:
            writer.char_device("dev/console", 5, 1)
            writer.char_device("dev/null", 1, 3, 0o666)
        writer.tree(stage)
        writer.close()
        if sink is not raw:
            sink.close()
    os.replace(tmp, out)


def extract(archive: BinaryIO, dest: Path) -> int:
    """Unpack every ``newc`` archive in ``archive`` (concatenated, as in a Linux
    initramfs: zero padding between them is skipped) into ``dest``; device nodes are
    left out (a mounted devtmpfs provides them). Returns the number of entries made.

    Used in dom0 to turn the guest initramfs into the contents of a guest root disk.
    """
    made = 0
    while True:
        magic = archive.read(6)
        while magic and magic.strip(b"\0") == b"":  # padding between archives
            magic = (magic.lstrip(b"\0") + archive.read(6))[:6]
            if len(magic) < 6:
                break
        if len(magic) < 6:
            return made
        if magic != b"070701":
            raise ValueError(f"not a newc cpio archive (magic {magic!r})")
        fields = [int(archive.read(8), 16) for _ in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = archive.read(namesize)[:-1].decode()
        archive.read(-(110 + namesize) % 4)
        data = archive.read(size)
        archive.read(-size % 4)
        if name != _TRAILER and _unpack_entry(dest, name, mode, data):
            made += 1


def _unpack_entry(dest: Path, name: str, mode: int, data: bytes) -> bool:
    path = dest / name.strip("/")
    if ".." in Path(name).parts:
        raise ValueError(f"cpio entry {name!r} leaves the destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFDIR:
        path.mkdir(exist_ok=True)
        path.chmod(stat.S_IMODE(mode))
    elif kind == stat.S_IFLNK:
        if path.is_symlink() or path.exists():
            path.unlink()
        os.symlink(data.decode(), path)
    elif kind == stat.S_IFREG:
        if path.is_symlink():
            path.unlink()
        path.write_bytes(data)
        path.chmod(stat.S_IMODE(mode))
    else:
        return False
    return True
