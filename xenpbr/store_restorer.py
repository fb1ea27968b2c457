"""Recovery's :class:`~xenpbr.recovery.Restorer` over the image store and ``xl restore``.

Separate from :mod:`xenpbr.recovery` so the recovery plan stays testable without the
image store, and from :mod:`xenpbr.images` because it is recovery's adapter, not part of
the store: the daemon's phase controller and the CLI's ``xenpbr reboot`` both use it.
"""

from __future__ import annotations

from collections.abc import Callable

from xenpbr.images.store import ImageStore


class StoreRestorer:
    """:class:`~xenpbr.recovery.Restorer` over the image store and ``xl restore``."""

    def __init__(self, store: ImageStore,
                 rename: Callable[[str, str], str | None] | None = None,
                 domid_of: Callable[[str], int | None] | None = None) -> None:
        # a standby's rename and a restored domain's lookup (None: the xl commands)
        self.store, self.rename, self.domid_of = store, rename, domid_of

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
