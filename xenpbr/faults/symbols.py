"""A guest kernel's symbol table (``System.map``), for choosing and naming fault targets.

A Xen PV kernel is entered at ``startup_xen`` and never runs the decompressor that
applies KASLR, so its symbols sit at the addresses ``System.map`` lists; the injector
still checks that on the running guest (``linux_banner`` must read "Linux version")
before it writes anything, because a map from another kernel build would aim every
fault at the wrong bytes.
"""

from __future__ import annotations

import bisect
import random
import re
from dataclasses import dataclass
from pathlib import Path

from xenpbr.errors import XenpbrError

#: ``System.map`` and ``/proc/kallsyms`` lines; kallsyms adds ``\t[module]`` to module
#: symbols, which are skipped (they live in module memory, not the kernel image).
_LINE = re.compile(r"^([0-9a-fA-F]{16}) ([A-Za-z?]) (\S+)(\s+\[\S+\])?$")
#: Debian's linux-image packages ship a one-line placeholder instead of the real map.
_DEBIAN_STUB = "The real System.map is in the linux-image"
TEXT_TYPES = frozenset("Tt")
#: ``.init.text`` is freed once the kernel is up: a fault there would hit whatever
#: reuses the pages, not the function the record names.
INIT_TEXT = ("_sinittext", "_einittext")
#: Section markers, not functions.
MARKERS = frozenset({"_stext", "_etext", "_text", *INIT_TEXT})


class SymbolMapError(XenpbrError):
    """The ``System.map`` is missing, unreadable, or not this kernel's."""


@dataclass(frozen=True)
class Symbol:
    address: int
    kind: str
    name: str
    size: int  # bytes to the next symbol (0 for the last one)


class KernelSymbols:
    """Symbols sorted by address; functions are the text symbols of ``_stext.._etext``
    outside ``.init.text``, each sized to the next symbol."""

    def __init__(self, entries: list[tuple[int, str, str]], source: str) -> None:
        if not entries:
            raise SymbolMapError(f"{source}: no symbols (is it a System.map?)")
        entries = sorted(entries)
        self.source = source
        self._symbols = [Symbol(addr, kind, name, (entries[i + 1][0] - addr)
                                if i + 1 < len(entries) else 0)
                         for i, (addr, kind, name) in enumerate(entries)]
        self._addresses = [s.address for s in self._symbols]
        self._by_name = {s.name: s for s in self._symbols}
        self._functions = self._text_functions()

    @classmethod
    def parse(cls, text: str, source: str = "System.map") -> KernelSymbols:
        if _DEBIAN_STUB in text[:200]:
            raise SymbolMapError(
                f"{source} is Debian's placeholder, not a symbol map: copy the guest's "
                "/proc/kallsyms (read as root in the guest) to dom0 and pass it with "
                "--system-map, or install the kernel's -dbg package")
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            match = _LINE.match(line.strip())
            if match is None:
                if line.strip():
                    raise SymbolMapError(f"{source} line {number} is not "
                                         f"'ADDRESS TYPE NAME': {line[:80]!r}")
                continue
            if match.group(4) is None:
                entries.append((int(match.group(1), 16), match.group(2), match.group(3)))
        return cls(entries, source)

    @classmethod
    def load(cls, path: Path) -> KernelSymbols:
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise SymbolMapError(f"cannot read the guest kernel's System.map {path}: "
                                 f"{exc.strerror}; pass --system-map") from exc
        return cls.parse(text, str(path))

    def address(self, name: str) -> int:
        try:
            return self._by_name[name].address
        except KeyError:
            raise SymbolMapError(f"{self.source} has no symbol {name!r}") from None

    def locate(self, address: int) -> str:
        """``name+0xoffset`` for *address* (``?`` below the first symbol)."""
        index = bisect.bisect_right(self._addresses, address) - 1
        if index < 0:
            return "?"
        symbol = self._symbols[index]
        return f"{symbol.name}+{address - symbol.address:#x}"

    @property
    def functions(self) -> list[Symbol]:
        return self._functions

    def random_function(self, rng: random.Random) -> Symbol:
        return rng.choice(self._functions)

    def _text_functions(self) -> list[Symbol]:
        start, end = self.address("_stext"), self.address("_etext")
        init = tuple(self._by_name[n].address for n in INIT_TEXT if n in self._by_name)
        functions = [s for s in self._symbols
                     if s.kind in TEXT_TYPES and start <= s.address < end and s.size > 0
                     and s.name not in MARKERS
                     and not (len(init) == 2 and init[0] <= s.address < init[1])]
        if not functions:
            raise SymbolMapError(f"{self.source}: no functions between _stext and _etext")
        return functions


def system_map_for(kernel: str) -> Path:
    """The symbol map beside the domain's kernel: ``System.map-V`` for ``vmlinuz-V``
    (Debian's ``/boot`` layout), else ``System.map`` in the same folder."""
    path = Path(kernel)
    version = path.name.split("-", 1)[1] if "-" in path.name else ""
    tried = ([path.with_name(f"System.map-{version}")] if version else []) + [
        path.with_name("System.map")]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise SymbolMapError(f"no symbol map beside the kernel {kernel} (tried "
                         f"{', '.join(map(str, tried))}): copy the guest's /proc/kallsyms "
                         "(read as root in the guest) to dom0 and pass it with --system-map")
