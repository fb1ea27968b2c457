"""``python3 -m xenpbr_agent`` is ``xenpbr-agent`` (for guests without the console script)."""

import sys

from xenpbr_agent.cli import main

sys.exit(main())
