"""A managed domain's life: ``xenpbr check``, ``create`` and ``unregister``.

``check`` validates without acting: the config's grammar and ``xenpbr_*`` keys, the
disk policies, then xl's own dry run (``xl -N create``) of the config xl would be given.

``create`` writes the registration, runs ``xl create`` and keeps the registration only
if xl succeeded. It is written *before* xl runs because xenpbrd learns of a domain once,
when it appears: registered a moment later, the new domain would never be adopted. If xl
fails the registration is put back as it was (nothing registered, or the previous one for
``--update``) and xl's exit status and message are the error. Each registration carries
the UUID xl gives the domain (the config's, or a new one), so xenpbrd never adopts a
different domain that merely reuses the name.

``unregister`` stops managing a domain: its images, disk snapshots, hot streams, the
resurrected data dom0 holds for it, state and published xenstore keys go; a running domain
is left running, as a plain xl domain.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid as uuid_mod
from pathlib import Path
from typing import Any

from xenpbr import domconfig
from xenpbr.domconfig import ConfigError, DomainConfig
from xenpbr.errors import XenpbrError
from xenpbr.state import StateDir
from xenpbr.xl import commands as xl
from xenpbr.xl.errors import XlMissing

log = logging.getLogger(__name__)


class AlreadyRegistered(XenpbrError):
    """``xenpbr create`` of a name xenpbr manages already, without ``--update``."""


def validate(path: Path) -> tuple[DomainConfig, dict[str, str]]:
    """The parsed config and its disk policies, or the first :class:`ConfigError`
    (grammar, unknown ``xenpbr_*`` key, missing disk policy, bad uuid)."""
    config = domconfig.load(path)
    policies = domconfig.require_disk_policies(config)
    domconfig.config_uuid(config)
    config.name  # noqa: B018  (a config without a name is an error here, not in xl)
    return config, policies


def actions(config: DomainConfig) -> dict[str, str]:
    """What the operator asked for on a crash and a watchdog (xl's defaults if unset)."""
    return {key: str(config.settings.get(key, "destroy")) for key in domconfig.ACTION_KEYS}


def check(path: Path) -> dict[str, Any]:
    """Validate ``path`` without acting; the report ``xenpbr check`` prints.

    ``valid`` is False with ``errors`` for a config xenpbr or xl refuses; a missing xl
    raises :class:`XlMissing` (the check could not be made)."""
    try:
        config, policies = validate(path)
    except ConfigError as exc:  # the same keys as a valid report: scripts read one shape
        return {"config": str(path), "name": None, "actions": None, "disk_policies": None,
                "uuid": None, "translated_config": None, "xl_dry_run_ok": None,
                "valid": False, "errors": [str(exc)]}
    translated = _write_translated(config)
    proc = xl.dry_run_create(translated)
    report: dict[str, Any] = {
        "config": str(path), "name": config.name, "actions": actions(config),
        "disk_policies": policies, "uuid": domconfig.config_uuid(config),
        "translated_config": str(translated), "xl_dry_run_ok": proc.returncode == 0,
        "valid": proc.returncode == 0, "errors": []}
    if proc.returncode != 0:
        report["errors"] = [str(xl.failure(f"xl -N create {translated}", proc,
                                           "fix the config and check again"))]
    return report


def _write_translated(config: DomainConfig) -> Path:
    """The config xl would be given, in a file of its own (kept for the operator to
    read; the report names it)."""
    fd, name = tempfile.mkstemp(prefix=f"xenpbr-check-{config.name}-", suffix=".cfg")
    with os.fdopen(fd, "w") as f:
        f.write(domconfig.render(config.for_xl()))
    return Path(name)


def create(path: Path, state: StateDir, paused: bool = False,
           update: bool = False) -> dict[str, Any]:
    """Register and ``xl create`` the domain of ``path`` (see the module docstring)."""
    config, policies = validate(path)
    name = config.name
    previous = state.registration_files(name)
    if previous is not None and not update:
        raise AlreadyRegistered(
            f"{name} is already registered with xenpbr; to replace its settings run "
            f"`xenpbr create --update {path}` (keeps its images whose fingerprint still "
            f"matches), or `xenpbr unregister {name}` first")
    uuid = (domconfig.config_uuid(config) or (state.registered_uuid(name) if update else None)
            or str(uuid_mod.uuid4()))
    config = DomainConfig(config.path, {**config.settings, "uuid": uuid})
    state.register(name, config.settings, domconfig.render(config.for_xl()),
                   str(path.resolve()), uuid=uuid)
    xl_cfg = state.xl_config_path(name)
    try:
        proc = xl.create(xl_cfg, paused)
    except XlMissing:
        state.restore_registration(name, previous)
        raise
    if proc.returncode != 0:
        state.restore_registration(name, previous)
        kept = "the previous registration is kept" if previous else "nothing was registered"
        raise xl.failure(f"xl create {xl_cfg}", proc, kept)
    return {"name": name, "uuid": uuid, "xl_config": str(xl_cfg), "updated": update and
            previous is not None, **actions(config), "disk_policies": policies}


def unregister(state: StateDir, name: str) -> dict[str, Any]:
    """Stop managing ``name`` (images, snapshots, hot streams, state, published keys),
    under the domain's lock so no capture or recovery is half-way through."""
    from xenpbr.resurrection.vault import Vault
    from xenpbr.state import domain_lock
    state.load_record(name)  # UnknownDomain before anything is touched
    with domain_lock(state, name):
        dropped = _drop_images(state, name)
        resurrected = Vault.in_state(state.root).forget(name)
        state.unregister(name)
    return {"name": name, "images_dropped": dropped, "resurrected_dropped": resurrected,
            "unpublished": _unpublish(name), "domid": running_domid(name)}


def _drop_images(state: StateDir, name: str) -> int:
    """Delete every image of ``name`` with its disk snapshots and hot streams, and
    leftovers of interrupted captures; return how many images there were."""
    from xenpbr.images import disks, hotcache
    from xenpbr.images.errors import ImageNotFound
    from xenpbr.images.store import ImageStore
    store = ImageStore(state.images_root)
    entries = store.scan(name)
    for entry in entries:
        try:
            store.delete(name, entry.image_id)
        except ImageNotFound:
            continue
    snapshots = store.root / "disks" / name
    for leftover in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
        disks.remove(store, name, leftover.name)
    hotcache.drop(store, name)
    for folder in (snapshots, hotcache.domain_dir(store, name), store.domain_dir(name)):
        shutil.rmtree(folder, ignore_errors=True)
    store.set_quota(name, None)
    return len(entries)


def _unpublish(name: str) -> bool:
    """Remove /xenpbr/domains/<name> (best effort: outside dom0 there is no xenstore)."""
    from xenpbr import publish
    from xenpbr.xenstore import NoSuchKey, XenstoreClient
    try:
        with XenstoreClient() as xs:
            xs.rm(publish.domain_root(name))
    except NoSuchKey:
        return True  # never published (xenpbrd was not running): nothing to remove
    except (XenpbrError, OSError) as exc:
        log.debug("%s: published keys not removed: %s", name, exc)
        return False
    return True


def running_domid(name: str) -> int | None:
    """The domid of a domain called ``name`` (None if there is none, or no xl)."""
    try:
        proc = xl.run(["domid", name])
    except XlMissing:
        return None
    text = proc.stdout.strip()
    return int(text) if proc.returncode == 0 and text.isdigit() else None
