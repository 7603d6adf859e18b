"""Live network streams (PyAV): a reader thread, the "freshest" hand-off, reconnects.

```
 network ──▶ reader thread: demux + decode EVERY packet (the socket never backs up)
                 │ sampler keeps the frames the target fps wants (by stream PTS)
                 ▼
            bounded hand-off (queue_size frames; full → the oldest is dropped, counted)
                 │
 consumer ◀──────┘ __next__ converts the frame it takes to RGB (dropped frames never are)
```

The reader reconnects on end of stream, on errors and on stalls (no frame for
`stall_timeout_s`), waiting `backoff_initial_s`, doubling up to `backoff_max_s`, forever by
default. State changes go to `on_status` as `SourceStatus` ("connecting", "up", "down",
"stalled"), with the URI masked. `close()` returns within about 1.5 s in every state: a
reader blocked inside FFmpeg (connecting) is left to finish on its own, as a daemon thread,
within its open timeout, and then closes its connection.

Media time (`Frame.pts`) continues across reconnects: a new connection's first frame is
placed after the last frame by the wall-clock time that passed, so time never runs
backwards for trackers downstream. `Frame.wall_time` is the Unix time the frame was decoded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamvg.errors import SourceError, SourceTimeoutError
from streamvg.redaction import mask_text
from streamvg.sources.base import (
    DEFAULT_MAX_PIXELS,
    Source,
    SourceState,
    StatusCallback,
    fit_within,
    lowres_for,
)
from streamvg.types import Frame

__all__ = ["LiveSource", "ThreadedSource"]

log = logging.getLogger("streamvg.sources.live")

_JOIN_S = 1.5


class _Stalled(Exception):
    """No frame arrived for `stall_timeout_s` on an open connection."""


class _Connection:
    """What a backend opens: frames as `(pts_s or None, raw)` until the stream ends."""

    def frames(self) -> Iterator[tuple[float | None, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ThreadedSource(Source):
    """A source read by a background thread with the freshest-frame hand-off.

    Subclasses implement `_connect()` (open one connection, raising on failure),
    `_to_rgb(raw)` and `_describe_failure(exc)`.

    Args:
        uri_masked: URI with the password masked (for logs and events).
        camera: Camera name.
        on_status: Receives every `SourceStatus` change (called on the reader thread; keep it quick).
        fps: Frames per second handed to the consumer (None = every frame).
        queue_size: Frames held for a slow consumer; beyond it the oldest is dropped and
            counted in `stats.frames_dropped`. Small keeps latency low.
        stall_timeout_s: A connection with no frame for this long is "stalled" and reopened.
        open_timeout_s: Give up one connection attempt after this long.
        backoff_initial_s: Wait before the first reconnect; doubles after each failure.
        backoff_max_s: Cap of the reconnect wait.
        max_reconnects: Failed attempts in a row before giving up (None = retry forever);
            giving up raises `SourceError` from the iterator.
        max_pixels: Frames with more pixels are downscaled to at most this many, aspect
            kept, when handed out (None = never; default 3840×2160); MJPEG streams decode
            straight at a reduced size.
    """

    def __init__(
        self,
        uri_masked: str,
        camera: str,
        on_status: StatusCallback | None,
        *,
        fps: float | None = None,
        queue_size: int = 2,
        stall_timeout_s: float = 10.0,
        open_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        max_reconnects: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(uri_masked, camera, on_status)
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}")
        self.max_pixels = max_pixels
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be positive or None, got {fps}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        for name, value in (("stall_timeout_s", stall_timeout_s), ("open_timeout_s", open_timeout_s),
                            ("backoff_initial_s", backoff_initial_s), ("backoff_max_s", backoff_max_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive seconds, got {value}")
        self.fps = fps
        self.queue_size = queue_size
        self.stall_timeout_s = float(stall_timeout_s)
        self.open_timeout_s = float(open_timeout_s)
        self.backoff_initial_s = float(backoff_initial_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_reconnects = max_reconnects
        self._queue: deque[tuple[int, float, float, Any]] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._error: SourceError | None = None
        self._thread: threading.Thread | None = None
        # Media-time bookkeeping (reader thread only).
        self._index = 0
        self._last_pts: float | None = None
        self._last_wall = 0.0
        self._next_t: float | None = None  # sampler: media time of the next wanted frame
        self._offset = 0.0  # media time = stream pts + offset
        self._rebase = False

    def start(self) -> ThreadedSource:
        """Start the reader thread (`open_source` does this)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"source-{self.camera}", daemon=True)
            self._thread.start()
        return self

    # --- consumer side -------------------------------------------------------------------

    def __next__(self) -> Frame:
        with self._cond:
            while not self._queue:
                if self._stop.is_set():
                    raise StopIteration
                if self._error is not None:
                    raise self._error
                self._cond.wait(0.5)
            index, pts, wall, raw = self._queue.popleft()
        self.stats.frames_in += 1
        return Frame(self.camera, index, pts, self._to_rgb(raw), wall)

    def close(self) -> None:
        """Stop reading; returns within about 1.5 s whatever the connection is doing."""
        self._stop.set()
        with self._cond:
            self._queue.clear()
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(_JOIN_S)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    # --- backend hooks -------------------------------------------------------------------

    def _connect(self) -> _Connection:  # pragma: no cover - abstract
        raise NotImplementedError

    def _to_rgb(self, raw: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _describe_failure(self, exc: BaseException, was_up: bool) -> str:
        return mask_text(str(exc)) or type(exc).__name__

    def _is_timeout(self, exc: BaseException) -> bool:
        """True when `exc` means "no data arrived in time" (a stall once connected)."""
        return isinstance(exc, TimeoutError)

    # --- reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        ever_up = False
        first_failure_at: float | None = None
        self._status.emit("connecting")
        while not self._stop.is_set():
            was_up = False
            detail = ""
            stalled = False
            conn: _Connection | None = None
            try:
                conn = self._connect()
                if self._stop.is_set():
                    break
                last_frame = time.monotonic()
                for pts, raw in conn.frames():
                    if self._stop.is_set():
                        break
                    now_m = time.monotonic()
                    if raw is None:  # the backend's heartbeat: a packet without a frame
                        if now_m - last_frame > self.stall_timeout_s:
                            raise _Stalled()
                        continue
                    last_frame = now_m
                    if not was_up:
                        was_up = True
                        failures, first_failure_at = 0, None
                        if ever_up:
                            self.stats.reconnects += 1
                        ever_up = True
                        self._status.emit("up")
                    self._offer(pts, raw)
                detail = "the stream ended"
            except _Stalled:
                stalled = True
                detail = f"no frame for {self.stall_timeout_s:g} s"
            except Exception as exc:
                stalled = was_up and self._is_timeout(exc)
                detail = f"no frame for {self.stall_timeout_s:g} s" if stalled else self._describe_failure(exc, was_up)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        log.debug("closing %s failed", self.uri, exc_info=True)
            if self._stop.is_set():
                break
            if was_up:
                self._mark_gap()
            failures += 1
            first_failure_at = first_failure_at or time.monotonic()
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(failures - 1, 30))
            if self.max_reconnects is not None and failures > self.max_reconnects:
                self._give_up(detail, ever_up, time.monotonic() - first_failure_at)
                return
            state: SourceState = "stalled" if stalled else "down"
            if was_up or self._status.state not in ("down", "stalled"):
                # One status per outage, not per attempt (events stay quiet), so the detail
                # states the whole retry policy rather than a delay that soon goes stale.
                self._status.emit(state, f"{detail}; retrying in {delay:.1f} s, then at most every {self.backoff_max_s:g} s")
            else:
                log.debug("camera %s (%s): still down (%s); next try in %.1f s", self.camera, self.uri, detail, delay)
            self._stop.wait(delay)

    def _give_up(self, detail: str, ever_up: bool, elapsed: float) -> None:
        if ever_up:
            msg = (f"Camera {self.camera} ({self.uri}) was lost and did not come back after "
                   f"{self.max_reconnects} reconnect attempts over {elapsed:.0f} s ({detail}); "
                   "check the camera and the network.")
            err: SourceError = SourceError(msg, source=self.uri)
        else:
            msg = (f"Camera {self.camera} ({self.uri}) did not answer after "
                   f"{self.max_reconnects + 1 if self.max_reconnects is not None else '?'} attempts ({detail}); "
                   "check the address, that the camera is on and reachable, and the credentials.")
            err = SourceTimeoutError(msg, source=self.uri)
        self._status.emit("ended", msg)
        with self._cond:
            self._error = err
            self._cond.notify_all()

    def _mark_gap(self) -> None:
        """Remember that the connection broke, so the next one continues media time."""
        self._rebase = True

    def _media_time(self, pts: float | None, now: float) -> float:
        """Continuous, non-decreasing media time for a frame (see the module docstring)."""
        last = self._last_pts
        if last is None:
            t = 0.0
            self._offset = -pts if pts is not None else 0.0
        elif pts is None:
            t = last + max(0.0, now - self._last_wall)
        else:
            t = pts + self._offset
            if self._rebase or t < last:
                # New connection (or the stream's clock jumped back): continue after the
                # last frame by the wall time that passed.
                gap = max(now - self._last_wall, 1e-3)
                self._offset = last + gap - pts
                t = last + gap
        self._rebase = False
        self._last_pts, self._last_wall = t, now
        return t

    def _offer(self, pts: float | None, raw: Any) -> None:
        """Sample one decoded frame and hand it over (dropping the oldest when full)."""
        now = time.time()
        t = self._media_time(pts, now)
        index = self._index
        self._index += 1
        self.stats.frames_decoded += 1
        if self.fps is not None:
            period = 1.0 / self.fps
            if self._next_t is not None and t < self._next_t - 1e-6:
                return
            nxt = (self._next_t if self._next_t is not None else t) + period
            self._next_t = nxt if nxt > t else t + period
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self.stats.frames_dropped += 1
            self._queue.append((index, t, now, raw))
            self._cond.notify()


class _AVConnection(_Connection):
    def __init__(self, container: Any, stall_timeout_s: float) -> None:
        self.container = container
        self.stream = container.streams.video[0]
        self.stream.thread_type = "AUTO"
        self.stall_timeout_s = stall_timeout_s

    def frames(self) -> Iterator[tuple[float | None, Any]]:
        tb = self.stream.time_base
        for packet in self.container.demux(self.stream):
            got = False
            for frame in packet.decode():
                got = True
                pts = float(frame.pts * tb) if frame.pts is not None and tb is not None else None
                yield pts, frame
            if not got:
                yield None, None

    def close(self) -> None:
        self.container.close()


class LiveSource(ThreadedSource):
    """A network stream read with PyAV: rtsp(s)://, http(s)://, tcp://, udp://, HLS (.m3u8).

    Args:
        uri: The stream URL (credentials allowed; they are masked everywhere).
        camera: Camera name (default: the masked URL's host).
        on_status, fps, queue_size, stall_timeout_s, open_timeout_s, backoff_initial_s,
        backoff_max_s, max_reconnects: See `ThreadedSource`.
        av_options: FFmpeg options for the input, e.g. {"rtsp_transport": "udp"}
            (default for rtsp: TCP, which survives lossy networks).
    """

    def __init__(
        self,
        uri: str,
        *,
        camera: str | None = None,
        on_status: StatusCallback | None = None,
        av_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from streamvg.redaction import mask_url

        masked = mask_url(uri)
        super().__init__(masked, camera or "camera", on_status, **kwargs)
        self._uri = uri
        opts = {str(k): str(v) for k, v in (av_options or {}).items()}
        if uri.lower().startswith(("rtsp://", "rtsps://")):
            opts.setdefault("rtsp_transport", "tcp")
        self.av_options = opts
        self.info.backend = "pyav"

    def _connect(self) -> _Connection:
        import av

        container = av.open(
            self._uri, "r", options=self.av_options, timeout=(self.open_timeout_s, self.stall_timeout_s)
        )
        if not container.streams.video:
            container.close()
            raise SourceError(f"stream {self.uri} has no video track")
        s = container.streams.video[0]
        cc = s.codec_context
        rate = s.average_rate or s.guessed_rate
        self.info.codec, self.info.width, self.info.height = cc.name, int(cc.width), int(cc.height)
        self.info.fps = float(rate) if rate else None
        level = lowres_for(cc.name, int(cc.width), int(cc.height), self.max_pixels)
        if level:  # huge MJPEG camera frames: decode small from the start
            cc.options = {**dict(cc.options or {}), "lowres": str(level)}
        return _AVConnection(container, self.stall_timeout_s)

    def _to_rgb(self, raw: Any) -> np.ndarray:
        w, h = fit_within(int(raw.width), int(raw.height), self.max_pixels)
        if (w, h) == (raw.width, raw.height):
            return np.asarray(raw.to_ndarray(format="rgb24"))
        # Downscale inside the RGB conversion: no full-size RGB copy is made.
        return np.asarray(raw.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray())

    def _is_timeout(self, exc: BaseException) -> bool:
        import av

        # PyAV's timeout interrupts FFmpeg, which reports "Immediate exit requested".
        return isinstance(exc, (av.ExitError, TimeoutError)) or "Immediate exit" in str(exc)

    def _describe_failure(self, exc: BaseException, was_up: bool) -> str:
        text = mask_text(str(exc))
        if self._is_timeout(exc):
            if was_up:
                return f"no frame for {self.stall_timeout_s:g} s"
            return f"did not answer within {self.open_timeout_s:g} s"
        if isinstance(exc, ConnectionRefusedError) or "Connection refused" in text:
            return "connection refused"
        # FFmpeg's messages carry an errno-like tag and the URL; say what the user can act on.
        if "returned 401" in text:
            return "the camera refused the username or password (401 Unauthorized); check the credentials in the URL"
        if "returned 403" in text:
            return "the camera refused access (403 Forbidden); check the user's rights on the camera"
        if "returned 404" in text:
            return "the camera has no stream at this path (404 Not Found); check the URL's path"
        return text or type(exc).__name__
