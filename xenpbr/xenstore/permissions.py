"""xenstore node permissions: :class:`Access`, :class:`Perm`, :class:`NodePerms`.

Separate because the permission model (xenstored's owner / others / per-domain ACL and
its 2-bit wire encoding, ``XS_PERM_READ``/``XS_PERM_WRITE``) is a value type used by
the client, the fake xenstored and the protocol layer alike, independent of any
connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

from xenpbr.xenstore.errors import XenstoreError
from xenpbr.xenstore.paths import validate_domid

__all__ = ["Access", "NodePerms", "Perm", "to_perm"]


class Access(enum.Enum):
    """Permission of one domain on a node; values are xenstore's letters."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"

    @property
    def bits(self) -> int:
        return _ACCESS_BITS[self]

    @classmethod
    def from_bits(cls, bits: int) -> "Access":
        return _BITS_ACCESS[bits & 0x3]

    @classmethod
    def parse(cls, value: "Access | str | int") -> "Access":
        if isinstance(value, Access):
            return value
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(f"access must be one of n/r/w/b, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
            return cls.from_bits(value)
        raise ValueError(f"access must be an Access, one of n/r/w/b or 0..3, got {value!r}")

    @property
    def can_read(self) -> bool:
        return bool(self.bits & 1)

    @property
    def can_write(self) -> bool:
        return bool(self.bits & 2)


_ACCESS_BITS = {Access.NONE: 0, Access.READ: 1, Access.WRITE: 2, Access.BOTH: 3}
_BITS_ACCESS = {v: k for k, v in _ACCESS_BITS.items()}


@dataclass(frozen=True)
class Perm:
    """One ACL entry: ``domid`` gets ``access``."""

    domid: int
    access: Access

    def __post_init__(self) -> None:
        validate_domid(self.domid)
        object.__setattr__(self, "access", Access.parse(self.access))

    def __str__(self) -> str:  # xenstore-chmod notation, e.g. "r3"
        return f"{self.access.value}{self.domid}"


@dataclass(frozen=True)
class NodePerms:
    """A node's permissions as xenstored keeps them: the owner (full access), what every
    other domain gets, and explicit per-domain entries that override ``others``."""

    owner: int
    others: Access = Access.NONE
    acl: tuple[Perm, ...] = ()

    def __post_init__(self) -> None:
        validate_domid(self.owner)
        object.__setattr__(self, "others", Access.parse(self.others))
        object.__setattr__(self, "acl", tuple(to_perm(p) for p in self.acl))

    def to_wire(self) -> list[tuple[int, int]]:
        return [(self.owner, self.others.bits)] + [(p.domid, p.access.bits) for p in self.acl]

    @classmethod
    def from_wire(cls, pairs: Iterable[tuple[int, int]]) -> "NodePerms":
        pairs = list(pairs)
        if not pairs:
            raise XenstoreError("xenstore returned an empty permission list")
        (owner, others), rest = pairs[0], pairs[1:]
        return cls(owner, Access.from_bits(others),
                   tuple(Perm(d, Access.from_bits(b)) for d, b in rest))

    def access_for(self, domid: int) -> Access:
        """xenstored's ``perm_for_conn`` for an unprivileged domain (dom0 always has
        full access regardless of this)."""
        if domid == self.owner:
            return Access.BOTH
        for p in self.acl:
            if p.domid == domid:
                return p.access
        return self.others

    def __str__(self) -> str:
        return " ".join([f"{self.others.value}{self.owner}"] + [str(p) for p in self.acl])


def to_perm(p: "Perm | tuple[int, Access | str | int]") -> Perm:
    if isinstance(p, Perm):
        return p
    domid, access = p
    return Perm(domid, Access.parse(access))
