"""A Debian 12 guest with systemd, PostgreSQL and auditd for the lab (issue 16, point 3).

The busybox guests boot from an initramfs in seconds; an operator's guest is a Debian or
Ubuntu system on a disk, booted by systemd, running a real server. This module builds one
with ``mmdebstrap`` (systemd, Python, libxenstore4, PostgreSQL 15, auditd, and the lab's
kernel package so that Debian's own initrd carries ``xen-blkfront`` for the root disk),
writes it as an ext4 image cached by its inputs, and describes how a lab guest boots it:
the lab's kernel, the guest's initrd (put into dom0), ``root=/dev/xvda``.

What the image holds beyond Debian's packages (everything an operator would set up, and
the lab's few probes, all under ``/usr/lib/xenpbr-lab`` or named ``xenpbr-lab-*``):

- the application: PostgreSQL 15 listening on the guest network (``10.99.0.2``, dom0 is
  ``10.99.0.1``; systemd-networkd), with a database ``lab`` generated when the image is
  built (:data:`DB_ROWS` rows in ``docs``), and ``xenpbr-lab-pgwarm.service``, the warm-up
  (``pg_prewarm`` of the table and its index, then one full query), which prints
  ``XENPBR-LAB: postgres warm`` on the console;
- auditd installed and *disabled*: the seeds' example of a service that must start after
  the last phase (its log, ``/var/log/audit``, lives on a persistent disk, ``xvdb``, which
  the agent mounts after the last phase);
- ``xenpbr-lab-audit-in-phase.service``: with ``lab.auditd=phase`` on the kernel command
  line it mounts that disk and starts auditd *inside* the services phase, the mistake
  dom0 must refuse by name;
- ``xenpbr-lab-crash.service``: crashes the kernel from inside (``echo c >
  /proc/sysrq-trigger``) when dom0 writes ``now`` to the guest's ``data/lab-crash``;
- ``xenpbr-lab-booted.service``: prints ``XENPBR-LAB: booted <state> failed=[...]
  jobs=[...]`` once systemd has finished starting up (``systemctl is-system-running``);
- ``/usr/lib/xenpbr-lab/report``: prints auditd's state on the console (the agent runs it
  after the last phase, on a fresh boot and after every restore).

The xenpbr-agent package is *not* in the image: the tests install it from this tree's
.deb (:func:`install_agent_commands`), after timing a boot without it.
"""

from __future__ import annotations

import inspect
import shlex
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .build import LabImages
from .debian_dom0 import SUITE, build_root_image
from .errors import LabError
from .paths import cache_root, digest

PACKAGES = ("systemd-sysv", "udev", "kmod", "initramfs-tools", "python3", "libxenstore4",
            "xenstore-utils", "iproute2", "procps", "postgresql-15", "auditd")
DISK_SIZE = "2G"
#: Where a session's guest initrd is put in dom0, and the device dom0 sees the disk as.
DOM0_INITRD = "/lab/debian-guest-initrd.img"
DOM0_DISK = "/dev/vdc"
GUEST_IP, DOM0_IP, BRIDGE = "10.99.0.2", "10.99.0.1", "xenbr0"
GUEST_MAC = "00:16:3e:63:00:02"
DB_ROWS = 400_000
#: The query a client asks before and after a recovery: it reads the whole table.
QUERY = "SELECT count(*), md5(string_agg(body, '' ORDER BY id)) FROM docs WHERE id % 7 = 0"
PG = "/usr/lib/postgresql/15/bin"
PG_DATA = "/var/lib/postgresql/15/main"
PG_CONF = "/etc/postgresql/15/main"

DB_SQL = f"""\
CREATE EXTENSION pg_prewarm;
CREATE TABLE docs AS
    SELECT g AS id, md5(g::text) || repeat(chr(97 + g % 26), 64) AS body
    FROM generate_series(1, {DB_ROWS}) AS g;
ALTER TABLE docs ADD PRIMARY KEY (id);
ANALYZE docs;
"""

PGWARM = f"""\
#!/bin/sh
# The application's warm-up: PostgreSQL loads its table and index into shared buffers,
# then answers the query its clients ask. The app phase is marked after this.
start=$(cut -d' ' -f1 /proc/uptime)
until runuser -u postgres -- psql -qAt -d lab -c 'SELECT 1' >/dev/null 2>&1; do sleep 1; done
runuser -u postgres -- psql -qAt -d lab -v ON_ERROR_STOP=1 \\
    -c "SELECT pg_prewarm('docs'), pg_prewarm('docs_pkey')" >/dev/null || exit 1
result=$(runuser -u postgres -- psql -qAt -d lab -v ON_ERROR_STOP=1 -c "{QUERY}") || exit 1
end=$(cut -d' ' -f1 /proc/uptime)
took=$(awk -v a="$start" -v b="$end" 'BEGIN {{ printf "%.1f", b - a }}')
echo "XENPBR-LAB: postgres warm in $took s: $result" >/dev/console
"""

PGWARM_UNIT = """\
[Unit]
Description=lab application warm-up: PostgreSQL prewarms the lab database
Requires=postgresql@15-main.service
After=postgresql@15-main.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/xenpbr-lab/pgwarm

[Install]
WantedBy=multi-user.target
"""

AUDIT_IN_PHASE_UNIT = """\
[Unit]
Description=lab: auditd started inside the services phase (must be refused by dom0)
ConditionKernelCommandLine=lab.auditd=phase
After=basic.target xenpbr-phase@kernel.service
Before=xenpbr-phase@services.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount -t ext4 /dev/xvdb /var/log/audit
ExecStart=/bin/systemctl start auditd.service

[Install]
WantedBy=multi-user.target
"""

CRASH_UNIT = """\
[Unit]
Description=lab: crash the kernel from inside when dom0 asks (data/lab-crash = now)
DefaultDependencies=no
After=local-fs.target

[Service]
ExecStart=/bin/sh -c 'while :; do [ "$$(xenstore-read data/lab-crash 2>/dev/null)" = now ] \\
    && echo c > /proc/sysrq-trigger; sleep 2; done'

[Install]
WantedBy=sysinit.target
"""

BOOTED = """\
#!/bin/sh
# The boot's outcome on the console, once systemd has finished starting up (or, after
# 20 minutes, what it is still waiting for): the lab reads "booted running".
i=0
while [ $i -lt 1200 ]; do
    state=$(systemctl is-system-running)
    case $state in running|degraded) break ;; esac
    sleep 1; i=$((i + 1))
done
failed=$(systemctl --failed --plain --no-legend | awk '{printf "%s ", $1}')
jobs=$(systemctl list-jobs --plain --no-legend | awk '{printf "%s ", $2}')
echo "XENPBR-LAB: booted $state failed=[$failed] jobs=[$jobs]" >/dev/console
"""

BOOTED_UNIT = """\
[Unit]
Description=lab: report the boot's outcome on the console

[Service]
# simple, not oneshot: a start job still running would keep the system "starting"
Type=simple
ExecStart=/usr/lib/xenpbr-lab/booted

[Install]
WantedBy=multi-user.target
"""

REPORT = """\
#!/bin/sh
# After the last phase (and after every restore) the agent runs this: auditd's state on
# the console, once auditd has its log open (the lab waits for this line).
i=0
while [ $i -lt 1200 ] && ! pidof auditd >/dev/null; do sleep 0.5; i=$((i + 1)); done
# a forking unit is "activating" until its parent exits: wait for that too (TCG is slow)
while [ $i -lt 1200 ] && [ "$(systemctl is-active auditd)" = activating ]; do
    sleep 0.5; i=$((i + 1))
done
log=/var/log/audit/audit.log
echo "XENPBR-LAB: auditd $(systemctl is-active auditd) pid=$(pidof auditd) \\
log=$(stat -c %s $log 2>/dev/null || echo none) on=$(findmnt -no SOURCE /var/log/audit)" \\
    >/dev/console
"""

NETWORK = f"""\
[Match]
# xen-netfront's first NIC; systemd's naming makes it enX0 (eth0 without udev)
Name=enX0 eth0

[Network]
Address={GUEST_IP}/24
"""

#: The agent's configuration for this guest (the tests install it with the package).
AGENT_CONF = """\
[agent]
identity = lab-debian-1
# a capture of a 512 MiB guest under emulation on a loaded machine takes minutes
ack_timeout = 3600

[phase:kernel]
[phase:services]
[phase:app]

[after-last-phase]
mount = /dev/xvdb /var/log/audit ext4
start = systemctl start --no-block auditd.service
        /usr/lib/xenpbr-lab/report
"""

#: The ordering drop-ins of the three packaged phase units (example-3-phase.conf's shape).
PHASE_ORDER = {
    "kernel": "[Unit]\nAfter=systemd-remount-fs.service local-fs.target "
              "systemd-journal-flush.service\nBefore=sysinit.target\n",
    "services": "[Unit]\nAfter=xenpbr-phase@kernel.service basic.target "
                "systemd-networkd.service systemd-logind.service\n"
                "Before=postgresql@15-main.service multi-user.target\n",
    "app": "[Unit]\nAfter=xenpbr-phase@services.service xenpbr-lab-pgwarm.service\n"
           "Before=multi-user.target\n",
}


@dataclass(frozen=True)
class DebianGuest:
    """A built Debian guest: its root disk image and its initrd."""

    root_image: Path
    initrd: Path

    @staticmethod
    def xl_settings(disks: list[str], cmdline: str = "") -> dict[str, object]:
        """What a :class:`~xenpbr_lab.xl.LabDomain` config needs to boot this guest from
        ``disks`` (xl disk specs, the root first), on the lab bridge."""
        return {"ramdisk": DOM0_INITRD,
                "extra": f"console=hvc0 root=/dev/xvda rw {cmdline}".strip(),
                "disk": disks, "vif": [f"mac={GUEST_MAC},bridge={BRIDGE}"]}


@contextmanager
def _chroot_mounts(root: Path) -> Iterator[None]:
    """``/proc`` and ``/dev`` inside ``root`` for a server started in the chroot."""
    mounted: list[Path] = []
    try:
        for args, target in ((["-t", "proc", "proc"], root / "proc"),
                             (["--bind", "/dev"], root / "dev")):
            subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def _chroot(root: Path, script: str) -> None:
    proc = subprocess.run(["chroot", str(root), "sh", "-ec", script], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"in the Debian guest root: {script.splitlines()[0]}...: "
                       f"{(proc.stdout + proc.stderr).strip()[-1500:]}")


def _generate_database(root: Path) -> None:
    """The lab database, made by the image's own PostgreSQL started in the chroot (Unix
    socket only, System V shared memory: no network, no /dev/shm needed)."""
    (root / "tmp/lab-db.sql").write_text(DB_SQL)
    opts = "-c config_file=" + PG_CONF + "/postgresql.conf -c listen_addresses='' " \
           "-c dynamic_shared_memory_type=sysv"
    with _chroot_mounts(root):
        _chroot(root, f"""mkdir -p /run/postgresql && chown postgres:postgres /run/postgresql
runuser -u postgres -- {PG}/pg_ctl -D {PG_DATA} -o {shlex.quote(opts)} -w -t 600 start >/dev/null
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -c 'CREATE DATABASE lab'
runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d lab -f /tmp/lab-db.sql
runuser -u postgres -- {PG}/pg_ctl -D {PG_DATA} -m fast -w stop >/dev/null""")
    (root / "tmp/lab-db.sql").unlink()


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _customize(root: Path) -> None:
    """The lab's additions (module docstring): fstab without the audit disk (the agent
    mounts it), the network, PostgreSQL open to dom0, the warm-up, auditd disabled, the
    probes, a root without password (the console is the lab's only way in)."""
    _write(root, "etc/fstab", "/dev/xvda / ext4 rw,errors=remount-ro 0 1\n")
    _write(root, "etc/hostname", "debian-guest\n")
    _write(root, "etc/systemd/network/50-lab.network", NETWORK)
    # Debian's default kernel.sysrq = 438 leaves out the dump keys, so `xl sysrq DOMAIN c`
    # would be ignored by the guest (seen in the lab): the lab crashes guests that way
    _write(root, "etc/sysctl.d/90-xenpbr-lab-sysrq.conf", "kernel.sysrq = 1\n")
    with open(root / f"{PG_CONF.lstrip('/')}/postgresql.conf", "a") as conf:
        conf.write("\n# lab: clients on the guest network\nlisten_addresses = '*'\n")
    with open(root / f"{PG_CONF.lstrip('/')}/pg_hba.conf", "a") as hba:
        hba.write(f"host all all {DOM0_IP}/32 trust\n")
    _write(root, "usr/lib/xenpbr-lab/pgwarm", PGWARM, 0o755)
    _write(root, "usr/lib/xenpbr-lab/report", REPORT, 0o755)
    _write(root, "usr/lib/xenpbr-lab/booted", BOOTED, 0o755)
    for name, text in (("xenpbr-lab-pgwarm", PGWARM_UNIT), ("xenpbr-lab-crash", CRASH_UNIT),
                       ("xenpbr-lab-audit-in-phase", AUDIT_IN_PHASE_UNIT),
                       ("xenpbr-lab-booted", BOOTED_UNIT)):
        _write(root, f"etc/systemd/system/{name}.service", text)
    (root / "var/log/audit").mkdir(parents=True, exist_ok=True)
    _generate_database(root)
    _chroot(root, "systemctl disable auditd.service 2>&1\n"
                  "systemctl enable systemd-networkd.service xenpbr-lab-pgwarm.service "
                  "xenpbr-lab-crash.service xenpbr-lab-audit-in-phase.service "
                  "xenpbr-lab-booted.service 2>&1\n"
                  "passwd -d root >/dev/null")


def build_guest(images: LabImages, cache: Path | None = None) -> DebianGuest:
    """Build (or reuse) the Debian guest for the lab's kernel."""
    cache = cache or cache_root()
    kernel_package = f"linux-image-{images.kernel_version}"
    key = digest(SUITE, " ".join(PACKAGES), kernel_package, DISK_SIZE,
                 inspect.getsource(_customize), inspect.getsource(_generate_database),
                 DB_SQL, PGWARM, PGWARM_UNIT, AUDIT_IN_PHASE_UNIT, CRASH_UNIT, REPORT, NETWORK,
                 BOOTED, BOOTED_UNIT)
    image, initrd = build_root_image(cache / "debian-guest" / key, (*PACKAGES, kernel_package),
                                     _customize, images.kernel_version, DISK_SIZE,
                                     "debian-guest", cache)
    return DebianGuest(image, initrd)


def install_agent_commands(deb: str, mount: str) -> str:
    """The dom0 shell commands that install the xenpbr-agent package ``deb`` into the
    guest root file system mounted at ``mount`` with the guest's own dpkg (chrooted:
    ``dpkg --root`` would look users and groups up in dom0, which lacks the guest's
    ``ssl-cert``) and set it up as an operator would: ``/etc/xenpbr/agent.conf``, the
    three phase units enabled with their ordering drop-ins."""
    lines = [f"cp {deb} {mount}/tmp/xenpbr-agent.deb",
             f"chroot {mount} dpkg -i /tmp/xenpbr-agent.deb",
             f"rm {mount}/tmp/xenpbr-agent.deb",
             f"mkdir -p {mount}/etc/xenpbr",
             f"printf %s {shlex.quote(AGENT_CONF)} > {mount}/etc/xenpbr/agent.conf"]
    for phase, order in PHASE_ORDER.items():
        dropin = f"{mount}/etc/systemd/system/xenpbr-phase@{phase}.service.d"
        lines += [f"mkdir -p {dropin}",
                  f"printf %s {shlex.quote(order)} > {dropin}/order.conf"]
    lines.append(f"chroot {mount} systemctl enable " + " ".join(
        f"xenpbr-phase@{phase}.service" for phase in PHASE_ORDER))
    return "\n".join(lines)
