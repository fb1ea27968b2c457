"""Capture a running domain into the store: ``xl save -c`` -> FIFO -> parser -> store.

Nothing of the stream touches the disk except what the store keeps (new pages, the
manifest): xl writes into a FIFO in a private temporary directory, the codec parses
the stream as it arrives, and each page goes straight to the store's writer. ``-c``
leaves the domain running once the save completes.

The guest is suspended while xl writes its pages, so this side must never stop
reading early: if the store refuses the capture (quota) or the stream is rejected,
the rest of the FIFO is drained so xl finishes and resumes the guest, and only then
is the error raised. xl is killed at the deadline (the guest may then stay
suspended: the error says so).

Timings (``CaptureResult``): ``total_s`` from xl's start to the manifest being
published; ``paused_s`` estimates how long the guest was suspended: from the last
record before the first PAGE_DATA (libxc suspends the domain just before sending
pages, ``send_domain_memory_nonlive`` in Xen 4.17) to xl's exit (it resumes the
domain, then exits), or with ``while_paused`` to our unpause, so it slightly
over-estimates.
"""

from __future__ import annotations

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

from xenpbr.images.errors import CaptureFailed, ImageError
from xenpbr.images.image import ImageMeta, check_name
from xenpbr.images.store import ImageStore
from xenpbr.images.writer import CaptureStats, CaptureWriter
from xenpbr.xl import commands
from xenpbr.xl.errors import XlError
from xenpbr.xl.fifo import XlProcess, open_fifo_reader, wait_for_data
from xenpbr.stream import format as fmt
from xenpbr.stream.codec import Record
from xenpbr.stream.errors import StreamCodecError
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
    paused_s: float | None  # estimate, see the module docstring
    commit_s: float  # sealing packs + publishing the manifest
    xl_output: str

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
                "commit_s": self.commit_s}


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


def capture(domain: str, store: ImageStore, phase: str, *, seq: int = 0,
            fingerprint: str = "", extra: dict[str, Any] | None = None,
            timeout: float = 600.0, xl: Sequence[str] = ("xl",),
            progress: Callable[[CaptureProgress], None] | None = None,
            crashed: Callable[[], bool] | None = None,
            while_paused: WhilePaused | None = None) -> CaptureResult:
    """Save ``domain`` (left running) as a new image of ``phase`` in ``store``.

    ``crashed``, polled while xl runs, says whether the domain has crashed (or its
    watchdog fired): then xl is killed at once instead of waiting for a suspend that
    will never come. ``while_paused``: see the module docstring; its exceptions pass
    through, with nothing stored.

    :raises CaptureFailed: xl failed or timed out (its message included), or the
        stream it produced was rejected.
    :raises QuotaExceeded, InvalidName, StoreBusy: from the store; nothing published.
    """
    check_name(domain, "domain")
    start = time.monotonic()
    writer = store.begin_capture(domain, phase, seq=seq, fingerprint=fingerprint,
                                 extra=extra)
    with writer, tempfile.TemporaryDirectory(prefix="xenpbr-capture-") as tmp:
        fifo = Path(tmp) / "stream"
        os.mkfifo(fifo, 0o600)
        fd = open_fifo_reader(fifo)
        hold = ["-p"] if while_paused is not None else []
        try:
            proc = XlProcess([*xl, "save", "-c", *hold, domain, str(fifo)], timeout)
        except XlError as err:
            os.close(fd)
            raise CaptureFailed(f"capture of {domain}: {err}") from err
        guard = _CrashGuard(proc, crashed) if crashed is not None else None
        window = (_PausedWindow(domain, xl, proc, while_paused)
                  if while_paused is not None else None)
        if guard is not None:
            guard.start()
        try:
            return _run(domain, writer, proc, fd, start, progress, window)
        except CaptureFailed as err:
            if guard is not None and guard.fired:
                raise CaptureFailed(f"{domain} crashed during the capture of phase {phase}; "
                                    f"xl save was stopped ({err})") from err
            raise
        finally:
            if guard is not None:
                guard.stop()
            if window is not None:
                _release_quietly(window)


def _release_quietly(window: _PausedWindow) -> None:
    """The unpause on a failure path: logged, never raised over the first error."""
    try:
        window.release()
    except CaptureFailed as err:
        _LOG.error("%s", err)


def _run(domain: str, writer: CaptureWriter, proc: XlProcess, fd: int, start: float,
         progress: Callable[[CaptureProgress], None] | None,
         window: _PausedWindow | None = None) -> CaptureResult:
    try:
        src = wait_for_data(fd, proc)
    except XlError:
        proc.wait()
        raise CaptureFailed(f"xl save -c {domain} failed ({proc.describe_exit()}) before "
                            f"sending anything: {proc.message()}") from None
    with src:
        timed = _Timed(src)
        clock = _RecordClock(timed, start, progress)
        _LOG.info("capturing %s (phase %s) from xl save -c", domain, writer.phase)
        try:
            stream = read_stream(timed, on_page=writer.on_page,  # type: ignore[arg-type]
                                 on_record=clock)
        except (StreamCodecError, ImageError, OSError) as err:
            _drain(timed)
            proc.wait()
            failure = _failure(domain, proc, err)
            if failure is err:
                raise
            raise failure from err
        except BaseException:  # a bug or an interrupt: closing the FIFO makes xl fail,
            src.close()         # and xl's own error path resumes the guest
            proc.wait(30)
            raise
        end_of_stream = time.monotonic()
    rc = proc.wait()
    if rc != 0 or proc.timed_out:
        raise CaptureFailed(f"xl save -c {domain} failed ({proc.describe_exit()}) after "
                            f"sending a complete stream: {proc.message()}; nothing stored")
    resumed = window.run(writer.image_id) if window is not None else proc.ended
    t_commit = time.monotonic()
    meta = writer.commit(stream, stream_bytes=timed.count)
    done = time.monotonic()
    first = timed.first or end_of_stream
    result = CaptureResult(
        meta=meta, stats=writer.stats, total_s=done - start, connect_s=first - start,
        stream_s=end_of_stream - first,
        paused_s=(resumed - clock.before_pages) if clock.before_pages and resumed else None,
        commit_s=done - t_commit, xl_output=proc.output())
    _LOG.info("captured %s phase %s as %s: %d bytes raw, %d new bytes, %.2f s total",
              domain, writer.phase, meta.image_id, meta.stream_bytes, writer.new_bytes,
              result.total_s)
    return result


def _drain(src: _Timed) -> None:
    """Read the FIFO to EOF so a suspended guest is resumed by xl (bounded by xl's
    watchdog: killing xl closes the FIFO)."""
    try:
        while src.read(1 << 20):
            pass
    except OSError:
        pass


def _failure(domain: str, proc: XlProcess, err: Exception) -> Exception:
    """The error to raise once xl has exited: xl's own failure wins over ours."""
    if proc.proc.returncode != 0 or proc.timed_out:
        hint = " (the domain may be left suspended: check `xl list`)" if proc.timed_out else ""
        return CaptureFailed(f"xl save -c {domain} failed ({proc.describe_exit()}): "
                             f"{proc.message()}{hint}; stream error: {err}; nothing stored")
    if isinstance(err, ImageError):
        return err  # the store refused (quota ...): xl finished and resumed the guest
    return CaptureFailed(f"xl save -c {domain} succeeded but its stream was rejected: {err}; "
                         "nothing stored (the domain kept running)")
