"""Where the image store keeps what: the paths of its files and folders, nothing else.

Layout (formats in ``docs/images.md``)::

    <root>/FORMAT                          "xenpbr-image-store 1"
    <root>/lock                            flock: shared = capture/restore, exclusive = GC
    <root>/quotas.json                     per-domain quotas (atomic rewrite)
    <root>/packs/<id>.pack, <id>.idx       the page store (:mod:`.pagestore`)
    <root>/images/<domain>/<image>.manifest  one per image (:mod:`.manifest`)
    <root>/images/<domain>/<image>.invalid   why an image must not be used (JSON)
    <root>/disks/<domain>/<image>/           its disk snapshots (:mod:`.disks`)
    <root>/hot/<domain>/<image>.stream       the newest image's stream (:mod:`.hotcache`;
                                             ``[hot-stream] dir`` moves it elsewhere)

Why a module of its own: the store (:mod:`.store`) and its helpers (disk snapshots,
hot streams, GC, scrub, the capture writer) all need these paths. Kept here, every
one of them imports the layout instead of the store, and the store composes the
helpers without any of them importing it back. No I/O policy lives here: listing
what exists is all it reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from xenpbr import settings
from xenpbr.images import manifest
from xenpbr.images.image import check_image_id, check_name

INVALID_SUFFIX = ".invalid"


@dataclass(frozen=True)
class StoreLayout:
    """The paths of the image store rooted at ``root`` (nothing is created here)."""

    root: Path

    @property
    def format_path(self) -> Path:
        return self.root / "FORMAT"

    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    @property
    def quotas_path(self) -> Path:
        return self.root / "quotas.json"

    @property
    def packs_dir(self) -> Path:
        return self.root / "packs"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def disks_dir(self) -> Path:
        return self.root / "disks"

    def domain_dir(self, domain: str) -> Path:
        """The folder of a domain's manifests."""
        return self.images_dir / check_name(domain, "domain")

    def manifest_path(self, domain: str, image_id: str) -> Path:
        return self.domain_dir(domain) / f"{check_image_id(image_id)}{manifest.SUFFIX}"

    def invalid_path(self, domain: str, image_id: str) -> Path:
        """The marker that says an image failed verification (JSON: reason, time)."""
        return self.domain_dir(domain) / f"{check_image_id(image_id)}{INVALID_SUFFIX}"

    def manifest_paths(self) -> Iterator[Path]:
        """Every published manifest of every domain."""
        for d in sorted(p for p in self.images_dir.iterdir() if p.is_dir()):
            yield from sorted(d.glob(f"*{manifest.SUFFIX}"))

    def domain_manifests(self, domain: str) -> list[Path]:
        """The domain's published manifests, oldest first."""
        d = self.domain_dir(domain)
        return sorted(d.glob(f"*{manifest.SUFFIX}")) if d.is_dir() else []

    def domains(self) -> list[str]:
        """Domains with at least one manifest."""
        return sorted(d.name for d in self.images_dir.iterdir()
                      if d.is_dir() and any(d.glob(f"*{manifest.SUFFIX}")))

    def disk_domain_dir(self, domain: str) -> Path:
        """The folder of all disk snapshots of a domain."""
        return self.disks_dir / check_name(domain, "domain")

    def disk_image_dir(self, domain: str, image_id: str) -> Path:
        """The folder of one image's disk snapshots."""
        return self.disk_domain_dir(domain) / check_image_id(image_id)

    def hot_root(self) -> Path:
        """The folder of all hot streams: ``[hot-stream] dir``, else ``<root>/hot``."""
        return settings.current().hot_root(self.root)


class HasLayout(Protocol):
    """What a helper needs to find the store's files: its layout (an ``ImageStore``)."""

    @property
    def layout(self) -> StoreLayout: ...
