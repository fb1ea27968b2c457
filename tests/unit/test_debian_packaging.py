"""Cheap invariants of the Debian packaging (debian/, man/), checked without building.

`make deb` (tools/build-deb.sh) builds the packages and runs lintian; these tests keep
the sources it builds from consistent with the code: the control file's packages and
dependencies, the man pages against the parsers and docs/settings.md, the unit the
package installs, and the agent's private copy of xenpbr's modules.
"""

from __future__ import annotations

import argparse
import ast
import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEBIAN = ROOT / "debian"
MAN = ROOT / "man"


def stanzas(path: Path) -> list[dict[str, str]]:
    """deb822 paragraphs (debian/control) as {field: value}, continuation lines joined."""
    result = []
    for block in re.split(r"\n\s*\n", path.read_text()):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and last:
                fields[last] += "\n" + line.strip()
            elif ":" in line:
                last, value = line.split(":", 1)
                fields[last] = value.strip()
        if fields:
            result.append(fields)
    return result


def depends(package: str) -> list[str]:
    binary = {s["Package"]: s for s in stanzas(DEBIAN / "control") if "Package" in s}
    return [d.strip() for d in binary[package]["Depends"].replace("\n", " ").split(",")
            if d.strip()]


def man_text(name: str) -> str:
    """A man page's source with the roff escapes that matter here undone."""
    text = (MAN / name).read_text()
    text = text.replace("\\-", "-").replace("\\c", "").replace("\\&", "")
    return re.sub(r"\\f[BIRP]", "", text)


def section(text: str, title: str) -> str:
    match = re.search(rf"^\.SH {re.escape(title)}\n(.*?)(?=^\.SH |\Z)", text, re.S | re.M)
    assert match, f"no .SH {title}"
    return match.group(1)


def tagged_words(text: str) -> set[str]:
    """The first word of each .TP paragraph's tag (the commands of a COMMANDS section)."""
    lines = text.splitlines()
    words = set()
    for i, line in enumerate(lines[:-1]):
        if line.strip() == ".TP":
            tag = re.sub(r"^\.[A-Z]+ ", "", lines[i + 1])
            words.add(tag.split()[0].strip('"'))
    return words


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = {o for a in parser._actions for o in a.option_strings}
    for sub in subcommands(parser).values():
        found |= option_strings(sub)
    return found


def settings_keys() -> list[tuple[str, str, str]]:
    """([section], key, environment variable) of docs/settings.md's Keys table."""
    rows = re.findall(r"^\| `(\[[a-z-]+\])` \| `([a-z_]+)` \|[^|]*\|[^|]*\| `([A-Z_]+)` \|",
                      (ROOT / "docs" / "settings.md").read_text(), re.M)
    assert len(rows) >= 6, rows
    return rows


# --- debian/control, debian/changelog ---------------------------------------------------

def test_control_names_both_packages_and_their_depends():
    names = [s.get("Package") for s in stanzas(DEBIAN / "control") if "Package" in s]
    assert names == ["xenpbr", "xenpbr-agent"]
    dom0 = {d.split()[0] for d in depends("xenpbr")}
    # python3-construct from Debian; Xen 4.17's xl/xenstored and the three libraries
    # xenpbr's ctypes bindings load by soname (libxenctrl.so.4.17 is in libxenmisc4.17)
    assert {"python3-construct", "xen-utils-4.17", "libxenmisc4.17", "libxenforeignmemory1",
            "libxenstore4", "${python3:Depends}"} <= dom0
    agent = depends("xenpbr-agent")
    assert "python3 (>= 3.9)" in agent and "libxenstore4" in agent
    assert not any(d.split()[0] == "xenpbr" for d in agent), "a guest needs no dom0 package"


def test_changelog_version_is_the_package_version():
    from xenpbr import __version__
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"xenpbr ({__version__}) "), first


# --- man pages ---------------------------------------------------------------------------

def test_every_listed_man_page_exists():
    listed = []
    for path in DEBIAN.glob("*.manpages"):
        listed += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    assert sorted(Path(p).name for p in listed) == sorted(
        ["xenpbr.8", "xenpbrd.8", "xenpbr.conf.5", "xenpbr-agent.8"])
    for page in listed:
        assert (ROOT / page).is_file(), page


def test_xenpbr_8_documents_every_subcommand_option_and_exit_code():
    from xenpbr import cli
    parser = cli.build_parser()
    text = man_text("xenpbr.8")
    assert tagged_words(section(text, "COMMANDS")) == set(subcommands(parser))
    for option in option_strings(parser):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
    codes = section(text, "EXIT STATUS")
    for code in (cli.EXIT_OK, cli.EXIT_FAILURE, cli.EXIT_USAGE, cli.EXIT_PIPE):
        assert f".B {code}\n" in codes, code


def test_xenpbrd_8_documents_every_option():
    from xenpbr import xenpbrd
    text = man_text("xenpbrd.8")
    for option in option_strings(xenpbrd.build_parser()):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
    assert {".B 0", ".B 1", ".B 2"} <= set(section(text, "EXIT STATUS").splitlines())


def test_xenpbr_agent_8_documents_every_subcommand_and_option():
    from xenpbr_agent import cli
    parser = cli._parser()
    text = man_text("xenpbr-agent.8")
    assert tagged_words(section(text, "COMMANDS")) == set(subcommands(parser))
    for option in option_strings(parser):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
    assert {f".B {code}" for code in (0, 2, 3, 4, 5)} <= set(
        section(text, "EXIT STATUS").splitlines())


def test_xenpbr_conf_5_documents_every_setting():
    text = man_text("xenpbr.conf.5")
    keys = section(text, "KEYS")
    for sect, key, env in settings_keys():
        assert f".B {sect} {key}\n" in keys, f"{sect} {key}"
        assert env in keys, env
    for page in ("xenpbr.8", "xenpbrd.8", "xenpbr.conf.5"):
        env = section(man_text(page), "ENVIRONMENT")
        for name in ["XENPBR_CONFIG"] + [e for _, _, e in settings_keys()]:
            assert name in env, (page, name)


# --- the unit file -----------------------------------------------------------------------

def test_packaged_unit_runs_usr_bin_xenpbrd(tmp_path):
    """Run debian/rules' own rule that derives the packaged unit from hooks/."""
    if not shutil.which("make"):
        pytest.skip("no make")
    (tmp_path / "debian").mkdir()
    (tmp_path / "hooks").mkdir()
    shutil.copy(DEBIAN / "rules", tmp_path / "debian" / "rules")
    shutil.copy(ROOT / "hooks" / "xenpbrd.service", tmp_path / "hooks")
    subprocess.run(["make", "-s", "-f", "debian/rules", "debian/generated/xenpbrd.service"],
                   cwd=tmp_path, check=True, capture_output=True)
    unit = (tmp_path / "debian" / "generated" / "xenpbrd.service").read_text().splitlines()
    assert [line for line in unit if line.startswith("ExecStart=")] == [
        "ExecStart=/usr/bin/xenpbrd"]
    original = (ROOT / "hooks" / "xenpbrd.service").read_text().splitlines()
    assert len(unit) == len(original)
    changed = [b.split("=")[0] for a, b in zip(original, unit) if a != b and b[:1] != "#"]
    assert changed == ["Documentation", "ExecStart"]
    install = (DEBIAN / "xenpbr.install").read_text().split("\n")
    assert "debian/generated/xenpbrd.service lib/systemd/system" in install


# --- what each package ships -------------------------------------------------------------

def install_lines(package: str) -> list[tuple[str, str]]:
    lines = (DEBIAN / f"{package}.install").read_text().splitlines()
    return [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]


def test_neither_package_ships_the_lab_or_tests():
    not_installed = (DEBIAN / "not-installed").read_text().split()
    assert "usr/lib/python3*/dist-packages/xenpbr_lab" in not_installed
    assert "usr/bin/xenpbr-lab" in not_installed
    for package in ("xenpbr", "xenpbr-agent"):
        for entry in install_lines(package):
            assert "xenpbr_lab" not in entry[0] and not entry[0].startswith("tests"), entry


def test_agent_private_copy_imports_alone(tmp_path):
    """The files debian/xenpbr-agent.install copies to /usr/lib/xenpbr-agent are all the
    agent imports, directly or not: import every agent module from them alone."""
    lib = tmp_path / "usr/lib/xenpbr-agent"
    for entry in install_lines("xenpbr-agent"):
        source, dest = entry
        if not dest.startswith("usr/lib/xenpbr-agent"):
            continue
        matches = glob.glob(str(ROOT / source))
        assert matches, source
        for match in matches:
            target = tmp_path / dest
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(match, target)
    probe = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {str(lib)!r})
import xenpbr_agent
for m in pkgutil.walk_packages(xenpbr_agent.__path__, "xenpbr_agent."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
outside = [k for k, v in sys.modules.items() if k.split(".")[0] in ("xenpbr", "xenpbr_agent")
           and not (getattr(v, "__file__", None) or {str(lib)!r}).startswith({str(lib)!r})]
assert not outside, outside
"""
    done = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _runtime_pep604_unions(path: Path) -> list[int]:
    """Lines with `X | None`-style unions evaluated at run time (outside annotations,
    which `from __future__ import annotations` leaves unevaluated): Python 3.10+."""
    tree = ast.parse(path.read_text())
    in_annotation = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.AnnAssign, ast.arg)) and node.annotation is not None:
            annotations.append(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            annotations.append(node.returns)
        for annotation in annotations:
            in_annotation |= {id(sub) for sub in ast.walk(annotation)}

    def typelike(n: ast.AST) -> bool:
        return ((isinstance(n, ast.Constant) and n.value is None)
                or (isinstance(n, ast.Name) and (n.id in {"int", "str", "float", "bytes",
                                                         "bool", "list", "dict", "tuple"}
                                                 or n.id[:1].isupper()))
                or isinstance(n, ast.Subscript))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr)
            and id(node) not in in_annotation and typelike(node.left) and typelike(node.right)]


def test_agent_files_run_on_python_3_9():
    """xenpbr-agent Depends: python3 (>= 3.9) (Debian 11); vermin checks the rest."""
    found = {}
    for entry in install_lines("xenpbr-agent"):
        for match in glob.glob(str(ROOT / entry[0])):
            if match.endswith(".py") and (lines := _runtime_pep604_unions(Path(match))):
                found[str(Path(match).relative_to(ROOT))] = lines
    assert not found, found
