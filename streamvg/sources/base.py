"""What every source shares: `Source`, its `SourceInfo`, `SourceStats` and `SourceStatus`.

A source is an iterator of `Frame` with `close()`; it is also a context manager. File
sources end when the file does; live sources and devices run until closed, reconnecting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Literal

from streamvg.types import Frame

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Snap",
    "Source",
    "SourceInfo",
    "SourceState",
    "SourceStats",
    "SourceStatus",
    "StatusCallback",
    "fit_within",
    "lowres_for",
]

log = logging.getLogger("streamvg.sources")

Snap = Literal["exact", "keyframe"]

#: Frames with more pixels than this are downscaled on decode (3840×2160, 4K UHD). Models
#: resize to far less anyway; the guard keeps a huge frame (a 16000×16000 MJPEG is 768 MB in
#: RGB) from costing gigabytes before anything looks at it.
DEFAULT_MAX_PIXELS = 3840 * 2160

# Decoders that can decode at 1/2, 1/4, 1/8 size (FFmpeg's `lowres`), never holding the
# full-size picture: the deepest reduction each supports.
_LOWRES_MAX = {"mjpeg": 3}


def fit_within(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """The size `width`×`height` scaled down to at most `max_pixels` pixels, aspect kept.

    Unchanged when it already fits (or `max_pixels` is None); otherwise both sides shrink by
    the same factor and are rounded down to even numbers (what YUV 4:2:0 scalers want).

    Example:
        >>> fit_within(16000, 16000, 3840 * 2160)
        (2880, 2880)
        >>> fit_within(1280, 720, 3840 * 2160)
        (1280, 720)
    """
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def lowres_for(codec: str, width: int, height: int, max_pixels: int | None) -> int:
    """FFmpeg `lowres` level (0 = full size) that decodes a too-big frame at a reduced size.

    The deepest level whose picture still has at least `max_pixels` pixels, so the final
    resize to `max_pixels` loses nothing a full-size decode would have kept; 0 for codecs
    without `lowres` support (they decode at full size and are resized after).
    """
    if max_pixels is None or width * height <= max_pixels:
        return 0
    level = 0
    while level < _LOWRES_MAX.get(codec, 0) and (-(-width >> (level + 1))) * (-(-height >> (level + 1))) >= max_pixels:
        level += 1
    return level
SourceState = Literal["connecting", "up", "down", "stalled", "ended"]


@dataclass(frozen=True)
class SourceStatus:
    """A change of a source's state, handed to `on_status`.

    Attributes:
        camera: The source's camera name.
        uri: The source URI with any password masked.
        state: "connecting" (opening), "up" (frames flow), "down" (lost; will retry),
            "stalled" (connected but no frame for `stall_timeout_s`; will reconnect),
            "ended" (a file finished, or a live source gave up).
        wall_time: Unix seconds when the state changed.
        detail: One sentence on why (masked), e.g. the error that took the camera down.
    """

    camera: str
    uri: str
    state: SourceState
    wall_time: float
    detail: str = ""


StatusCallback = Callable[[SourceStatus], None]


@dataclass
class SourceStats:
    """Counters of one source (read them any time; they only grow).

    Attributes:
        frames_in: Frames handed to the consumer.
        frames_dropped: Frames decoded but never handed over because the consumer was
            slower than the stream (live "freshest" policy); always 0 for files.
        frames_decoded: Frames the decoder produced (including ones not sampled).
        reconnects: Times a live source came back up after being down or stalled.
    """

    frames_in: int = 0
    frames_dropped: int = 0
    frames_decoded: int = 0
    reconnects: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class SourceInfo:
    """What is known about the stream.

    Attributes:
        codec: Codec name, e.g. "h264".
        width, height: Frame size in pixels.
        fps: Nominal (average) frame rate, or None when unknown.
        duration_s: Length in seconds (files), None for live streams.
        keyframe_interval_s: Median time between keyframes (files), None when unknown.
        frames: Number of frames in a file, None when unknown.
        backend: Which reader decodes: "pyav", "decord" or "opencv".
        timestamps: Where a file's frame times come from: "container" (its `pts`),
            "best_effort" (FFmpeg's best-effort times, carried across restarts: the
            container's could not be trusted) or "frame_index" (none stored: index / fps).
    """

    codec: str = ""
    width: int = 0
    height: int = 0
    fps: float | None = None
    duration_s: float | None = None
    keyframe_interval_s: float | None = None
    frames: int | None = None
    backend: str = ""
    timestamps: str = "container"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _StatusEmitter:
    """Calls `on_status` (never letting its exceptions kill the reader) and logs."""

    camera: str
    uri: str
    callback: StatusCallback | None
    state: SourceState | None = None
    history: list[SourceStatus] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, state: SourceState, detail: str = "") -> None:
        status = SourceStatus(self.camera, self.uri, state, time.time(), detail)
        with self._lock:
            self.state = state
            self.history.append(status)
            if len(self.history) > 256:
                del self.history[:128]
        level = logging.WARNING if state in ("down", "stalled") else logging.INFO
        log.log(level, "camera %s (%s): %s%s", self.camera, self.uri, state, f": {detail}" if detail else "")
        if self.callback is not None:
            try:
                self.callback(status)
            except Exception:
                log.exception("camera %s: the on_status callback raised", self.camera)


class Source:
    """An iterator of `Frame` from one file, stream or device.

    Attributes:
        camera: Camera name put on every frame.
        uri: The URI with any password masked (safe to log).
        info: `SourceInfo` (filled once the stream is open).
        stats: `SourceStats` counters.
    """

    camera: str
    uri: str
    info: SourceInfo
    stats: SourceStats

    def __init__(self, uri_masked: str, camera: str, on_status: StatusCallback | None) -> None:
        self.uri = uri_masked
        self.camera = camera
        self.info = SourceInfo()
        self.stats = SourceStats()
        self._status = _StatusEmitter(camera, uri_masked, on_status)

    @property
    def state(self) -> SourceState | None:
        """The last state reported through `on_status` (None before the first)."""
        return self._status.state

    @property
    def status_history(self) -> list[SourceStatus]:
        """Recent status changes, oldest first (a bounded list)."""
        return list(self._status.history)

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> Source:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(camera={self.camera!r}, uri={self.uri!r}, state={self.state})"
