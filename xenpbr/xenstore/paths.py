"""xenstore path rules: validation, value sizing, domain homes and domids.

Separate because these are pure rules (mirroring Xen 4.17's ``xenstored`` and
``xs_wire.h``) shared by the real client, the in-memory fake and the protocol layer,
none of which should need a connection to check a path:

* a path is absolute (``/...``) or relative to the domain's home
  (``/local/domain/<domid>``); characters ``[A-Za-z0-9_/@-]`` only -- xenstored's
  ``valid_chars()`` does **not** accept ``.``; no ``//``, no trailing ``/`` (except
  ``/``), no NUL;
* absolute paths at most 3072 bytes (``XENSTORE_ABS_PATH_MAX``), relative paths at most
  2048 (``XENSTORE_REL_PATH_MAX``), and the part below ``/local/domain/<id>/`` at most
  2048 (xenstored's default path quota);
* ``@introduceDomain`` and ``@releaseDomain`` are accepted only by ``watch``/``unwatch``;
* a request payload (path + NUL + value) is at most 4096 bytes
  (``XENSTORE_PAYLOAD_MAX``), so a value may be up to ``4095 - len(path)`` bytes.
"""

from __future__ import annotations

import re
from typing import Any

from xenpbr.xenstore.errors import InvalidPath, ValueTooLarge

__all__ = [
    "DOMID_FIRST_RESERVED",
    "INTRODUCE_DOMAIN",
    "RELEASE_DOMAIN",
    "SPECIAL_PATHS",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_REL_PATH_MAX",
    "XENSTORED_PATH_QUOTA",
    "canonical_path",
    "domain_home",
    "encode_value",
    "validate_domid",
    "validate_path",
    "validate_token",
]

XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048
#: xenstored's default ``quota_max_path_len`` for the part below ``/local/domain/<id>/``.
XENSTORED_PATH_QUOTA = XENSTORE_REL_PATH_MAX
#: First reserved domid (``DOMID_FIRST_RESERVED``); real domains are below it.
DOMID_FIRST_RESERVED = 0x7FF0

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_PATHS = frozenset({INTRODUCE_DOMAIN, RELEASE_DOMAIN})

_VALID_CHARS = re.compile(r"[A-Za-z0-9_/@\-]+\Z")
_LOCAL_DOMAIN = re.compile(r"/local/domain/[0-9]{1,5}/")


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_path(path: Any, *, allow_special: bool = False) -> str:
    """Return ``path`` if xenstore accepts it, else raise :class:`InvalidPath`.

    ``allow_special`` admits ``@introduceDomain`` / ``@releaseDomain`` (watches only).
    """
    if not isinstance(path, str):
        raise InvalidPath(f"xenstore path must be str, got {type(path).__name__}: {_short(path)}",
                          path=None)
    if not path:
        raise InvalidPath("xenstore path must not be empty", path=path)
    if "\0" in path:
        raise InvalidPath(f"xenstore path {_short(path)} contains a NUL byte", path=path)
    if path.startswith("@"):
        if path in SPECIAL_PATHS:
            if allow_special:
                return path
            raise InvalidPath(f"special path {path!r} can only be watched/unwatched", path=path)
        raise InvalidPath(
            f"xenstore path {_short(path)} starts with '@' but is not one of "
            f"{sorted(SPECIAL_PATHS)}", path=path)
    if not _VALID_CHARS.match(path):
        bad = sorted({c for c in path if not re.match(r"[A-Za-z0-9_/@\-]", c)})
        raise InvalidPath(
            f"xenstore path {_short(path)} contains characters {bad!r}; xenstored accepts "
            "only [A-Za-z0-9_/@-]", path=path)
    if path != "/" and path.endswith("/"):
        raise InvalidPath(f"xenstore path {_short(path)} must not end with '/'", path=path)
    if "//" in path:
        raise InvalidPath(f"xenstore path {_short(path)} contains '//'", path=path)
    n = len(path)  # all accepted characters are ASCII: characters == bytes
    if path.startswith("/"):
        if n > XENSTORE_ABS_PATH_MAX:
            raise InvalidPath(
                f"absolute xenstore path is {n} bytes, maximum is {XENSTORE_ABS_PATH_MAX}: "
                f"{_short(path)}", path=path)
        m = _LOCAL_DOMAIN.match(path)
        if m and n - m.end() > XENSTORED_PATH_QUOTA:
            raise InvalidPath(
                f"xenstore path below {m.group(0)!r} is {n - m.end()} bytes, xenstored's "
                f"limit is {XENSTORED_PATH_QUOTA}: {_short(path)}", path=path)
    elif n > XENSTORE_REL_PATH_MAX:
        raise InvalidPath(
            f"relative xenstore path is {n} bytes, maximum is {XENSTORE_REL_PATH_MAX}: "
            f"{_short(path)}", path=path)
    return path


def validate_token(token: Any, path: str = "") -> str:
    """Return ``token`` if usable as a watch token (non-empty str, no NUL, fits a message)."""
    if not isinstance(token, str):
        raise InvalidPath(f"watch token must be str, got {type(token).__name__}: {_short(token)}")
    if not token:
        raise InvalidPath("watch token must not be empty")
    if "\0" in token:
        raise InvalidPath(f"watch token {_short(token)} contains a NUL byte")
    size = len(path.encode()) + 1 + len(token.encode()) + 1
    if size > XENSTORE_PAYLOAD_MAX:
        raise InvalidPath(
            f"watch path+token need {size} bytes, a xenstore message holds "
            f"{XENSTORE_PAYLOAD_MAX}: token {_short(token)}")
    return token


def encode_value(path: str, value: Any) -> bytes:
    """Return ``value`` as bytes (str is UTF-8 encoded) after checking it fits in one
    ``XS_WRITE`` message together with ``path``; raise :class:`ValueTooLarge` otherwise."""
    if isinstance(value, str):
        data = value.encode("utf-8")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise TypeError(f"xenstore value must be bytes or str, got {type(value).__name__}: "
                        f"{_short(value)}")
    limit = XENSTORE_PAYLOAD_MAX - len(path.encode()) - 1
    if len(data) > limit:
        raise ValueTooLarge(
            f"value for {path!r} is {len(data)} bytes; with this path at most {limit} fit in "
            f"a {XENSTORE_PAYLOAD_MAX}-byte xenstore message: {_short(data)}", path=path)
    return data


def validate_domid(domid: Any) -> int:
    """Return ``domid`` if it can name a real domain (an int below the reserved range)."""
    if isinstance(domid, bool) or not isinstance(domid, int):
        raise TypeError(f"domid must be int, got {type(domid).__name__}: {_short(domid)}")
    if not 0 <= domid < DOMID_FIRST_RESERVED:
        raise ValueError(f"domid {domid} out of range 0..{DOMID_FIRST_RESERVED - 1}")
    return domid


def domain_home(domid: int) -> str:
    """The home directory of ``domid``, where its relative paths resolve."""
    return f"/local/domain/{domid}"


def canonical_path(path: str, domid: int) -> str:
    """Absolute form of a validated path as xenstored resolves it for ``domid``."""
    if path.startswith("/") or path.startswith("@"):
        return path
    return f"{domain_home(domid)}/{path}"
