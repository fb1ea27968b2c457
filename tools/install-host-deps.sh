#!/usr/bin/env bash
# Install what the xenpbr lab needs on a Debian 12 host (as root). Idempotent and quick
# when everything is present: apt-get update runs only if a package is missing or apt
# does not know the Xen packages yet.
#
#   tools/install-host-deps.sh         the lab's packages (make lab, test, demo, bench)
#   tools/install-host-deps.sh --deb   Debian's packaging tools instead (make deb)
#   tools/install-host-deps.sh --debian  the Debian dom0's builders instead (make test-debian)
set -euo pipefail

# systemd: systemd-analyze verifies the xenpbrd unit in the unit tests
# gcc, zlib1g-dev: the unit tests compile the C resurrection example (guest-agent/examples)
# gcc (gcc-12), make, libelf1 (objtool): the lab builds LKDTM for the guest kernel
# (xenpbr_lab/lkdtm.py; binutils comes with gcc)
PACKAGES=(qemu-system-x86 e2fsprogs python3-venv python3-pip systemd gcc zlib1g-dev make libelf1)
# make deb: debhelper + dh-python (pybuild) build debian/, lintian checks the result.
DEB_PACKAGES=(build-essential debhelper dh-python python3-all python3-setuptools
              pybuild-plugin-pyproject python3-wheel fakeroot lintian)
# make test-debian: mmdebstrap builds the Debian dom0's root, qemu-img its session overlay.
DEBIAN_PACKAGES=(mmdebstrap qemu-utils)

case "${1:-}" in
    "") ;;
    --deb) PACKAGES=("${DEB_PACKAGES[@]}") ;;
    --debian) PACKAGES=("${DEBIAN_PACKAGES[@]}") ;;
    *) echo "usage: $0 [--deb|--debian]" >&2; exit 2 ;;
esac

if [[ $(id -u) -ne 0 ]]; then
    echo "install-host-deps: must run as root (it installs Debian packages)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "install-host-deps: apt-get not found; the lab needs a Debian 12 host" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done

if (( ${#missing[@]} )) || ! apt-cache show xen-hypervisor-4.17-amd64 >/dev/null 2>&1; then
    echo "install-host-deps: apt-get update" >&2
    apt-get update -qq
fi
if (( ${#missing[@]} )); then
    echo "install-host-deps: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
echo "install-host-deps: host ready" >&2
