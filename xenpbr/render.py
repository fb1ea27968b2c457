"""Human tables and machine JSON for the CLI: every command builds rows (dicts) once and
this module prints them either way, so ``--json`` can never drift from the table.

Rows hold typed values (numbers, booleans, None, :class:`datetime` in UTC, lists, dicts):
JSON carries them as they are (times as ISO-8601 with their offset, see
``docs/cli-json.md``) and a column's format function turns them into table text.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO, Union

#: A column: (key, heading) or (key, heading, format function of the typed value).
Column = Union[tuple[str, str], tuple[str, str, Callable[[Any], str]]]


def age(seconds_ago: float | None) -> str:
    """'3m12s'-style age for tables ('-' if unknown)."""
    if seconds_ago is None:
        return "-"
    s = int(max(0, seconds_ago))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def wall_age(wall: float | None) -> str:
    return "-" if wall is None else age(time.time() - wall)


def utc(wall: float | None) -> datetime | None:
    """A wall-clock timestamp as an aware UTC datetime (JSON: ISO-8601 with offset)."""
    return None if wall is None else datetime.fromtimestamp(wall, timezone.utc)


def age_of(when: datetime | None) -> str:
    """Table format of a time: how long ago it was ('-' if unknown)."""
    return "-" if when is None else age(time.time() - when.timestamp())


def local_time(when: datetime | None) -> str:
    """Table format of a time as the operator's local clock reads it."""
    return "-" if when is None else when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def cell(value: Any) -> str:
    """Default table format: '-' for None, yes/no for booleans (never Python's
    ``True``), ``k=v,...`` for dicts, comma-joined lists, ``str`` for the rest."""
    if value is None or value == "" or value == {} or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value)
    if isinstance(value, datetime):
        return local_time(value)
    return str(value)


def _format(column: Column, row: dict[str, Any]) -> str:
    fmt = column[2] if len(column) > 2 else cell
    return fmt(row.get(column[0]))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column],
          out: TextIO | None = None, empty: str = "(none)",
          details: Callable[[dict[str, Any]], Sequence[str]] | None = None) -> None:
    """Print ``rows`` as an aligned table; ``columns`` are (key, heading[, format]).
    ``details(row)`` gives extra lines printed indented under the row (a recovery's
    attempts and skipped images). ``out`` defaults to the *current* sys.stdout (looked up
    per call, so redirection works)."""
    out = out or sys.stdout
    if not rows:
        print(empty, file=out)
        return
    cells = [[_format(c, r) for c in columns] for r in rows]
    widths = [max(len(c[1]), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c[1].upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row, texts in zip(rows, cells):
        print("  ".join(t.ljust(w) for t, w in zip(texts, widths)).rstrip(), file=out)
        for line in (details(row) if details else ()):
            print(f"    {line}", file=out)


def _json_value(value: Any) -> Any:
    """JSON of the few non-JSON types rows hold; anything else is a bug, not a string."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not a typed CLI value: {value!r}")


def emit(data: Any, as_json: bool, human: Callable[[], object],
         out: TextIO | None = None) -> None:
    """JSON of ``data`` if ``as_json``, else call ``human()`` to print a table."""
    out = out or sys.stdout
    if as_json:
        json.dump(data, out, indent=2, sort_keys=True, default=_json_value)
        out.write("\n")
    else:
        human()
