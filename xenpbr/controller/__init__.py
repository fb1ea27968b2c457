"""The phase controller: xenpbrd's per-domain decisions, one module per step.

docs/design.md draws ``agent -> watcher -> phase controller -> image store -> recovery
-> xl``; this package is that controller. The daemon (:mod:`xenpbr.daemon`) only runs
the event loop and hands each event to :class:`PhaseController`, which loads the
domain's :class:`~xenpbr.controller.context.DomainContext` once and passes it to the
step that decides: a boundary (:mod:`.boundary`), an invalidation (:mod:`.invalidation`),
a guest's status note (:mod:`.health`), a crash (:mod:`.recover`), with the hot-stream
warm-ups (:mod:`.warmup`), adoption by UUID (:mod:`.adoption`), the guests' watches
(:mod:`.watches`) and the published state (:mod:`.publishing`) beside them.
"""

from xenpbr.controller.phase_controller import PhaseController

__all__ = ["PhaseController"]
