#!/usr/bin/env bash
# make deb: build the xenpbr (dom0) and xenpbr-agent (guest) Debian packages from this
# tree with Debian's tooling (debhelper, dh-python/pybuild; debian/), check what they
# contain, run lintian (fails on errors) and leave the .debs in build/deb/.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's own python3 and tools: a python3 earlier on PATH (pyenv, a virtualenv) lacks
# the Debian build modules and would make pybuild build for the wrong interpreter.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

out=build/deb
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' xenpbr/__init__.py)
changelog=$(dpkg-parsechangelog -S Version)
if [[ $version != "$changelog" ]]; then
    echo "make deb: xenpbr/__init__.py says $version but debian/changelog $changelog:" \
         "add a changelog entry (dch -v $version)" >&2
    exit 1
fi

# Build from a copy of the tree (what git tracks or would track, as it is on disk), so
# dpkg-buildpackage's ../ outputs land in build/deb/ and the tree stays clean.
rm -rf "$out"
src="$out/xenpbr-$version"
mkdir -p "$src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$src"
else
    tar --exclude=./build --exclude=./.venv --exclude=./lab-artifacts --exclude=./.tox \
        --exclude='*.egg-info' -cf - . | tar -xf - -C "$src"
fi
(cd "$src" && dpkg-buildpackage -b -us -uc)
rm -rf "$src"

dom0=$(ls "$out"/xenpbr_"$version"_*.deb)
agent=$(ls "$out"/xenpbr-agent_"$version"_all.deb)

# What must and must not be inside.
fail=0
check_has() {  # deb path...
    local deb=$1 files; shift
    files=$(dpkg-deb -c "$deb" | awk '{print $6}')
    for p in "$@"; do
        grep -qx "\./${p#/}" <<<"$files" \
            || { echo "make deb: $(basename "$deb") lacks $p" >&2; fail=1; }
    done
}
check_has "$dom0" /usr/bin/xenpbr /usr/bin/xenpbrd /etc/xenpbr/xenpbr.conf \
    /lib/systemd/system/xenpbrd.service /usr/share/man/man8/xenpbr.8.gz \
    /usr/share/man/man8/xenpbrd.8.gz /usr/share/man/man5/xenpbr.conf.5.gz \
    /usr/lib/python3/dist-packages/xenpbr/cli.py
check_has "$agent" /usr/bin/xenpbr-agent /lib/systemd/system/xenpbr-phase@.service \
    /usr/share/man/man8/xenpbr-agent.8.gz /usr/lib/xenpbr-agent/xenpbr_agent/cli.py \
    /usr/share/doc/xenpbr-agent/examples/example-3-phase.conf
for deb in "$dom0" "$agent"; do
    if dpkg-deb -c "$deb" | grep -E 'xenpbr_lab|/tests?/'; then
        echo "make deb: $(basename "$deb") ships the lab or tests (above)" >&2; fail=1
    fi
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$dom0" "$tmp/dom0"
grep -qx 'ExecStart=/usr/bin/xenpbrd' "$tmp/dom0/lib/systemd/system/xenpbrd.service" \
    || { echo "make deb: xenpbrd.service does not run /usr/bin/xenpbrd" >&2; fail=1; }
# The agent's private copy is complete: every agent module imports from it alone.
dpkg-deb -x "$agent" "$tmp/agent"
python3 -I - "$tmp/agent/usr/lib/xenpbr-agent" <<'PY' || fail=1
import importlib, pkgutil, sys
root = sys.argv[1]
sys.path.insert(0, root)
import xenpbr_agent
for m in pkgutil.walk_packages(xenpbr_agent.__path__, "xenpbr_agent."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
outside = [k for k, v in sys.modules.items() if k.split(".")[0] in ("xenpbr", "xenpbr_agent")
           and not (getattr(v, "__file__", None) or root).startswith(root)]
if outside:
    sys.exit(f"make deb: the agent imported {outside} from outside its package")
print(f"make deb: the agent imports from {root} alone")
PY
(( fail == 0 )) || exit 1

echo "make deb: lintian" >&2
lintian --fail-on error --display-info --info "$out"/xenpbr_"$version"_*.changes
ls -l "$out"/*.deb
