"""Resolve kernel module dependencies straight from the .ko files.

Debian's kernel package ships no modules.dep (depmod runs at install time), so each
module's ``depends=`` entry is read from its ``.modinfo`` strings and the requested
modules are returned dependencies-first, ready for a plain ``insmod`` loop at boot.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import PackageError

_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def _normalise(name: str) -> str:
    return name.replace("-", "_")


def module_index(modules_root: Path) -> dict[str, Path]:
    """Map each module's normalised name to its .ko file under ``modules_root``."""
    index = {}
    for ko in modules_root.rglob("*.ko"):
        index[_normalise(ko.stem)] = ko
    return index


def module_depends(ko: Path) -> list[str]:
    """The modules ``ko`` declares it needs (from its modinfo strings)."""
    match = _DEPENDS.search(ko.read_bytes())
    if not match or not match.group(1):
        return []
    return [_normalise(d) for d in match.group(1).decode().split(",") if d]


def load_order(wanted: list[str], modules_root: Path) -> list[Path]:
    """The .ko files for ``wanted`` and their dependencies, dependencies first."""
    index = module_index(modules_root)
    order: list[Path] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = _normalise(name)
        ko = index.get(name)
        if ko is None:
            raise PackageError(f"kernel module {name} not found under {modules_root}")
        if ko in order or name in visiting:
            return
        visiting.add(name)
        for dep in module_depends(ko):
            visit(dep)
        order.append(ko)

    for name in wanted:
        visit(name)
    return order
