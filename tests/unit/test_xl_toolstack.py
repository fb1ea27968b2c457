""":class:`~xenpbr.xl.toolstack.XlToolstack`'s unpause through libxc (no xl process on
the path to service) and its failures as :class:`~xenpbr.recovery.CandidateFailed`."""

from __future__ import annotations

import pytest

from xenpbr.hypervisor.fake import FakeHypervisor
from xenpbr.recovery import CandidateFailed
from xenpbr.xl.toolstack import XlToolstack


def test_with_a_hypervisor_the_unpause_is_libxcs_not_xls() -> None:
    hv = FakeHypervisor()
    domid = hv.create_domain(paused=True)
    assert hv.pause_count(domid) == 1
    XlToolstack(xl=("/nonexistent/xl",), hypervisor=hv).unpause(domid)  # xl never runs
    assert hv.pause_count(domid) == 0


def test_an_unpause_libxc_refuses_fails_the_candidate_naming_the_domain() -> None:
    hv = FakeHypervisor()
    domid = hv.create_domain()  # not paused
    with pytest.raises(CandidateFailed, match=f"could not unpause domain {domid}"):
        XlToolstack(hypervisor=hv).unpause(domid)
