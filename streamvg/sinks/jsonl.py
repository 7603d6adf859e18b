"""`JsonlSink`: the embedded default sink, one event per line in a file (or stdout).

Same events as Redis (`Event.to_json()`), so files written here can be replayed into Redis
or read with `Event.from_json` line by line.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import IO

from streamvg.errors import PublishError
from streamvg.events import Event
from streamvg.sinks.redis import SinkStats

__all__ = ["JsonlSink"]


class JsonlSink:
    """Append events as JSON lines to `path` (`"-"` = standard output). Thread-safe.

    Args:
        path: File to append to (folders are created); `"-"` writes to stdout.
        fsync: fsync on every `flush()` (durable across power loss, slower).

    Raises:
        PublishError: the file cannot be opened for writing.

    Example:
        with JsonlSink("events.jsonl") as sink:
            sink.publish(event)
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = str(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._closed = False
        self._stats = SinkStats()
        self._own = self.path != "-"
        if self._own:
            p = Path(self.path)
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                self._f: IO[bytes] = open(p, "ab")  # noqa: SIM115 (closed in close())
            except OSError as exc:
                raise PublishError(
                    f"events file {p} cannot be opened for writing ({exc.strerror}); give a writable path"
                ) from exc
        else:
            self._f = sys.stdout.buffer

    @property
    def stats(self) -> SinkStats:
        """Counters; `published` counts lines written."""
        return self._stats

    def publish(self, event: Event) -> None:
        """Write one event as one line."""
        line = event.to_json() + b"\n"
        with self._lock:
            if self._closed:
                raise PublishError(f"JsonlSink for {self.path} is closed; create a new sink to publish")
            self._f.write(line)
            self._stats.published += 1

    def flush(self) -> None:
        """Push written lines to the OS (and to disk with `fsync=True`)."""
        with self._lock:
            if self._closed:
                return
            self._f.flush()
            if self.fsync and self._own:
                os.fsync(self._f.fileno())

    def close(self) -> None:
        """Flush and close the file (stdout is flushed, not closed)."""
        self.flush()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._own:
                self._f.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
