"""Hot-stream warm-ups: regenerate a new image's stream in the background.

Separate because it is the controller's only background work: one thread per domain
builds the plain-file stream (:mod:`xenpbr.images.hotcache`) a crash would restore
from, and every step that needs dom0's CPU or changes the store cancels it first.
"""

from __future__ import annotations

import logging
import threading

from xenpbr.controller.context import DomainContext
from xenpbr.images import hotcache
from xenpbr.images.store import ImageStore
from xenpbr.state import StateDir

log = logging.getLogger(__name__)


class WarmUps:
    """The warm-up thread of each domain, and its cancellation."""

    def __init__(self, state: StateDir, store: ImageStore) -> None:
        self.state, self.store = state, store
        self.enabled = hotcache.enabled()
        self._warming: dict[str, threading.Event] = {}  # name -> cancel its warm-up

    def warm_up(self, ctx: DomainContext, image_id: str) -> None:
        """Regenerate the new image's stream in the background (:mod:`hotcache`), so a
        crash restores from a plain file; the guest got its ack already."""
        if not self.enabled or not ctx.hot_stream_wanted():
            return
        name = ctx.name
        cancel = self._warming[name] = threading.Event()
        threading.Thread(target=self._work, args=(name, image_id, cancel),
                         name=f"warm-{name}", daemon=True).start()

    def _work(self, name: str, image_id: str, cancel: threading.Event) -> None:
        try:
            hotcache.warm(self.store, name, image_id, cancel)
        except hotcache.Cancelled:
            log.info("%s: warm-up of image %s cancelled", name, image_id)
        except hotcache.NoRoom as exc:
            log.warning("%s: no hot stream for image %s: %s", name, image_id, exc)
        except Exception as exc:  # a cache: the restore falls back to the FIFO
            log.warning("%s: hot stream of image %s not built: %s", name, image_id, exc)

    def warm_newest(self, name: str) -> None:
        """Warm the domain's newest image up if its stream is not ready (after a restart
        of xenpbrd, or a recovery that cancelled the warm-up). The ids come from the
        phase state, not a scan of the store: this runs on the daemon's loop."""
        ctx = DomainContext.load(self.state, name, None)
        ids = [img.image_id for img in ctx.phases.images.values()]
        newest = max(ids, default=None)  # ids start with their UTC creation time
        if newest and not hotcache.path_of(self.store, name, newest).exists():
            self.warm_up(ctx, newest)

    def cancel(self, name: str) -> None:
        """Stop ``name``'s warm-up, if one runs (dom0 needs its CPU, or the store
        changes)."""
        cancel = self._warming.pop(name, None)
        if cancel is not None:
            cancel.set()
