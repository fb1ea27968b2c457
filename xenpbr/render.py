"""Human tables and machine JSON for the CLI: every command builds rows (dicts) once and
this module prints them either way, so ``--json`` can never drift from the table."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Sequence, TextIO


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


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
          out: TextIO | None = None, empty: str = "(none)") -> None:
    """Print ``rows`` as an aligned table; ``columns`` are (key, heading) pairs.
    ``out`` defaults to the *current* sys.stdout (looked up per call, so redirection
    works)."""
    out = out or sys.stdout
    if not rows:
        print(empty, file=out)
        return
    cells = [[("-" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.upper().ljust(w) for (_, h), w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def emit(data: Any, as_json: bool, human: Any, out: TextIO | None = None) -> None:
    """JSON of ``data`` if ``as_json``, else call ``human()`` to print a table."""
    out = out or sys.stdout
    if as_json:
        json.dump(data, out, indent=2, sort_keys=True, default=str)
        out.write("\n")
    else:
        human()
