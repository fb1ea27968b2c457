"""Standby domains: an image restored ahead of the crash, paused, ready to take over.

A phase-based reboot spends most of its time in ``xl restore``: building a domain and
copying the image's memory into it. An operator who can spare one more guest's memory
(``xenpbr_standby = 1``) lets xenpbrd do that work *before* the crash: once the newest
image is stored (and its hot stream written), it is restored paused beside the running
guest as ``<name>--standby``, with the same UUID and devices (xl's own local migration
runs its receiving domain the same way). On a crash the recovery sets the crashed domain
aside (or destroys it first, when a disk must be reverted: :mod:`xenpbr.recovery`),
renames the standby to the guest's name, puts the image's disk snapshots back, and acks
and unpauses it: no copy of memory is left on the path to service (xenconsoled
is told to reopen its logs, so the guest's console log keeps its name: :mod:`xenpbr.xl.
consoled`). Then a new standby is restored for the next crash.

The standby never ran: restored paused, its vCPUs have not executed an instruction
since the boundary, and its memory was checked on its way in (the hot stream chunk by
chunk, or every page against its SHA-256). Its block backends are attached to the
guest's disks while the guest still runs on them; that is safe because a paused guest
issues no I/O, and Xen's hotplug scripts allow it for domains of the same UUID. The disk
snapshots are put back in place (the same files, so the attached backends read them)
after the crashed domain is destroyed and before the standby runs.

A record beside the hot streams says which image and domid a standby holds::

    <store>/standby/<domain>.json   {"image_id", "domid", "name", "snapshot_disks", ...}

A standby is used only if its record names the image recovery chose and a domain of
the standby's name is still there to rename; anything else is destroyed and the image
is restored the usual way. A standby never blocks a recovery: every failure here is
reported as "no standby", and the caller restores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from dataclasses import asdict, dataclass
from pathlib import Path

from xenpbr.fsutil import atomic_write_json
from xenpbr.images import disks, skeleton
from xenpbr.images.errors import ImageInvalid, RestoreFailed
from xenpbr.images.image import Image, check_name
from xenpbr.images.layout import HasLayout, StoreLayout
from xenpbr.images.restore import restore
from xenpbr.images.store import ImageStore
from xenpbr.xl import commands, consoled

_LOG = logging.getLogger(__name__)

SUFFIX = "--standby"
#: Memory Xen must keep free beyond the standby's own (MiB): page tables, the standby's
#: devices, and room for the next ``xl create`` an operator runs.
HEADROOM_MIB = 64


class NoStandby(RestoreFailed):
    """No standby could be prepared (not enough memory, xl failed): recovery restores."""


@dataclass(frozen=True)
class Standby:
    """A prepared standby: which image, as which domain."""

    domain: str  # the guest it stands in for
    image_id: str
    name: str  # the standby domain's name now
    domid: int
    snapshot_disks: list[str]
    memory_mib: int
    prepared_s: float  # how long its restore took


def name_for(domain: str) -> str:
    """The standby domain's name while it waits (what ``xl list`` shows)."""
    return f"{check_name(domain, 'domain')}{SUFFIX}"


def record_path(store: HasLayout, domain: str) -> Path:
    return store.layout.root / "standby" / f"{check_name(domain, 'domain')}.json"


def load(store: HasLayout, domain: str) -> Standby | None:
    """The domain's standby record, None if there is none (or it is unreadable: a
    standby that cannot be trusted is not used)."""
    path = record_path(store, domain)
    try:
        return Standby(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        _LOG.warning("%s: standby record %s unreadable (%s); not used", domain, path, exc)
        return None


@dataclass(frozen=True)
class _StoreAt:
    """Just the layout of the store at a root: what reading a record needs."""

    layout: StoreLayout


def held(images_root: Path, domain: str) -> Standby | None:
    """The standby record of ``domain`` in the store at ``images_root`` (``xenpbr
    status``: without opening the store)."""
    return load(_StoreAt(StoreLayout(images_root)), domain)


def memory_mib(image: Image) -> int:
    """The guest's memory from the image's embedded config (the stream size if absent)."""
    b_info = (skeleton.embedded_config(image.stream) or {}).get("b_info")
    kib = b_info.get("max_memkb") if isinstance(b_info, dict) else None
    if isinstance(kib, int) and kib > 0:
        return -(-kib // 1024)
    return -(-image.meta.stream_bytes // 2**20)


def prepare(store: ImageStore, image: Image, xl: Sequence[str] = commands.XL) -> Standby:
    """Restore ``image`` paused as its domain's standby, replacing any older standby.

    :raises NoStandby: not enough free memory in Xen, or the restore failed (nothing is
        left behind; the message says why).
    """
    domain, name = image.meta.domain, name_for(image.meta.domain)
    discard(store, domain, xl)
    need = memory_mib(image)
    free = commands.free_memory_mib(xl)
    if free is not None and free < need + HEADROOM_MIB:
        raise NoStandby(f"no standby for {domain}: it needs {need} MiB and {HEADROOM_MIB} "
                        f"MiB of headroom, Xen has {free} MiB free")
    start = time.monotonic()
    try:
        # monitor: xl stays behind to act on the guest's own reboot or poweroff once it
        # runs, as after any phase-based reboot (it follows the domid through the rename)
        result = restore(store, image, paused=True, monitor=True, as_name=name,
                         revert_disks=False, xl=xl)
    except (RestoreFailed, ImageInvalid) as exc:
        raise NoStandby(f"no standby for {domain}: {exc}") from exc
    standby = Standby(domain, image.meta.image_id, name, result.domid, disks.needed(image),
                      need, round(time.monotonic() - start, 3))
    path = record_path(store, domain)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(standby))
    _LOG.info("standby of %s/%s ready as %s (domid %d, %d MiB) in %.2f s", domain,
              image.meta.image_id, name, result.domid, need, standby.prepared_s)
    return standby


def take_over(store: ImageStore, domain: str, image_id: str,
              xl: Sequence[str] = commands.XL,
              rename: Callable[[str, str], str | None] | None = None) -> int | None:
    """Make the standby of ``image_id`` the domain ``domain`` (still paused); its domid.

    None if there is no usable standby for that image (any other standby is destroyed):
    the caller restores. The crashed domain must be gone already (the name is free).
    ``rename(old, new)`` renames a domain (None, or why not): xenpbrd's goes through
    libxl in-process (:mod:`xenpbr.xl.inprocess`); by default ``xl rename``.
    """
    standby = load(store, domain)
    if standby is None:
        return None
    if standby.image_id != image_id:
        _LOG.info("%s: the standby holds image %s, recovery chose %s: not used", domain,
                  standby.image_id, image_id)
        discard(store, domain, xl)
        return None
    record_path(store, domain).unlink(missing_ok=True)  # used or gone: never again
    # by name: a standby destroyed meanwhile fails here (no `xl domid` round trip on the
    # path to service; a wrong domid would fail the ack, and recovery would restore)
    problem = (rename or partial(commands.rename, xl))(standby.name, domain)
    if problem:
        _LOG.warning("%s: standby %s (domid %d) not used: %s; restoring instead", domain,
                     standby.name, standby.domid, problem)
        discard(store, domain, xl)
        return None
    problem = _revert_disks(store, standby)
    if problem:
        _LOG.error("%s: standby %s not used: %s", domain, standby.name, problem)
        _destroy(xl, domain)  # renamed already: the name is the guest's now
        return None
    consoled.reopen_logs()  # its console log follows the new name, before the guest runs
    _LOG.info("%s: standby of image %s takes over (domid %d)", domain, image_id,
              standby.domid)
    return standby.domid


def _revert_disks(store: ImageStore, standby: Standby) -> str | None:
    """Put the image's disk snapshots back under the standby's attached backends; why
    not, or None."""
    if not standby.snapshot_disks:
        return None
    try:
        disks.revert(store, store.load(standby.domain, standby.image_id))
    except (ImageInvalid, OSError) as exc:
        return f"its disk snapshots could not be put back: {exc}"
    return None


def discard(store: HasLayout, domain: str, xl: Sequence[str] = commands.XL) -> None:
    """Destroy the domain's standby, if it has one (the guest was destroyed, or a newer
    image replaces it)."""
    standby = load(store, domain)
    name = standby.name if standby is not None else name_for(domain)
    if commands.domid(xl, name) is not None:
        _destroy(xl, name)
        _LOG.info("%s: standby %s destroyed", domain, name)
    record_path(store, domain).unlink(missing_ok=True)


def _destroy(xl: Sequence[str], name: str) -> None:
    problem = commands.destroy(xl, name)
    if problem:
        _LOG.error("could not destroy standby %s: %s; run `xl destroy %s`", name, problem,
                   name)
