"""The ingest side: windows → a bounded local buffer → the cameras' work streams.

`put` never touches the network: it encodes the window (downsizing frames the engine
would shrink anyway) and appends it to its camera's buffer. A sender thread hands the
buffers to Redis in order and rides out outages of any length (one log line when Redis
goes, one when it is back). While Redis is away or the ground fleet is behind:

- live cameras keep their freshest `buffer_windows` windows; older ones are dropped and
  counted (`dropped_stale`), as the single-process queue does, so latency stays bounded;
  a work stream longer than `max_backlog` is trimmed from its stale end (counted);
- file cameras lose nothing: `put` blocks while the buffer is full, which holds the
  decoder back, and the sender waits while the work stream holds `max_backlog` windows.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable, Sequence

import redis

from streamvg.config import ScaleoutConfig
from streamvg.errors import RedisAuthError
from streamvg.redaction import mask_url
from streamvg.scaleout.codec import encode_window, end_marker
from streamvg.scaleout.lease import Outage, is_outage, key
from streamvg.sinks.redis import connect_redis
from streamvg.types import Window

__all__ = ["WindowPublisher", "work_key"]

log = logging.getLogger("streamvg.scaleout")


def work_key(pipeline: str, camera: str) -> str:
    return f"streamvg:{pipeline}:work:{camera}"


class WindowPublisher:
    """Puts windows on their camera's work stream (see the module docstring).

    Args:
        url: Redis URL.
        pipeline: Pipeline name.
        settings: Buffer and backlog limits, JPEG quality.
        live_cameras: Cameras whose stale windows may be dropped; the others wait.
        max_pixels: Frames above this many pixels are downsized before sending (the
            engine's `max_pixels`; None keeps them whole, as the replay engine needs).
        max_backlog: Overrides `settings.max_backlog`.
    """

    def __init__(
        self,
        url: str,
        pipeline: str,
        *,
        settings: ScaleoutConfig | None = None,
        live_cameras: Iterable[str] = (),
        max_pixels: int | None = None,
        max_backlog: int | None = None,
    ) -> None:
        self.url = url
        self.pipeline = pipeline
        self.settings = settings or ScaleoutConfig()
        self.max_backlog = max_backlog or self.settings.max_backlog
        self.live = set(live_cameras)
        self.max_pixels = max_pixels
        self.client = connect_redis(url, socket_timeout_s=5.0, connect_timeout_s=2.0)
        self.published = 0
        self.dropped = 0  # stale windows dropped: live buffer overflow + backlog trims
        self.outage = Outage("ingest")
        self._buf: dict[str, collections.deque[dict[str, bytes]]] = {}
        self._known: set[str] = set()
        self._cond = threading.Condition()
        self._inflight = 0
        self._closing = False
        self._stop = threading.Event()
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="streamvg-ingest-sender", daemon=True)
        self._thread.start()

    # --- the camera side ------------------------------------------------------------

    def put(self, windows: Sequence[Window]) -> None:
        """Buffer windows for their cameras' work streams (blocks for a file camera whose
        buffer is full; drops the stalest of a live camera's)."""
        for w in windows:
            entry = encode_window(w, jpeg_quality=self.settings.jpeg_quality, max_pixels=self.max_pixels)
            self._append(w.frames[0].camera, entry)

    def end_cameras(self, cameras: Iterable[str]) -> None:
        """Mark the end of these cameras' sources (after their last window): the ground
        worker that owns each ends its tracks and publishes their `track_end`."""
        for cam in cameras:
            self._append(cam, end_marker(), force=True)

    def _append(self, cam: str, entry: dict[str, bytes], *, force: bool = False) -> None:
        with self._cond:
            q = self._buf.setdefault(cam, collections.deque())
            cap = self.settings.buffer_windows
            if cam in self.live:
                while len(q) >= cap and not force:
                    q.popleft()
                    self.dropped += 1
            else:
                while len(q) >= cap and not force and not self._stop.is_set() and self._fatal is None:
                    self._cond.wait(0.5)
            q.append(entry)
            self._cond.notify_all()

    def pending(self) -> int:
        """Windows (and end markers) not yet handed to Redis."""
        with self._cond:
            return sum(len(q) for q in self._buf.values())

    def drain(self, timeout: float | None = None, stop: threading.Event | None = None) -> bool:
        """Wait until everything buffered is on Redis; False on timeout or `stop`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while sum(len(q) for q in self._buf.values()):
                if self._fatal is not None or (stop is not None and stop.is_set()):
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.2 if left is None else min(0.2, left))
        return True

    def close(self) -> None:
        """Stop the sender (what is still buffered is lost: `drain` first)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(10)
        self.client.close()

    # --- the sender thread ----------------------------------------------------------

    def _take(self) -> list[tuple[str, list[dict[str, bytes]]]]:
        with self._cond:
            while not self._stop.is_set() and not any(self._buf.values()):
                self._cond.wait(0.2)
            batch = [(cam, list(q)[:32]) for cam, q in self._buf.items() if q]
            self._inflight = sum(len(e) for _c, e in batch)
            return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            try:
                sent = self._send(batch)
                self.outage.up()
            except redis.RedisError as exc:
                if not is_outage(exc):
                    self._fatal = RedisAuthError(
                        f"Redis at {mask_url(self.url)} refused the ingest ({exc}); check the URL's credentials"
                    ) if "AUTH" in str(exc).upper() or "WRONGPASS" in str(exc).upper() else exc
                    log.error("ingest: Redis refused the work streams: %s", self._fatal)
                    with self._cond:
                        self._inflight = 0
                        self._cond.notify_all()
                    return
                with self._cond:
                    self._inflight = 0
                self.outage.down(exc, self._stop)
                continue
            with self._cond:
                for cam, n in sent.items():
                    q = self._buf[cam]
                    for _ in range(min(n, len(q))):
                        q.popleft()
                self._inflight = 0
                self._cond.notify_all()
            if not any(sent.values()):
                self._stop.wait(0.1)  # every camera is waiting for the fleet (files at max_backlog)

    def _send(self, batch: list[tuple[str, list[dict[str, bytes]]]]) -> dict[str, int]:
        """One round trip: XADD what may go, per camera, in order; returns entries sent."""
        sent: dict[str, int] = {}
        lens = self.client.pipeline(transaction=False)
        for cam, _entries in batch:
            lens.xlen(work_key(self.pipeline, cam))
        backlog = dict(zip([c for c, _ in batch], lens.execute(), strict=True))
        pipe = self.client.pipeline(transaction=True)
        for cam, entries in batch:
            if cam not in self.live:
                entries = entries[: max(0, self.max_backlog - int(backlog[cam]))]  # files wait for the fleet
            sent[cam] = len(entries)
            if not entries:
                continue
            if cam not in self._known:
                pipe.sadd(key(self.pipeline, "cameras"), cam)
            for e in entries:
                pipe.xadd(work_key(self.pipeline, cam), e)  # type: ignore[arg-type]
            pipe.incrby(key(self.pipeline, "windows_published"), sum(1 for e in entries if "meta" in e))
        pipe.execute()
        self._known.update(c for c, n in sent.items() if n)
        self.published += sum(sum(1 for e in entries[: sent[c]] if "meta" in e) for c, entries in batch)
        for cam, _entries in batch:
            if cam in self.live and sent[cam] and int(backlog[cam]) + sent[cam] > self.max_backlog:
                trimmed = int(self.client.xtrim(work_key(self.pipeline, cam), maxlen=self.max_backlog, approximate=False))
                if trimmed:
                    self.dropped += trimmed
                    log.warning("camera %s: ground workers are behind; dropped %d stale windows", cam, trimmed)
        return sent
