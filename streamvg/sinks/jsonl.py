"""`JsonlSink`: the embedded default sink, one event per line in a file (or stdout).

Same events as Redis (`Event.to_json()`), so files written here can be replayed into Redis
or read with `Event.from_json` line by line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from streamvg.errors import PublishError
from streamvg.events import Event
from streamvg.sinks.redis import SinkStats

__all__ = ["JsonlSink"]

log = logging.getLogger(__name__)


class JsonlSink:
    """Append events as JSON lines to `path` (`"-"` = standard output). Thread-safe.

    Lines are written through to the OS in batches: when `batch_size` lines are waiting,
    or the oldest has waited `flush_interval_s` (a background thread sees to idle
    periods), so a killed process loses at most the last batch. With `fsync=True` each
    batch is also fsync'd (durable across a power cut, slower). A file that cannot be
    written (full disk) never stops the caller: the lines are counted in
    `stats.dropped_by_reason["disk"]`, logged once per episode.

    Args:
        path: File to append to (folders are created); `"-"` writes to stdout.
        fsync: fsync every batch.
        batch_size: Lines per write; larger is faster, smaller loses less to a kill.
        flush_interval_s: Longest a line waits before it is written, seconds.

    Raises:
        PublishError: the file cannot be opened for writing.

    Example:
        with JsonlSink("events.jsonl") as sink:
            sink.publish(event)
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = False, batch_size: int = 64,
        flush_interval_s: float = 0.2,
    ) -> None:
        self.path = str(path)
        self.fsync = fsync
        self.batch_size = max(1, int(batch_size))
        self.flush_interval_s = float(flush_interval_s)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._stats = SinkStats()
        self._buf: list[bytes] = []
        self._buf_since = 0.0
        self._failing = 0  # lines lost in the current episode of write errors
        self._own = self.path != "-"
        if self._own:
            p = Path(self.path)
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                # Unbuffered: each batch is one write(2), so nothing lingers in user space.
                self._f: IO[bytes] = open(p, "ab", buffering=0)  # noqa: SIM115 (closed in close())
            except OSError as exc:
                raise PublishError(
                    f"events file {p} cannot be opened for writing ({exc.strerror}); give a writable path"
                ) from exc
        else:
            self._f = sys.stdout.buffer
        self._thread = threading.Thread(target=self._run, name=f"streamvg-jsonl-{Path(self.path).name}", daemon=True)
        self._thread.start()

    @property
    def stats(self) -> SinkStats:
        """Counters; `published` counts lines written to the OS."""
        return self._stats

    def publish(self, event: Event) -> None:
        """Queue one event as one line; writes the batch when it is full."""
        line = event.to_json() + b"\n"
        with self._lock:
            if self._closed:
                raise PublishError(f"JsonlSink for {self.path} is closed; create a new sink to publish")
            if not self._buf:
                self._buf_since = time.monotonic()
            self._buf.append(line)
            if len(self._buf) >= self.batch_size:
                self._write_locked()

    def _write_locked(self) -> None:
        if not self._buf:
            return
        lines, self._buf = self._buf, []
        data = b"".join(lines)
        end = 0
        try:
            if self._own:
                end = os.fstat(self._f.fileno()).st_size
                if self._f.write(data) != len(data):  # a short write: the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            else:
                self._f.write(data)
                self._f.flush()
            if self.fsync and self._own:
                os.fsync(self._f.fileno())
        except OSError as exc:
            self._stats.errors += 1
            self._stats.dropped += len(lines)
            self._stats.dropped_by_reason["disk"] = self._stats.dropped_by_reason.get("disk", 0) + len(lines)
            if not self._failing:
                log.warning("events file %s cannot be written (%s): dropping events (counted) until it can",
                            self.path, exc.strerror or exc)
            self._failing += len(lines)
            if self._own:
                with contextlib.suppress(OSError):  # end the file on a whole line again
                    os.ftruncate(self._f.fileno(), end)
            return
        if self._failing:
            log.warning("events file %s is writable again; %d events were dropped meanwhile", self.path, self._failing)
            self._failing = 0
        self._stats.published += len(lines)

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                self._wake.wait(self.flush_interval_s / 2)
                if self._buf and time.monotonic() - self._buf_since >= self.flush_interval_s:
                    self._write_locked()

    def flush(self) -> None:
        """Write waiting lines to the OS (and to disk with `fsync=True`)."""
        with self._lock:
            if self._closed:
                return
            self._write_locked()

    def close(self) -> None:
        """Write what is waiting and close the file (stdout is flushed, not closed)."""
        with self._lock:
            if self._closed:
                return
            self._write_locked()
            self._closed = True
            self._wake.notify_all()
            if self._own:
                with contextlib.suppress(OSError):
                    self._f.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
