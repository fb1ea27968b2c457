"""`xl list` rows for every shutdown reason parse (xl prints "-rscwS" and "?")."""

from __future__ import annotations

from xenpbr_lab.channel import RunResult
from xenpbr_lab.xl import xl_list

# As real xl 4.17 printed them in the lab (tests/lab/test_hypervisor_real.py, H5/H8).
XL_LIST = """\
Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     1     r-----      40.0
off                                          1   128     1     --ps--       0.0
reboot                                       2   128     1     --psr-       0.0
suspend                                      3   128     1     --pss-       0.0
crash                                        4   128     1     --psc-       0.0
dog                                          5   128     1     ---sw-       4.8
soft                                         6   128     1     --psS-       0.0
odd                                          7   128     1     --ps?-       0.0
"""


class FakeHost:
    def run(self, argv, timeout=0, check=True):
        return RunResult(argv, 0, XL_LIST, "", 0.01, False)


def test_every_shutdown_reason_row_is_parsed() -> None:
    entries = xl_list(FakeHost())  # type: ignore[arg-type]
    assert set(entries) == {"Domain-0", "off", "reboot", "suspend", "crash", "dog", "soft",
                            "odd"}
    assert entries["dog"].state == "---sw-" and not entries["dog"].crashed
    assert entries["crash"].crashed and entries["odd"].domid == 7
