"""Pieces of the lab's consistency proof that run without Xen."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

from xenpbr_lab import consistency
from xenpbr_lab.cpio import CpioWriter, extract
from xenpbr_lab.disk_workload import last_record


def _archive(files: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    writer = CpioWriter(raw)
    for name, data in files.items():
        writer.file(name, data, 0o755)
    writer.symlink("bin/sh", "busybox")
    writer.char_device("dev/console", 5, 1)
    writer.close()
    return raw.getvalue()


def test_extract_unpacks_concatenated_archives_like_the_kernel(tmp_path: Path) -> None:
    first = gzip.compress(_archive({"bin/busybox": b"bb", "etc/a": b"old"}))
    second = gzip.compress(_archive({"etc/a": b"new", "usr/lib/x.py": b"x"}))
    made = extract(gzip.GzipFile(fileobj=io.BytesIO(first + b"\0" * 3 + second)), tmp_path)
    assert (tmp_path / "etc/a").read_bytes() == b"new"  # later archives win, as in Linux
    assert (tmp_path / "usr/lib/x.py").read_bytes() == b"x"
    assert (tmp_path / "bin/sh").is_symlink() and not (tmp_path / "dev/console").exists()
    assert (tmp_path / "bin/busybox").stat().st_mode & 0o777 == 0o755
    assert made >= 6


def test_writer_resumes_after_the_highest_complete_record(tmp_path: Path) -> None:
    path = tmp_path / "records"
    assert last_record(str(path)) == 0
    path.write_bytes(b"rec 1 x\nrec 2 x\nrec 9 x\nrec 10 x")  # a torn last line
    assert last_record(str(path)) == 9


def test_disk_timings_group_snapshots_and_reverts_by_mechanism() -> None:
    images = [{"disks_s": 0.1, "disk_mechanisms": "xvda=copy"},
              {"disks_s": 0.3, "disk_mechanisms": "xvda=copy"}, {"disks_s": None}]
    log = ("disk xvda (/d/r.img) of c reverted to image 2026 by copy in 0.05 s\n"
           "disk xvda (/d/r.img) of c reverted to image 2026 by copy in 0.07 s\n")
    timings = consistency._timings(log, images)
    assert timings["copy"]["snapshot_s"] == {"runs": 2, "median": 0.2, "min": 0.1, "max": 0.3}
    assert timings["copy"]["revert_s"]["runs"] == 2
