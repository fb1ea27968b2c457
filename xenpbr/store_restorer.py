"""Recovery's :class:`~xenpbr.recovery.Restorer` over the image store and ``xl restore``.

Separate from :mod:`xenpbr.recovery` so the recovery plan stays testable without the
image store, and from :mod:`xenpbr.images` because it is recovery's adapter, not part of
the store: the daemon's phase controller and the CLI's ``xenpbr reboot`` both use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from xenpbr.images.errors import ImageError
from xenpbr.images.store import ImageStore

log = logging.getLogger(__name__)


class StoreRestorer:
    """:class:`~xenpbr.recovery.Restorer` over the image store and ``xl restore``."""

    def __init__(self, store: ImageStore,
                 rename: Callable[[str, str], str | None] | None = None,
                 domid_of: Callable[[str], int | None] | None = None,
                 free_memory_mib: Callable[[], int | None] | None = None) -> None:
        # a standby's rename, a restored domain's lookup and Xen's free memory (None:
        # the xl commands)
        self.store, self.rename, self.domid_of = store, rename, domid_of
        self.free_memory_mib = free_memory_mib

    def restore(self, domain: str, image_id: str) -> int:
        """Create ``domain`` paused from its stored image ``image_id``; its domid. A
        standby of that image (:mod:`xenpbr.images.standby`) takes over if there is one:
        no memory is copied then."""
        from xenpbr.images import standby
        from xenpbr.images.restore import restore
        taken = standby.take_over(self.store, domain, image_id, rename=self.rename)
        if taken is not None:
            return taken
        # monitor: xl stays behind as for `xl create`, to act on the restored guest's own
        # reboot or poweroff (on_reboot/on_poweroff of the config saved in the image).
        return restore(self.store, self.store.load(domain, image_id), paused=True,
                       monitor=True, domid_of=self.domid_of).domid

    def standby_image(self, domain: str) -> str | None:
        """The image ``domain``'s standby holds (recovery's
        :class:`~xenpbr.recovery.Standbys`), None without one."""
        from xenpbr.images import standby
        held = standby.load(self.store, domain)
        return None if held is None else held.image_id

    def room_beside(self, domain: str, image_id: str) -> bool:
        """True if Xen's free memory holds ``image_id``'s domain and a standby's headroom
        (recovery's :class:`~xenpbr.recovery.Room`): the crashed domain may then wait,
        set aside, until the restored one runs. Any doubt answers False (the crashed
        domain is destroyed first, as without room)."""
        from xenpbr.images import standby
        from xenpbr.xl import commands
        try:
            need = standby.memory_mib(self.store.load(domain, image_id))
        except (ImageError, OSError) as exc:
            log.debug("%s: no room check for image %s (%s)", domain, image_id, exc)
            return False
        free = (self.free_memory_mib or (lambda: commands.free_memory_mib(commands.XL)))()
        room = free is not None and free >= need + standby.HEADROOM_MIB
        log.info("%s: Xen has %s MiB free, image %s needs %d MiB and %d MiB headroom: "
                 "the crashed domain %s", domain, "?" if free is None else free, image_id,
                 need, standby.HEADROOM_MIB,
                 "waits aside until it runs" if room else "goes first")
        return room
