"""The xenpbr lab: real Xen 4.17 booted in QEMU (TCG) from Debian packages.

Everything xenpbr claims is shown on real Xen. This package builds the boot artefacts
(`build`), boots Xen with a PV dom0 in QEMU (`host`), talks to dom0 over a virtio-serial
control channel (`channel`, `wire`, `ctl_server`) and drives domains with xl (`xl`).
The same code backs the pytest fixtures in ``tests/lab`` and ``make demo``.
"""
