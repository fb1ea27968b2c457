"""The guest-protocol package's layering: the wire format loads no dom0 or Xen code.

The guest agent ships a private copy of exactly the xenpbr modules it imports
(debian/xenpbr-agent.install), so ``xenpbr.guestproto.wire``, ``.request`` and
``.invalidation`` must not pull in the xenstore client, the ctypes bindings or dom0's
side of the protocol. Each check runs in a fresh interpreter: this test process has long
imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WIRE_MODULES = ("xenpbr.guestproto.wire", "xenpbr.guestproto.request",
                "xenpbr.guestproto.invalidation", "xenpbr.guestproto.resurrection",
                "xenpbr.guestproto.resurrection_delivery", "xenpbr.guestproto.provoke",
                "xenpbr.guestproto.reach")
DOM0_ONLY = ("xenpbr.xenstore", "xenpbr.ctypes_libxc", "xenpbr.guestproto.control",
             "xenpbr.guestproto.gate", "xenpbr.daemon", "xenpbr.resurrection.extract",
             "xenpbr.hypervisor")


def loaded_after(code: str) -> list[str]:
    """The ``xenpbr*`` modules a fresh interpreter holds after running ``code``."""
    probe = code + ("\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules "
                    "if m.split('.')[0] in ('xenpbr', 'xenpbr_agent'))))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def dom0_only(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == d or m.startswith(d + ".") for d in DOM0_ONLY)]


def test_the_wire_modules_import_no_xenstore_or_xen_code() -> None:
    for module in WIRE_MODULES:
        loaded = loaded_after(f"import {module}")
        assert module in loaded
        assert not dom0_only(loaded), (module, dom0_only(loaded))


def test_the_agent_imports_only_the_wire_modules_of_guestproto() -> None:
    loaded = loaded_after("import importlib, pkgutil, xenpbr_agent\n"
                          "for m in pkgutil.walk_packages(xenpbr_agent.__path__, "
                          "'xenpbr_agent.'):\n"
                          "    if not m.name.endswith('__main__'):\n"
                          "        importlib.import_module(m.name)")
    guestproto = {m for m in loaded if m.startswith("xenpbr.guestproto.")}
    assert guestproto == set(WIRE_MODULES)
    assert not {"xenpbr.protocol", "xenpbr.invalidation"} & set(loaded)
