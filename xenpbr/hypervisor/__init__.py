"""The hypervisor interface xenpbr codes against (see ``docs/hypervisor.md``).

* :class:`Hypervisor` -- the abstract interface; :class:`DomainState` and
  :class:`VcpuRegisters` -- its frozen value types;
* :class:`~xenpbr.hypervisor.libxc.LibxcHypervisor` -- over libxenctrl and
  libxenforeignmemory, for dom0 (imported lazily: ``from xenpbr.hypervisor.libxc import
  LibxcHypervisor``; importing it loads no library either);
* :class:`~xenpbr.hypervisor.fake.FakeHypervisor` -- in memory, for unit tests.

Importing this package loads no C library.
"""

from xenpbr.hypervisor.guest_memory import (
    GuestMemoryError,
    NotPVGuest,
    P2MError,
    P2MInconsistent,
    P2MUnavailable,
    PfnNotPresent,
    UnsupportedGuest,
)
from xenpbr.hypervisor.base import (
    CONTROL_DOMID,
    ControlDomainRefused,
    DomainNotFound,
    DomainState,
    Hypervisor,
    HypervisorError,
    NoSuchVcpu,
    NotPaused,
    PauseLimitReached,
    ShutdownReason,
    VcpuContextRejected,
    VcpuFlags,
    VcpuNotInitialised,
    VcpuRegisters,
    XenCallError,
)

__all__ = [
    "CONTROL_DOMID",
    "ControlDomainRefused",
    "DomainNotFound",
    "DomainState",
    "GuestMemoryError",
    "Hypervisor",
    "HypervisorError",
    "NoSuchVcpu",
    "NotPVGuest",
    "NotPaused",
    "P2MError",
    "P2MInconsistent",
    "P2MUnavailable",
    "PauseLimitReached",
    "PfnNotPresent",
    "ShutdownReason",
    "UnsupportedGuest",
    "VcpuContextRejected",
    "VcpuFlags",
    "VcpuNotInitialised",
    "VcpuRegisters",
    "XenCallError",
]
