"""The bench's ``debian`` workload: a Debian 12 guest with systemd and PostgreSQL.

The busybox workloads of :mod:`xenpbr_lab.bench` show the mechanism; this one shows what
an operator of a real distribution would see. The guest (:mod:`xenpbr_lab.debian_guest`,
the agent package installed, three phases marked by the packaged units, PostgreSQL
warmed up in the application phase) runs on the Debian dom0, its disks and xenpbr's store
on XFS (:mod:`xenpbr_lab.debian_guest_host`). The three methods run one after another on
the same root disk, ``repeats`` crashes each:

* ``normal``: ``on_crash = "restart"``: systemd boots the guest again and PostgreSQL
  starts (the agent finds no xenpbr in dom0 and marks nothing);
* ``xl-restore``: one ``xl save -c`` once PostgreSQL is warm, and on a crash the script an
  operator would write (wait for crashed, destroy, ``xl restore``);
* ``phasereboot``: ``xenpbr create`` with ``on_crash = "phasereboot"``, crashed once the
  application image's hot stream is ready.

Downtime is from the crash (``xl sysrq``) to dom0's client getting the answer to the
lab's query again (:mod:`xenpbr_lab.pg_probe`, run in dom0): the service as a client sees
it, whatever the guest's console says.

A failure here (:class:`LabError`) is reported by ``cmd_bench`` as not run, keeping what
the busybox workloads measured. Debian's ``kernel.sysrq = 438`` ignores ``xl sysrq c``:
the lab's image sets 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .bench import _XL_RESTORE, ConfigFacts, Sample
from .build import LabImages
from .debian_dom0 import DebianXenHost, build_dom0
from .debian_guest import DOM0_INITRD, GUEST_IP, QUERY, build_guest
from .debian_guest_host import (
    CRASH_GUARD,
    POLICIES,
    SRV,
    WAIT,
    WARM,
    blank_disk,
    build_packages,
    debian_domain,
    install_agent,
    prepare_dom0,
    query,
    verdicts,
    xenpbr,
)
from .errors import LabError
from .xl import LabDomain

WORKLOAD = "debian"
MEMORY_MIB = 512
RUN_ORDER = ("normal", "xl-restore", "phasereboot")
CHECKPOINT = f"{SRV}/bench.chk"


def _start(host: DebianXenHost, method: str) -> tuple[LabDomain, float]:
    """The guest created the way ``method`` needs, warm and ready to crash; the seconds
    from creation to PostgreSQL warm (with the three captures for phasereboot)."""
    on_crash = {"normal": "restart", "xl-restore": "preserve",
                "phasereboot": "phasereboot"}[method]
    guest = debian_domain(host, f"bd-{method}".replace("phasereboot", "pbr"),
                          memory_mib=MEMORY_MIB, on_crash=on_crash)
    if method == "phasereboot":
        guest.config.update({**CRASH_GUARD, "xenpbr_disks": POLICIES})
    start = time.monotonic()
    if method == "phasereboot":
        guest.write_config()
        xenpbr(host, "create", guest.config_path)
        got = verdicts(guest, 3)
        if [v for _, v in got] != ["captured"] * 3:
            raise LabError(f"the Debian guest's phases were not captured: {got}")
    else:
        guest.create(timeout=WAIT)
    guest.wait_for_console(WARM, timeout=WAIT)
    took = round(time.monotonic() - start, 2)
    if method == "phasereboot":
        newest = max(r["image"] for r in xenpbr(host, "images", guest.name) if r["image"])
        host.run(f"until journalctl -u xenpbrd -o cat --no-pager | grep -qF "
                 f"'hot stream of {guest.name}/{newest} ready'; do sleep 1; done",
                 timeout=WAIT)
    if method == "xl-restore":
        guest.save_checkpoint(CHECKPOINT, timeout=WAIT)
    return guest, took


def _crash_and_time(host: DebianXenHost, guest: LabDomain, method: str,
                    expected: str) -> float:
    trigger = f"xl sysrq {guest.name} c"
    if method == "xl-restore":
        trigger += "; " + _XL_RESTORE.format(name=guest.name, chk=CHECKPOINT)
    out = host.run(["python3", "-m", "xenpbr_lab.pg_probe", "--ip", GUEST_IP, "--query",
                    QUERY, "--domid", str(guest.domid), trigger], timeout=WAIT).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    if probe["answer"] != expected:
        raise LabError(f"{method}: after the crash PostgreSQL answered {probe['answer']!r}, "
                       f"before it {expected!r}")
    return float(probe["downtime_s"])


def _settled(host: DebianXenHost, name: str, run: int) -> dict[str, float]:
    """xenpbrd's timeline of the recovery once the agent reported the service ready
    (before the next crash: a crash during the after-restore steps is another test)."""
    while True:
        history = xenpbr(host, "history", name)
        marks = history[-1].get("since_crash", {}) if len(history) >= run else {}
        if "service_ready" in marks:
            return dict(marks)
        time.sleep(1)


def run(images: LabImages, workdir: Path, repeats: int, progress: Callable[[str], None],
        methods: tuple[str, ...] = RUN_ORDER) -> tuple[list[Sample], ConfigFacts, str]:
    """Every method, ``repeats`` crashes each, in one Debian dom0; also Xen's version."""
    guest_image = build_guest(images)
    dom0_deb, agent_deb = build_packages(workdir / "debs")
    host = DebianXenHost(images, build_dom0(images), workdir / "debian",
                         guest_disks=(guest_image.root_image,
                                      blank_disk(workdir / "debian" / "srv-xfs.raw")))
    samples: list[Sample] = []
    facts = ConfigFacts(WORKLOAD, MEMORY_MIB)
    with host:
        try:
            xen = host.run("xl info | sed -n 's/^xen_version *: //p'").stdout.strip()
            host.put(DOM0_INITRD, guest_image.initrd.read_bytes())
            prepare_dom0(host, dom0_deb)
            install_agent(host, agent_deb)
            for method in (m for m in RUN_ORDER if m in methods):
                guest, facts.first_boot_s[method] = _start(host, method)
                expected = query(host)
                for n in range(1, repeats + 1):
                    downtime = _crash_and_time(host, guest, method, expected)
                    breakdown = _settled(host, guest.name, n) if method == "phasereboot" \
                        else {}
                    samples.append(Sample(WORKLOAD, MEMORY_MIB, method, n, downtime,
                                          breakdown))
                    progress(f"{WORKLOAD:8} {MEMORY_MIB:4} MiB  {method:11} run {n}/"
                             f"{repeats}: {downtime:.2f} s")
                if method == "phasereboot":
                    facts.capture = [{k: r.get(k) for k in ("phase", "capture_s", "paused_s",
                                                            "raw_bytes", "stored_bytes")}
                                     for r in xenpbr(host, "images", guest.name)]
                (workdir / f"{guest.name}.console.log").write_text(guest.console())
                host.run(["xl", "destroy", guest.name], check=False)
                if method == "phasereboot":
                    xenpbr(host, "unregister", guest.name)
        except Exception:
            host.collect_artifacts(workdir / "failure-debian")
            raise
    return samples, facts, xen
