"""The Debian dom0's side of the Debian guest (:mod:`xenpbr_lab.debian_guest`).

What an operator sets up once on a dom0 for such a guest, done by the lab: an XFS file
system (``/srv/xen``) holding the guest's disks *and* xenpbr's store, so that the root
disk's snapshots are reflinks (constant time, no space until blocks diverge) instead of
copies of a 2 GiB disk; the root disk copied there from the cached image; an empty
persistent disk for auditd's log; the guest bridge with dom0's address; the xenpbr
package with ``[state] dir`` on that XFS. Then: the agent package installed into the
guest's root disk (mounted in dom0, the guest's own dpkg chrooted there), the guest's xl settings, and the
client: dom0 asks the guest's PostgreSQL the same query before and after each recovery.

Shared by ``tests/lab/test_debian_guest_real.py`` and the bench's Debian workload
(:mod:`xenpbr_lab.debian_bench`).
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .build import PROJECT_ROOT
from .debian_dom0 import DebianXenHost
from .debian_guest import (
    BRIDGE,
    DOM0_IP,
    GUEST_IP,
    QUERY,
    DebianGuest,
    install_agent_commands,
)
from .disks import HOTPLUG
from .errors import LabError
from .xl import LabDomain

SRV = "/srv/xen"
ROOT_DISK, AUDIT_DISK = f"{SRV}/debian-root.img", f"{SRV}/debian-audit.img"
DISKS = [f"{ROOT_DISK},raw,xvda,w,backendtype=phy,script={HOTPLUG}",
         f"{AUDIT_DISK},raw,xvdb,w,backendtype=phy,script={HOTPLUG}"]
POLICIES = ["xvda=snapshot", "xvdb=persistent"]
#: Deliberate crashes a minute apart are not a crash loop, nor a sign of a bad image:
#: without these the second crash would restore one phase earlier (the crash-loop guard)
#: and the image would be on trial (docs/operator-guide.md, "healthy").
CRASH_GUARD = {"xenpbr_crash_loop_window": 1, "xenpbr_healthy_after": 0,
               "xenpbr_image_failures": 100}
#: dom0's view of the raw disks handed to QEMU: the guest image, then the blank XFS disk.
GUEST_IMAGE_DEV, XFS_DEV = "/dev/vdc", "/dev/vdd"
#: The agent's line under systemd: ``<phase> <verdict>`` on the console, where journald
#: forwards it as ``[  97.42] xenpbr-agent[195]: kernel captured``.
VERDICT = re.compile(r"xenpbr-agent\[\d+\]: (kernel|services|app) (captured|skipped|"
                     r"restored:\d+|refused:\S+|timeout|not-marked)\r?$", re.M)
WARM = r"XENPBR-LAB: postgres warm in ([\d.]+) s: (\S+)"
AUDITD = r"XENPBR-LAB: auditd (\S+) pid=(\d*) log=(\S+) on=(\S*)"
#: The guest's boot outcome (xenpbr-lab-booted.service): systemd's state, failed units,
#: jobs still waiting.
BOOTED = r"XENPBR-LAB: booted (\S+) failed=\[([^]]*)\] jobs=\[([^]]*)\]"
#: Every wait is a hang detector: a systemd boot of a 512 MiB guest under TCG on a loaded
#: machine takes minutes; none of these fires on working software.
WAIT = 1800


def build_packages(dest: Path) -> tuple[Path, Path]:
    """The xenpbr and xenpbr-agent .debs of this tree (make deb takes seconds), copied to
    ``dest``: build-deb.sh starts by emptying build/deb, so two sessions building at once
    (a test and the bench) take turns under a lock and keep their own copies."""
    out = PROJECT_ROOT / "build/deb"
    out.parent.mkdir(exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".deb.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([str(PROJECT_ROOT / "tools/build-deb.sh")], check=True,
                       capture_output=True, cwd=PROJECT_ROOT)
        (dom0,) = out.glob("xenpbr_*_amd64.deb")
        (agent,) = out.glob("xenpbr-agent_*_all.deb")
        return (Path(shutil.copy2(dom0, dest / dom0.name)),
                Path(shutil.copy2(agent, dest / agent.name)))


def blank_disk(path: Path, size: int = 16 << 30) -> Path:
    """A sparse raw file for :data:`XFS_DEV` (costs nothing until written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def prepare_dom0(host: DebianXenHost, dom0_deb: Path) -> None:
    """XFS with the guest's disks, the bridge, xenpbr with its store on the XFS."""
    host.run(f"""set -e
mkfs.xfs -q -f {XFS_DEV} && mkdir -p {SRV} && mount {XFS_DEV} {SRV}
cp --sparse=always {GUEST_IMAGE_DEV} {ROOT_DISK}
truncate -s 64M {AUDIT_DISK} && mkfs.ext4 -q -F -L audit {AUDIT_DISK}
ip link add {BRIDGE} type bridge && ip addr add {DOM0_IP}/24 dev {BRIDGE}
ip link set {BRIDGE} up""", timeout=WAIT)
    host.put(f"/tmp/{dom0_deb.name}", dom0_deb.read_bytes())
    host.run(["dpkg", "-i", f"/tmp/{dom0_deb.name}"], timeout=WAIT)
    host.put("/etc/xenpbr/xenpbr.conf", f"[state]\ndir = {SRV}/xenpbr\n".encode())
    host.run("systemctl restart xenpbrd; i=0; while [ $i -lt 600 ] && "
             "! systemctl is-active -q xenpbrd; do sleep 1; i=$((i+1)); done; "
             "systemctl is-active -q xenpbrd", timeout=WAIT)


def install_agent(host: DebianXenHost, agent_deb: Path) -> None:
    """The agent package and its setup into the guest's root disk (guest not running)."""
    host.put(f"/tmp/{agent_deb.name}", agent_deb.read_bytes())
    edit_guest_disk(host, install_agent_commands(f"/tmp/{agent_deb.name}", "$G"))


def xenpbr(host: DebianXenHost, *args: str) -> Any:
    """The packaged ``xenpbr ARGS --json`` in dom0 (settings from /etc/xenpbr)."""
    return json.loads(host.run(["xenpbr", *args, "--json"], timeout=WAIT).stdout)


def query(host: DebianXenHost) -> str:
    """dom0 asks the guest's PostgreSQL over the guest network (waits for it to answer)."""
    result = host.run(f"i=0; until psql -h {GUEST_IP} -U postgres -d lab -qAt -c \"{QUERY}\" "
                      f"2>/tmp/psql.err; do i=$((i+1)); [ $i -lt {WAIT} ] || exit 1; "
                      "sleep 1; done", timeout=WAIT + 60, check=False)
    if result.rc != 0:
        raise LabError("the guest's PostgreSQL did not answer: "
                       + host.run("cat /tmp/psql.err", check=False).stdout)
    return result.stdout.strip()


def verdicts(guest: LabDomain, count: int, after: int = 0) -> list[tuple[str, str]]:
    """The first ``count`` agent verdicts on the console after offset ``after``."""
    guest.wait_for_console(r"(?s)(?:%s.*?){%d}" % (VERDICT.pattern[:-4], count),
                           after=after, timeout=WAIT)
    return VERDICT.findall(guest.console()[after:])[:count]


def debian_domain(host: DebianXenHost, name: str, memory_mib: int = 512, cmdline: str = "",
                  on_crash: str = "preserve", **settings: object) -> LabDomain:
    """A lab domain booting the Debian guest from :data:`DISKS` on the bridge."""
    domain = LabDomain(host, name, memory_mib=memory_mib, on_crash=on_crash)
    domain.config.update(settings)
    domain.config.update(DebianGuest.xl_settings(DISKS, cmdline))
    return domain


def edit_guest_disk(host: DebianXenHost, script: str) -> None:
    """Run ``script`` in dom0 with the guest's root disk mounted at ``$G`` (the guest must
    not be running): how the tests break the guest the ways an operator might."""
    host.run(f"set -e; G=/mnt/guest; mkdir -p $G; mount -o loop {ROOT_DISK} $G\n"
             f"{script}\numount $G", timeout=WAIT)
