"""Where to find Xen 4.17's own stream tools (verify-stream-v2, xen.migration).

Looked up in ``$XENPBR_TEST_XEN_ROOT`` (tests/conftest.py points it at the lab's unpacked
``xen-utils-4.17``), then a Debian dom0's /usr/lib/xen-4.17.
"""

from __future__ import annotations

import os
from pathlib import Path

CANDIDATES = [os.environ.get("XENPBR_TEST_XEN_ROOT", ""),
              "/usr/lib/xen-4.17"]
XEN_ROOT = next((Path(c) for c in CANDIDATES if c and Path(c, "bin/verify-stream-v2").is_file()),
                Path(CANDIDATES[-1]))
XEN_PY = XEN_ROOT / "lib/python"
VERIFY = XEN_ROOT / "bin/verify-stream-v2"
AVAILABLE = (XEN_PY / "xen/migration/verify.py").is_file() and VERIFY.is_file()
MISSING_REASON = (f"Xen 4.17 verify-stream-v2 and its python package not found under {XEN_ROOT} "
                  "(unpack the xen-utils-4.17 .deb there, or set XENPBR_TEST_XEN_ROOT to a "
                  "usr/lib/xen-4.17 directory)")
