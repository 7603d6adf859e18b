"""Frame ingest: `open_source(uri)` → an iterator of RGB `Frame`s from a file, stream or device.

| URI | backend | sampling |
| --- | --- | --- |
| a file path (MP4, MKV, MOV, AVI, WebM, TS, …) | PyAV with seeks (or decord, `backend="decord"`) | by container PTS, `exact` or `keyframe` |
| `rtsp://`, `rtsps://`, `http(s)://`, `tcp://`, `udp://`, `rtmp://`, `*.m3u8` | PyAV on a reader thread | freshest frame at the target fps; reconnects forever |
| `/dev/videoN` or a device index (`0`) | OpenCV on a reader thread | as live |

Example:
    >>> import tempfile
    >>> from streamvg.testing.synthetic import write_scene
    >>> scene = write_scene(tempfile.mkdtemp(), duration_s=2.0, width=160, height=96)
    >>> with open_source(str(scene.cameras["cam0"]), fps=1.0, camera="cam0") as src:
    ...     [(f.index, f.pts, f.image.shape) for f in src]
    [(0, 0.0, (96, 160, 3)), (25, 1.0, (96, 160, 3))]
"""

from __future__ import annotations

import os
import re
from typing import Any

from streamvg.errors import ConfigError, SourceNotFoundError, UnsupportedSourceError
from streamvg.redaction import mask_url
from streamvg.sources.base import (
    DEFAULT_MAX_PIXELS,
    Snap,
    Source,
    SourceInfo,
    SourceState,
    SourceStats,
    SourceStatus,
    StatusCallback,
)
from streamvg.sources.devices import DeviceSource
from streamvg.sources.files import FileSource
from streamvg.sources.live import LiveSource, ThreadedSource

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "LIVE_SCHEMES",
    "DeviceSource",
    "FileSource",
    "LiveSource",
    "Snap",
    "Source",
    "SourceInfo",
    "SourceState",
    "SourceStats",
    "SourceStatus",
    "StatusCallback",
    "ThreadedSource",
    "is_live",
    "open_source",
]

LIVE_SCHEMES = ("rtsp", "rtsps", "http", "https", "tcp", "udp", "rtmp", "rtmps", "srt")
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
_THREADED_KEYS = {
    "queue_size", "stall_timeout_s", "open_timeout_s", "backoff_initial_s", "backoff_max_s", "max_reconnects",
}
_FILE_KEYS = {"backend", "threads", "batch_size"}
_DEVICE_KEYS = {"width": "width", "height": "height", "capture_fps": "fps"}


def _kind(uri: str) -> str:
    u = uri.strip()
    if u.isdigit() or u.startswith("/dev/video"):
        return "device"
    m = _SCHEME_RE.match(u)
    if m:
        scheme = m.group(1).lower()
        if scheme in LIVE_SCHEMES:
            return "live"
        if scheme == "file":
            return "file"
        raise UnsupportedSourceError(
            f"Source {mask_url(u)}: the scheme '{scheme}://' is not supported; use a file path, "
            "rtsp://, rtsps://, http(s)://, tcp://, udp://, rtmp://, an .m3u8 URL, /dev/videoN or a device index.",
            source=mask_url(u),
        )
    if u.lower().split("?", 1)[0].endswith(".m3u8"):
        return "live"
    return "file"


def is_live(uri: str | int) -> bool:
    """True for network streams and devices (they run until closed and use the freshest policy)."""
    return isinstance(uri, int) or _kind(str(uri)) in ("live", "device")


def _default_camera(uri: str, kind: str) -> str:
    if kind == "file":
        return os.path.splitext(os.path.basename(uri.rstrip("/")))[0] or "camera"
    if kind == "device":
        return f"video{uri}" if uri.isdigit() else uri.rsplit("/", 1)[-1]
    host = re.sub(r"^[a-zA-Z0-9+.\-]*://([^@/]*@)?", "", uri).split("/", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", host) or "camera"


def open_source(
    uri: str | int | os.PathLike[str],
    *,
    fps: float | None = None,
    snap: Snap = "exact",
    tolerance_s: float | None = None,
    camera: str | None = None,
    on_status: StatusCallback | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    **options: Any,
) -> Source:
    """Open a video file, network stream or capture device as an iterator of `Frame`.

    Args:
        uri: File path, stream URL (credentials allowed; masked everywhere) or device.
        fps: Frames per second to hand out (None = every frame). Files sample by PTS.
        snap: Files only. "exact": the frame at or just after each sample time.
            "keyframe": the nearest keyframe within `tolerance_s` of each sample time, else
            the cheapest frame within it (the earliest), decoding far less.
        tolerance_s: Keyframe snap tolerance in seconds (default half the sampling period).
        camera: Name put on frames and status events (default: from the URI).
        on_status: Called with each `SourceStatus` change (files: "ended"; live:
            "connecting", "up", "down", "stalled", and "ended" when giving up).
        max_pixels: Frames with more pixels are downscaled on decode to at most this many,
            aspect kept (None = never; default 3840×2160, `sampling.max_frame_pixels`).
        **options: Backend options. Files: `backend` ("pyav" | "decord" | "auto"),
            `threads`, `batch_size`. Live and devices: `queue_size`, `stall_timeout_s`,
            `open_timeout_s`, `backoff_initial_s`, `backoff_max_s`, `max_reconnects`
            (None = forever), `reconnect` (False = give up at the first failure).
            Live: any other key is an FFmpeg input option (`rtsp_transport: udp`).
            Devices: `width`, `height`, `capture_fps`.

    Returns:
        A started `Source` (live readers are already connecting).

    Raises:
        SourceNotFoundError: The file or device does not exist.
        UnsupportedSourceError: Not a video, or an unsupported URL scheme.
        ConfigError: An option is unknown for this kind of source.
    """
    if snap not in ("exact", "keyframe"):
        raise ConfigError(f"snap must be 'exact' or 'keyframe', got {snap!r}", field="sampling.snap")
    if fps is not None and not fps > 0:
        raise ConfigError(f"fps must be a positive number of frames per second, got {fps}", field="sampling.fps")
    text = str(os.fspath(uri)) if not isinstance(uri, int) else str(uri)
    if not text.strip():
        raise SourceNotFoundError("The source URI is empty; give a file path, a stream URL or a device.", source="")
    kind = _kind(text)
    cam = camera or _default_camera(mask_url(text), kind)
    if kind == "file":
        unknown = set(options) - _FILE_KEYS
        if unknown:
            raise ConfigError(
                f"Source {cam}: unknown option(s) {sorted(unknown)} for a video file; known: {sorted(_FILE_KEYS)}.",
                field="sources.options",
            )
        path = text[len("file://"):] if text.lower().startswith("file://") else text
        return FileSource(path, fps=fps, snap=snap, tolerance_s=tolerance_s, camera=cam, on_status=on_status,
                          max_pixels=max_pixels, **options)

    threaded = {k: options.pop(k) for k in list(options) if k in _THREADED_KEYS}
    if "reconnect" in options and not options.pop("reconnect"):
        threaded["max_reconnects"] = 0
    if kind == "device":
        unknown = set(options) - set(_DEVICE_KEYS)
        if unknown:
            raise ConfigError(
                f"Source {cam}: unknown option(s) {sorted(unknown)} for a capture device; known: "
                f"{sorted(_DEVICE_KEYS) + sorted(_THREADED_KEYS) + ['reconnect']}.",
                field="sources.options",
            )
        if text.startswith("/dev/") and not os.path.exists(text):
            raise SourceNotFoundError(
                f"Capture device {text} does not exist; check that the camera is plugged in (ls /dev/video*).",
                source=text,
            )
        cv_options = {_DEVICE_KEYS[k]: v for k, v in options.items()}
        device: str | int = int(text) if text.isdigit() else text
        return DeviceSource(device, camera=cam, on_status=on_status, fps=fps, cv_options=cv_options,
                            max_pixels=max_pixels, **threaded).start()
    av_options = dict(options.pop("av_options", None) or {})
    av_options.update(options)
    return LiveSource(text, camera=cam, on_status=on_status, fps=fps, av_options=av_options,
                      max_pixels=max_pixels, **threaded).start()
