"""Guest-side programs of the consistency proof (``python3 -m xenpbr_lab.disk_workload``).

* ``writer PATH``: appends numbered records to PATH (``O_APPEND``), ``fsync`` after each,
  and only then prints ``XENPBR-WRITER: acked N`` on the console. After a crash and a
  restore it continues from the highest record on disk. A record acknowledged on the
  console and missing from the disk afterwards is a lost record.
* ``logger PATH``: the auditd pattern: keeps PATH open for writing *without*
  ``O_APPEND`` and writes at its own offset. Placed inside an image with PATH on a
  persistent disk it is a hazard (dom0 refuses the capture, naming it); started after
  the last phase it is fine. Its process name is ``lablogger`` so the refusal says so.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys
import time

_RECORD = re.compile(rb"^rec (\d+) ")
PR_SET_NAME = 15


def _name_process(name: str) -> None:
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def last_record(path: str) -> int:
    """The highest complete record number in ``path`` (0 if none)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    numbers = [int(m.group(1)) for line in data.split(b"\n")[:-1]
               if (m := _RECORD.match(line))]
    return max(numbers, default=0)


def writer(path: str, interval: float, count: int | None) -> None:
    seq = last_record(path)
    print(f"XENPBR-WRITER: start after {seq}", flush=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    written = 0
    while count is None or written < count:
        seq += 1
        os.write(fd, b"rec %d %s\n" % (seq, b"x" * 48))
        os.fsync(fd)
        print(f"XENPBR-WRITER: acked {seq}", flush=True)
        written += 1
        time.sleep(interval)


def logger(path: str, interval: float) -> None:
    _name_process("lablogger")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # no O_APPEND: its own offset
    n = 0
    while True:
        n += 1
        os.write(fd, b"log line %d\n" % n)
        os.fsync(fd)
        print(f"XENPBR-LOGGER: wrote {n}", flush=True)
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m xenpbr_lab.disk_workload")
    parser.add_argument("role", choices=("writer", "logger"))
    parser.add_argument("path")
    parser.add_argument("--interval", type=float, default=0.3)
    parser.add_argument("--count", type=int)
    args = parser.parse_args(argv)
    if args.role == "writer":
        writer(args.path, args.interval, args.count)
    else:
        logger(args.path, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
