"""xenpbr: phase-based reboot and Otherworld-style resurrection for Xen PV guests."""

__version__ = "0.1.0"
