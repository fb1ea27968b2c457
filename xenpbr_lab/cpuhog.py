"""A CPU hog beside the lab: busy processes that take CPU time from QEMU.

Machines differ, and a busy one runs the lab several times slower than an idle one. The
demo must still pass there (nothing may depend on a fast machine), so it can be run
beside ``N`` spinning processes: with QEMU's two vCPU threads on a 2-core machine, six
spinners leave QEMU about a quarter of the CPU, a machine four times slower. The report
shows the effect where it can be compared (QEMU start to dom0 ready).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

_SPIN = "while True:\n    pass\n"


@contextmanager
def cpu_hog(processes: int) -> Iterator[list[int]]:
    """Run ``processes`` busy loops for the duration of the block; yield their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL)
             for _ in range(processes)]
    if procs:
        log.info("CPU hog: %d busy processes beside the lab", len(procs))
    try:
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
