"""Parsing xl's output and rendering xl configs."""

from __future__ import annotations

from xenpbr_lab.channel import RunResult
from xenpbr_lab.xl import render_config, xl_list

XL_LIST = """\
Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     1     r-----      12.5
crashy                                       3   128     1     ---sc-       3.2
"""


class FakeHost:
    def run(self, argv, timeout=0, check=True):
        return RunResult(argv, 0, XL_LIST, "", 0.01, False)


def test_xl_list_parses_state_and_crash() -> None:
    entries = xl_list(FakeHost())  # type: ignore[arg-type]
    assert entries["Domain-0"].domid == 0 and not entries["Domain-0"].crashed
    crashy = entries["crashy"]
    assert (crashy.domid, crashy.memory_mib, crashy.vcpus, crashy.state) == (3, 128, 1, "---sc-")
    assert crashy.crashed


def test_render_config_quotes_strings_and_lists() -> None:
    text = render_config({"name": 'a"b', "memory": 128, "disk": ["x,y", "z"]})
    assert text == 'name = "a\\"b"\nmemory = 128\ndisk = ["x,y", "z"]\n'
