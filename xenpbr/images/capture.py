"""Capture a running domain into the store: ``xl save -c`` (or, live, ``xl migrate`` to
a local recorder: :mod:`xenpbr.xl.migrate`) -> FIFO -> parser -> store.

Nothing of the stream touches the disk except what the store keeps (new pages, the
manifest): xl writes into a FIFO in a private temporary directory, the codec parses
the stream as it arrives, and each page goes straight to the store's writer. ``-c``
leaves the domain running once the save completes.

The guest is suspended while xl writes its pages, so this side must never stop
reading early: if the store refuses the capture (quota) or the stream is rejected,
the rest of the FIFO is drained so xl finishes and resumes the guest, and only then
is the error raised. xl is killed at the deadline (the guest may then stay
suspended: the error says so).

A *live* capture copies memory while the guest runs and suspends it only for the pages
it dirtied meanwhile; the stream then carries those pages more than once (later copies
win), and the image keeps the stream as it came, byte for byte. ``while_paused`` runs
while the guest is still suspended after the last record, before the recorder lets xl
resume it.

Timings (``CaptureResult``): ``total_s`` from xl's start to the manifest being
published; ``paused_s`` is how long the guest was frozen (suspended or paused), measured
by polling the domain's state (``frozen``) every 50 ms; without a probe it is estimated
from the stream: from the last record before the first PAGE_DATA (libxc suspends the
domain just before sending pages, ``send_domain_memory_nonlive`` in Xen 4.17) to xl's
exit (it resumes the domain, then exits), or with ``while_paused`` to our unpause, so it
slightly over-estimates.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenpbr.images.errors import CaptureFailed, ImageError, LiveCaptureUnsupported
from xenpbr.images.image import ImageMeta, check_name
from xenpbr.images.store import ImageStore
from xenpbr.images.writer import CaptureStats, CaptureWriter
from xenpbr.xl import commands, migrate
from xenpbr.xl.errors import XlError
from xenpbr.xl.fifo import XlProcess, open_fifo_reader, wait_for_data
from xenpbr.stream import format as fmt
from xenpbr.stream.codec import Record
from xenpbr.stream.errors import StreamCodecError, StreamError
from xenpbr.stream.reader import read_stream

_LOG = logging.getLogger(__name__)

#: Runs while ``xl save -c -p`` holds the domain paused after a complete save; it gets
#: the id the image will have. If it raises, nothing is stored (the domain is unpaused).
WhilePaused = Callable[[str], object]


@dataclass(frozen=True)
class CaptureProgress:
    """Passed to the progress callback after every PAGE_DATA record (<= 1024 pages)."""

    pages: int
    bytes_read: int
    elapsed_s: float


@dataclass(frozen=True)
class CaptureResult:
    """The stored image and how the capture went (seconds, bytes)."""

    meta: ImageMeta
    stats: CaptureStats
    total_s: float
    connect_s: float  # xl start -> first stream byte
    stream_s: float  # first byte -> end of stream
    paused_s: float | None  # see the module docstring
    commit_s: float  # sealing packs + publishing the manifest
    xl_output: str
    live: bool = False

    @property
    def raw_bytes(self) -> int:
        """Size of the ``xl save`` stream."""
        return self.meta.stream_bytes

    @property
    def new_bytes(self) -> int:
        """Bytes this capture added to the store (new pages; excludes the manifest)."""
        return self.stats.new_bytes

    def to_json(self) -> dict[str, Any]:
        """Flat summary for logs and ``--json``."""
        return {"image_id": self.meta.image_id, "domain": self.meta.domain,
                "phase": self.meta.phase, "raw_bytes": self.raw_bytes,
                "new_bytes": self.new_bytes, "manifest_bytes": self.meta.manifest_bytes,
                "stored_bytes_alone": self.meta.stored_bytes, **self.stats.__dict__,
                "total_s": self.total_s, "connect_s": self.connect_s,
                "stream_s": self.stream_s, "paused_s": self.paused_s,
                "commit_s": self.commit_s, "live": self.live}


class _Timed:
    """File wrapper counting bytes and noting when the first one arrived."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f = f
        self.count = 0
        self.first: float | None = None

    def readinto(self, view: memoryview) -> int:
        n = self.f.readinto(view) or 0
        if n and self.first is None:
            self.first = time.monotonic()
        self.count += n
        return n

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        if data and self.first is None:
            self.first = time.monotonic()
        self.count += len(data)
        return data


class _RecordClock:
    """``on_record`` hook: progress callbacks and the time pages started flowing."""

    def __init__(self, src: _Timed, start: float,
                 progress: Callable[[CaptureProgress], None] | None) -> None:
        self.src, self.start, self.progress = src, start, progress
        self.before_pages: float | None = None
        self.seen_pages = False
        self.pages = 0

    def __call__(self, family: str, record: Record) -> None:
        if family != "libxc":
            return
        if record.rtype != fmt.REC_PAGE_DATA:
            if not self.seen_pages:
                self.before_pages = time.monotonic()
            return
        self.seen_pages = True
        self.pages += record.count  # type: ignore[attr-defined]
        if self.progress is not None:
            self.progress(CaptureProgress(self.pages, self.src.count,
                                          time.monotonic() - self.start))


class _CrashGuard(threading.Thread):
    """Kills ``xl save`` when the domain crashes under it: xl would otherwise wait for a
    suspend that never comes (60 s, seen in the lab) before failing, and the crashed
    guest's recovery would wait with it. ``crashed`` must say True only for a crash or
    an expired watchdog (a suspended domain is the save working); errors count as no."""

    def __init__(self, proc: XlProcess, crashed: Callable[[], bool],
                 interval: float = 0.25) -> None:
        super().__init__(name="capture-crash-guard", daemon=True)
        self.proc, self.crashed, self.interval = proc, crashed, interval
        self.fired = False
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval) and self.proc.alive():
            try:
                if not self.crashed():
                    continue
            except Exception as exc:  # cannot tell: never kill a save on a guess
                _LOG.debug("crash guard: %s", exc)
                continue
            _LOG.warning("the domain crashed during its capture: killing %s",
                         " ".join(self.proc.argv))
            self.fired = True
            self.proc.proc.kill()
            return

    def stop(self) -> None:
        self._stop.set()


class _FreezeClock(threading.Thread):
    """Measures how long the domain is frozen (suspended or paused) while it is captured,
    polling ``frozen`` (an error counts as no change: a probe must never fail a capture)."""

    def __init__(self, frozen: Callable[[], bool], interval: float = 0.05) -> None:
        super().__init__(name="capture-freeze-clock", daemon=True)
        self.frozen, self.interval = frozen, interval
        self.total = 0.0
        self._since: float | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        try:
            frozen = self.frozen()
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            _LOG.debug("freeze clock: %s", exc)
            return
        now = time.monotonic()
        if frozen and self._since is None:
            self._since = now
        elif not frozen and self._since is not None:
            self.total += now - self._since
            self._since = None

    def stop(self) -> float:
        """Stop polling (after one last look); the seconds the domain was frozen."""
        self._done.set()
        self.join()
        self._sample()
        if self._since is not None:  # still frozen: counted up to now
            self.total += time.monotonic() - self._since
            self._since = None
        return self.total


class _LiveWindow:
    """The end of a live capture: the guest is still suspended after the stream's END; the
    hook runs, then the recorder lets xl resume the guest (whatever the hook did)."""

    def __init__(self, recorder: migrate.Recorder, hook: WhilePaused | None,
                 frozen: Callable[[], bool] | None) -> None:
        self.recorder, self.hook, self.frozen = recorder, hook, frozen

    def run(self, image_id: str) -> float:
        try:
            if self.hook is not None:
                self.hook(image_id)
        finally:
            self.recorder.release()
        return time.monotonic()


class _PausedWindow:
    """The pause ``xl save -c -p`` leaves behind, what runs in it, and its release,
    exactly once.

    xl pauses the domain only after a complete save (``save_domain`` in xl_saverestore.c
    resumes it unpaused when the save fails), so a domain is unpaused when xl exited 0,
    or when it was killed and may have paused it; never after xl's own failure (that
    could undo a pause somebody else made: pauses nest)."""

    def __init__(self, domain: str, xl: Sequence[str], proc: XlProcess,
                 hook: WhilePaused) -> None:
        self.domain, self.xl, self.proc, self.hook = domain, xl, proc, hook
        self.released_at: float | None = None

    def run(self, image_id: str) -> float:
        """The hook, then the unpause whatever it did; when the guest ran again."""
        try:
            self.hook(image_id)
        finally:
            resumed = self.release()
        return resumed

    def release(self) -> float:
        """Unpause (once); the time the guest ran again. :raises CaptureFailed: xl could
        not unpause it (the message says what the operator must do)."""
        if self.released_at is not None:
            return self.released_at
        self.released_at = time.monotonic()
        rc = self.proc.proc.returncode
        if rc is not None and rc > 0 and not self.proc.timed_out:
            return self.released_at
        error = None
        for _ in range(3):
            error = commands.unpause(self.xl, self.domain)
            if error is None:
                self.released_at = time.monotonic()
                return self.released_at
        if rc == 0:
            _LOG.critical("%s: xl save -p left it paused and xl unpause failed: %s; run "
                          "`xl unpause %s`", self.domain, error, self.domain)
            raise CaptureFailed(f"{self.domain} was left paused after its capture (xl "
                                f"unpause: {error}); run `xl unpause {self.domain}`")
        _LOG.info("%s: no pause to release after xl was stopped (%s)", self.domain, error)
        return self.released_at


#: Why live captures are not tried any more in this process (the hypervisor cannot do
#: them, see :data:`xenpbr.xl.migrate.LOGDIRTY_UNSUPPORTED`); None until one failed so.
_live_unsupported: str | None = None


def capture(domain: str, store: ImageStore, phase: str, *, seq: int = 0,
            fingerprint: str = "", extra: dict[str, Any] | None = None,
            timeout: float = 600.0, xl: Sequence[str] = ("xl",),
            progress: Callable[[CaptureProgress], None] | None = None,
            crashed: Callable[[], bool] | None = None,
            frozen: Callable[[], bool] | None = None,
            while_paused: WhilePaused | None = None, live: bool = False) -> CaptureResult:
    """Save ``domain`` (left running) as a new image of ``phase`` in ``store``.

    ``crashed``, polled while xl runs, says whether the domain has crashed (or its
    watchdog fired): then xl is killed at once instead of waiting for a suspend that
    will never come. ``frozen`` says whether it is suspended or paused (for
    ``paused_s``). ``while_paused``: see the module docstring; its exceptions pass
    through, with nothing stored. ``live``: copy memory while the guest runs
    (``xl migrate`` to a recorder) instead of suspending it for the whole copy; on a
    Xen that cannot (no log-dirty mode for PV guests) this and every later capture of
    the process use ``xl save -c`` (``CaptureResult.live`` says which ran).

    :raises CaptureFailed: xl failed or timed out (its message included), or the
        stream it produced was rejected.
    :raises QuotaExceeded, InvalidName, StoreBusy: from the store; nothing published.
    """
    global _live_unsupported
    once = functools.partial(_capture_once, domain, store, phase, seq=seq,
                             fingerprint=fingerprint, extra=extra, timeout=timeout, xl=xl,
                             progress=progress, crashed=crashed, frozen=frozen,
                             while_paused=while_paused)
    if live and _live_unsupported is None:
        try:
            return once(live=True)
        except LiveCaptureUnsupported as err:
            _live_unsupported = str(err)
            _LOG.warning("live capture is not possible on this Xen: %s; %s and every later "
                         "capture use xl save -c, which suspends the guest for the whole "
                         "copy", err, domain)
    return once(live=False)


def _capture_once(domain: str, store: ImageStore, phase: str, *, seq: int,
                  fingerprint: str, extra: dict[str, Any] | None, timeout: float,
                  xl: Sequence[str], progress: Callable[[CaptureProgress], None] | None,
                  crashed: Callable[[], bool] | None, frozen: Callable[[], bool] | None,
                  while_paused: WhilePaused | None, live: bool) -> CaptureResult:
    """One attempt of :func:`capture`, live or not."""
    check_name(domain, "domain")
    start = time.monotonic()
    writer = store.begin_capture(domain, phase, seq=seq, fingerprint=fingerprint,
                                 extra=extra)
    with writer, tempfile.TemporaryDirectory(prefix="xenpbr-capture-") as tmp:
        recorder = migrate.Recorder(Path(tmp)) if live else None
        if recorder is not None:
            fifo = recorder.stream
            argv = [*xl, "migrate", "-s", "", domain, recorder.rune()]
        else:
            fifo = Path(tmp) / "stream"
            os.mkfifo(fifo, 0o600)
            hold = ["-p"] if while_paused is not None else []
            argv = [*xl, "save", "-c", *hold, domain, str(fifo)]
        fd = open_fifo_reader(fifo)
        try:
            proc = XlProcess(argv, timeout)
        except XlError as err:
            os.close(fd)
            if recorder is not None:
                recorder.release()
            raise CaptureFailed(f"capture of {domain}: {err}") from err
        guard = _CrashGuard(proc, crashed) if crashed is not None else None
        clock = _FreezeClock(frozen) if frozen is not None else None
        window: _PausedWindow | _LiveWindow | None = (
            _LiveWindow(recorder, while_paused, frozen) if recorder is not None else
            _PausedWindow(domain, xl, proc, while_paused) if while_paused is not None else None)
        for thread in (guard, clock):
            if thread is not None:
                thread.start()
        try:
            result = _run(domain, writer, proc, fd, start, progress, window)
            if clock is not None:
                result = dataclasses.replace(result, paused_s=clock.stop())
            return result
        except CaptureFailed as err:
            if guard is not None and guard.fired:
                raise CaptureFailed(f"{domain} crashed during the capture of phase {phase}; "
                                    f"xl {argv[len(xl)]} was stopped ({err})") from err
            raise
        finally:
            if guard is not None:
                guard.stop()
            if clock is not None:
                clock.stop()
            if isinstance(window, _PausedWindow):
                _release_quietly(window)
            if recorder is not None:
                recorder.release()


def _check_resumed(domain: str, frozen: Callable[[], bool] | None) -> None:
    """After a live capture xl has resumed the guest; say so loudly if it has not."""
    if frozen is None or not frozen():
        return
    _LOG.critical("%s is still suspended or paused after its live capture; check "
                  "`xl list` (and `xl unpause %s` if it only shows p)", domain, domain)
    raise CaptureFailed(f"{domain} is still suspended or paused after its live capture "
                        f"(see `xl list`); nothing stored")


def _release_quietly(window: _PausedWindow) -> None:
    """The unpause on a failure path: logged, never raised over the first error."""
    try:
        window.release()
    except CaptureFailed as err:
        _LOG.error("%s", err)


def _run(domain: str, writer: CaptureWriter, proc: XlProcess, fd: int, start: float,
         progress: Callable[[CaptureProgress], None] | None,
         window: _PausedWindow | _LiveWindow | None = None) -> CaptureResult:
    live = isinstance(window, _LiveWindow)
    verb = "migrate (live capture)" if live else "save -c"
    try:
        src = wait_for_data(fd, proc)
    except XlError:
        proc.wait()
        if live and migrate.LOGDIRTY_UNSUPPORTED in proc.output():
            raise _failure(domain, proc, StreamError("no stream"), verb) from None
        raise CaptureFailed(f"xl {verb} {domain} failed ({proc.describe_exit()}) before "
                            f"sending anything: {proc.message()}") from None
    with src:
        timed = _Timed(src)
        clock = _RecordClock(timed, start, progress)
        _LOG.info("capturing %s (phase %s) from xl %s", domain, writer.phase, verb)
        try:
            # live: xl waits, the guest suspended, until we release it after END
            stream = read_stream(timed, on_page=writer.on_page,  # type: ignore[arg-type]
                                 on_record=clock, require_eof=not live)
        except (StreamCodecError, ImageError, OSError) as err:
            if isinstance(window, _LiveWindow):
                window.recorder.release()
            _drain(timed)
            proc.wait()
            failure = _failure(domain, proc, err, verb)
            if failure is err:
                raise
            raise failure from err
        except BaseException:  # a bug or an interrupt: closing the FIFO makes xl fail,
            src.close()         # and xl's own error path resumes the guest
            if isinstance(window, _LiveWindow):
                window.recorder.release()
            proc.wait(30)
            raise
        end_of_stream = time.monotonic()
        resumed = _end_live(window, writer.image_id, timed, proc) if live else None
        trailing = _drain(timed) if live else 0
    rc = proc.wait()
    _check_exit(domain, proc, rc, live, trailing)
    if isinstance(window, _LiveWindow):
        _check_resumed(domain, window.frozen)
    if resumed is None:
        resumed = window.run(writer.image_id) if window is not None else proc.ended
    t_commit = time.monotonic()
    meta = writer.commit(stream, stream_bytes=timed.count - trailing)
    done = time.monotonic()
    first = timed.first or end_of_stream
    result = CaptureResult(
        meta=meta, stats=writer.stats, total_s=done - start, connect_s=first - start,
        stream_s=end_of_stream - first,
        paused_s=(resumed - clock.before_pages) if clock.before_pages and resumed else None,
        commit_s=done - t_commit, xl_output=proc.output(), live=live)
    _LOG.info("captured %s phase %s as %s%s: %d bytes raw, %d new bytes, %.2f s total",
              domain, writer.phase, meta.image_id, " (live)" if live else "",
              meta.stream_bytes, writer.new_bytes, result.total_s)
    return result


def _end_live(window: _PausedWindow | _LiveWindow | None, image_id: str, src: _Timed,
              proc: XlProcess) -> float:
    """Run the live window (hook, release); if the hook fails, xl still resumes the guest
    before the error goes up (drained, waited for)."""
    assert isinstance(window, _LiveWindow)
    try:
        return window.run(image_id)
    except BaseException:
        _drain(src)
        proc.wait()
        raise


def _check_exit(domain: str, proc: XlProcess, rc: int, live: bool, trailing: int) -> None:
    """xl's exit after a complete stream: 0 for ``xl save``; for a live capture the
    resume-at-sender path (:func:`xenpbr.xl.migrate.check_outcome`) and nothing after
    the stream's END."""
    if live:
        why = (f"{trailing} bytes followed the stream's END" if trailing else
               migrate.check_outcome(None if proc.timed_out else rc, proc.output()))
        if why is not None:
            raise CaptureFailed(f"xl migrate (live capture) of {domain}: {why} "
                                f"({proc.describe_exit()}): {proc.message()}; nothing stored")
        return
    if rc != 0 or proc.timed_out:
        raise CaptureFailed(f"xl save -c {domain} failed ({proc.describe_exit()}) after "
                            f"sending a complete stream: {proc.message()}; nothing stored")


def _drain(src: _Timed) -> int:
    """Read the FIFO to EOF so a suspended guest is resumed by xl (bounded by xl's
    watchdog: killing xl closes the FIFO); the bytes read."""
    before = src.count
    try:
        while src.read(1 << 20):
            pass
    except OSError:
        pass
    return src.count - before


def _failure(domain: str, proc: XlProcess, err: Exception, verb: str) -> Exception:
    """The error to raise once xl has exited: xl's own failure wins over ours (for a live
    capture, exit status 1 after resuming the guest is xl's normal end here)."""
    live = verb.startswith("migrate")
    failed = (migrate.check_outcome(proc.proc.returncode, proc.output()) is not None
              if live else proc.proc.returncode != 0)
    if live and migrate.LOGDIRTY_UNSUPPORTED in proc.output():
        return LiveCaptureUnsupported(f"xl migrate (live capture) of {domain}: "
                                      f"{migrate.check_outcome(proc.proc.returncode, proc.output())}")
    if failed or proc.timed_out:
        hint = " (the domain may be left suspended: check `xl list`)" if proc.timed_out else ""
        return CaptureFailed(f"xl {verb} {domain} failed ({proc.describe_exit()}): "
                             f"{proc.message()}{hint}; stream error: {err}; nothing stored")
    if isinstance(err, ImageError):
        return err  # the store refused (quota ...): xl finished and resumed the guest
    return CaptureFailed(f"xl {verb} {domain} succeeded but its stream was rejected: {err}; "
                         "nothing stored (the domain kept running)")
