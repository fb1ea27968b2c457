"""Fixtures that boot real Xen 4.17 in QEMU once per session and hand tests a live dom0.

``xen_host`` is session-scoped: Xen boots once (about 12 s of wall time under TCG) and
every lab test runs its scenarios in that dom0. ``lab_domain`` is a factory that
remembers what it created and destroys it at teardown; when a test fails it saves the
serial log, Xen's dmesg, xenstore and the guest consoles under ``lab-artifacts/``.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import test_failed
from xenpbr_lab.build import LabImages, build, with_shadow_paging
from xenpbr_lab.errors import LabError
from xenpbr_lab.host import XenHost
from xenpbr_lab.paths import artifacts_root
from xenpbr_lab.xl import LabDomain

log = logging.getLogger(__name__)
_names = itertools.count(1)


@pytest.fixture(scope="session")
def lab_images() -> LabImages:
    """The boot artefacts (built once, cached across runs by their inputs)."""
    return build()


@pytest.fixture(scope="session")
def session_artifacts() -> Path:
    """Folder for this session's QEMU logs and failure evidence (one per pytest-xdist
    worker: each boots its own lab host)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = artifacts_root() / (time.strftime("session-%Y%m%d-%H%M%S")
                               + (f"-{worker}" if worker else ""))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _booted(images: LabImages, workdir: Path, request: pytest.FixtureRequest,
            artifacts: Path) -> Iterator[XenHost]:
    host = XenHost(images, workdir)
    try:
        host.start()
    except LabError:
        host.collect_artifacts(artifacts / "boot-failure")
        raise
    yield host
    if request.session.testsfailed:
        host.collect_artifacts(artifacts / "end-of-session")
    host.kill()


@pytest.fixture(scope="session")
def xen_host(lab_images: LabImages, session_artifacts: Path,
             request: pytest.FixtureRequest) -> Iterator[XenHost]:
    """Xen + dom0 booted in QEMU, shared by every lab test of the session."""
    yield from _booted(lab_images, session_artifacts / "host", request, session_artifacts)


@pytest.fixture(scope="session")
def shadow_xen_host(lab_images: LabImages, session_artifacts: Path,
                    request: pytest.FixtureRequest) -> Iterator[XenHost]:
    """A second host booting a Debian hypervisor built with shadow paging (log-dirty
    mode for PV guests: live capture), the same dom0 and tools otherwise."""
    shadow = session_artifacts / "shadow"
    yield from _booted(with_shadow_paging(lab_images), shadow / "host", request, shadow)


@pytest.fixture
def lab_domain(xen_host: XenHost, session_artifacts: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[..., LabDomain]]:
    """Factory of busybox PV guests; destroys them all at teardown."""
    made: list[LabDomain] = []

    def factory(prefix: str = "g", **kwargs: object) -> LabDomain:
        domain = LabDomain(xen_host, f"{prefix}{next(_names)}", **kwargs)
        made.append(domain)
        return domain

    yield factory
    if test_failed(request):
        dest = session_artifacts / re.sub(r"[^\w.-]+", "_", request.node.name)
        xen_host.collect_artifacts(dest)
        log.error("lab evidence for %s saved in %s", request.node.name, dest)
    for domain in made:
        try:
            domain.destroy()
        except LabError as exc:
            log.warning("could not destroy %s: %s", domain.name, exc)


def dom0_python_on(host: XenHost) -> Callable[..., object]:
    """Run a Python snippet in ``host``'s dom0 (as root) and return the JSON it prints
    last. The snippet runs with xenpbr importable (installed into the dom0 image from
    the working tree). ``user`` drops to that uid first, to test non-root behaviour."""
    import json
    import textwrap

    def run(code: str, timeout: float = 120.0, user: int | None = None) -> object:
        prologue = f"import os; os.setgid({user}); os.setuid({user})\n" if user else ""
        result = host.run(["python3", "-"], stdin=(prologue + textwrap.dedent(code)).encode(),
                          timeout=timeout, check=False)
        if result.rc != 0:
            raise AssertionError(f"dom0 python failed ({result.rc}):\n{result.stderr}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def dom0_python(xen_host: XenHost) -> Callable[..., object]:
    """dom0_python_on(xen_host)."""
    return dom0_python_on(xen_host)


#: Where lab tests leave big files in dom0 (its root is a RAM-backed tmpfs): image
#: stores, captured streams, checkpoints. Cleared after every test so one test's
#: leftovers can never fill dom0 for the next (seen: ENOSPC cascading through a session).
@pytest.fixture
def xenpbrd(xen_host: XenHost) -> Iterator[None]:
    """xenpbrd running in dom0 for one test (fresh state), stopped and its log shown
    afterwards (pytest prints it for failed tests)."""
    from xenpbr_lab import xenpbrd as xenpbrd_lab
    xenpbrd_lab.start(xen_host)
    yield
    print("---- xenpbrd log ----\n" + xenpbrd_lab.stop(xen_host)[-8000:])


DOM0_SCRATCH = ("/var/lib/xenpbr", "/var/lib/xenpbr-lab-images", "/tmp/*.xl", "/tmp/*.chk",
                "/tmp/*.fifo")


@pytest.fixture(autouse=True)
def dom0_scratch_cleared(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each lab test, remove what tests write to dom0's scratch locations."""
    yield
    if "xen_host" not in request.fixturenames:
        return
    host = request.getfixturevalue("xen_host")
    try:
        host.run("rm -rf " + " ".join(DOM0_SCRATCH), timeout=60, check=False)
    except LabError as exc:
        log.warning("could not clear dom0 scratch space: %s", exc)
