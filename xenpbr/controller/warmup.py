"""Warm-ups: prepare a new image for a fast recovery, in the background.

Separate because it is the controller's only background work: one thread per domain
builds the plain-file stream (:mod:`xenpbr.images.hotcache`) a crash would restore
from, then, where the operator asked for it (``xenpbr_standby = 1``), restores the image
paused as a standby domain (:mod:`xenpbr.images.standby`) that a crash only has to
rename and unpause. Every step that needs dom0's CPU or changes the store cancels the
warm-up first and waits for its thread, so no standby is half-built under a recovery.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from xenpbr.controller.context import DomainContext
from xenpbr.images import hotcache, standby
from xenpbr.images.store import ImageStore
from xenpbr.state import StateDir
from xenpbr.xl import commands

log = logging.getLogger(__name__)


class WarmUps:
    """The warm-up thread of each domain, and its cancellation."""

    def __init__(self, state: StateDir, store: ImageStore,
                 xl: Sequence[str] = commands.XL) -> None:
        self.state, self.store, self.xl = state, store, xl
        self.enabled = hotcache.enabled()
        # name -> (cancel its warm-up, its thread)
        self._warming: dict[str, tuple[threading.Event, threading.Thread]] = {}

    def warm_up(self, ctx: DomainContext, image_id: str, *, hot: bool = True,
                with_standby: bool = True) -> None:
        """Regenerate the new image's stream in the background (:mod:`hotcache`), so a
        crash restores from a plain file, then prepare its standby if the domain wants
        one; the guest got its ack already."""
        hot = hot and self.enabled and ctx.hot_stream_wanted()
        wanted = with_standby and ctx.standby_wanted()
        if not hot and not wanted:
            return
        self.cancel(ctx.name)
        cancel = threading.Event()
        thread = threading.Thread(target=self._work, args=(ctx.name, image_id, cancel, hot,
                                                            wanted),
                                  name=f"warm-{ctx.name}", daemon=True)
        self._warming[ctx.name] = (cancel, thread)
        thread.start()

    def _work(self, name: str, image_id: str, cancel: threading.Event, hot: bool,
              wanted: bool) -> None:
        if hot and not self._warm(name, image_id, cancel):
            return
        if wanted and not cancel.is_set():
            self._standby(name, image_id)

    def _warm(self, name: str, image_id: str, cancel: threading.Event) -> bool:
        """Build the hot stream; False if the warm-up was cancelled."""
        try:
            hotcache.warm(self.store, name, image_id, cancel)
        except hotcache.Cancelled:
            log.info("%s: warm-up of image %s cancelled", name, image_id)
            return False
        except hotcache.NoRoom as exc:
            log.warning("%s: no hot stream for image %s: %s", name, image_id, exc)
        except Exception as exc:  # a cache: the restore falls back to the FIFO
            log.warning("%s: hot stream of image %s not built: %s", name, image_id, exc)
        return True

    def _standby(self, name: str, image_id: str) -> None:
        """Restore the image as the domain's standby; a failure costs only speed."""
        try:
            standby.prepare(self.store, self.store.load(name, image_id), self.xl)
        except Exception as exc:  # noqa: BLE001 - recovery restores without a standby
            log.warning("%s: %s", name, exc)

    def warm_newest(self, name: str, *, with_standby: bool = False) -> None:
        """Warm the domain's newest image up if its stream is not ready (after a restart
        of xenpbrd, or a recovery that cancelled the warm-up), and with ``with_standby``
        (the guest runs) prepare its standby if it has none of that image. The ids come
        from the phase state, not a scan of the store: this runs on the daemon's loop."""
        entry = self._warming.get(name)
        if entry is not None and entry[1].is_alive():
            return  # already warming up (a recovery's new domain is adopted after it)
        ctx = DomainContext.load(self.state, name, None)
        ids = [img.image_id for img in ctx.phases.images.values()]
        newest = max(ids, default=None)  # ids start with their UTC creation time
        if newest is None:
            return
        hot = not hotcache.path_of(self.store, name, newest).exists()
        held = standby.load(self.store, name)
        with_standby = with_standby and (held is None or held.image_id != newest)
        self.warm_up(ctx, newest, hot=hot, with_standby=with_standby)

    def cancel(self, name: str) -> None:
        """Stop ``name``'s warm-up, if one runs (dom0 needs its CPU, or the store
        changes), and wait for it: a standby being restored finishes first."""
        entry = self._warming.pop(name, None)
        if entry is not None:
            entry[0].set()
            if entry[1] is not threading.current_thread():
                entry[1].join()

    def discard_standby(self, name: str) -> None:
        """The guest is gone (not replaced by a recovery): so is its standby."""
        self.cancel(name)
        try:
            standby.discard(self.store, name, self.xl)
        except Exception as exc:  # noqa: BLE001 - logged; `xl destroy` by hand
            log.error("%s: standby not discarded: %s", name, exc)
