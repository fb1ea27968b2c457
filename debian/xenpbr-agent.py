# xenpbr-agent's Python entry, run by /usr/bin/xenpbr-agent (debian/xenpbr-agent-launcher)
# once it has found a Python that can run the agent; the agent's private copy of its
# modules is beside this file (/usr/lib/xenpbr-agent).
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.argv[0] = "xenpbr-agent"

from xenpbr_agent.cli import main  # noqa: E402

sys.exit(main())
