"""Fault injection into a running guest kernel, from dom0 (``xenpbr inject``).

Phase-based reboot is only as good as the faults it survives, and ``sysrq c`` is the
gentlest one there is. This package alters a guest kernel from outside, the way the
paper's Rio/Nooks-style injector did, so recovery is tested against crashes that come
late, hangs, and damage that shows nowhere:

* :mod:`.symbols` - the guest kernel's ``System.map``: where each function starts and ends;
* :mod:`.kernel_memory` - guest-virtual reads and writes through the guest's own page
  tables (a PV guest's entries hold machine frames, reached by foreign mapping);
* :mod:`.decode` - instruction boundaries and operand fields, by Capstone;
* :mod:`.kinds` - each fault kind picks its target and its new bytes (pure: tests drive
  them over synthetic memory);
* :mod:`.inject` - the refusals, the pause, the write, the read-back and the record.
"""
