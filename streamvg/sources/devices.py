"""Local capture devices (`/dev/videoN` or an index) read with OpenCV.

Reading runs on the same reader thread and freshest hand-off as network streams (see
`streamvg.sources.live`): a device that disappears is reported "down" and reopened with
backoff. OpenCV gives BGR; frames are converted to RGB only when handed out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamvg.errors import SourceError
from streamvg.sources.base import StatusCallback, fit_within
from streamvg.sources.live import ThreadedSource, _Connection

__all__ = ["DeviceSource"]

_PROPS = {"width": "CAP_PROP_FRAME_WIDTH", "height": "CAP_PROP_FRAME_HEIGHT", "fps": "CAP_PROP_FPS"}


class _CVConnection(_Connection):
    def __init__(self, cap: Any) -> None:
        self.cap = cap

    def frames(self) -> Iterator[tuple[float | None, Any]]:
        import cv2

        # Media time from the device's own clock (POS_MSEC) relative to its first frame;
        # devices without one report 0 (or a constant), and then the arrival time counts.
        first_ms: float | None = None
        t0 = 0.0
        while True:
            ok, img = self.cap.read()
            if not ok or img is None:
                return
            now = time.monotonic()
            ms = float(self.cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
            if first_ms is None:
                first_ms, t0 = ms, now
                yield 0.0, img
            else:
                yield ((ms - first_ms) / 1000.0 if ms > first_ms else now - t0), img

    def close(self) -> None:
        self.cap.release()


class DeviceSource(ThreadedSource):
    """A webcam or capture card through OpenCV.

    Args:
        device: Device path (`/dev/video0`) or index (0).
        camera: Camera name (default "video0" style).
        cv_options: Capture properties to request: `width`, `height` (pixels), `fps`.
        Other arguments: see `ThreadedSource`.
    """

    def __init__(
        self,
        device: str | int,
        *,
        camera: str | None = None,
        on_status: StatusCallback | None = None,
        cv_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        name = f"video{device}" if isinstance(device, int) else str(device).rsplit("/", 1)[-1]
        super().__init__(str(device), camera or name, on_status, **kwargs)
        self.device = device
        unknown = set(cv_options or {}) - set(_PROPS)
        if unknown:
            raise ValueError(f"unknown device option(s) {sorted(unknown)}; use {sorted(_PROPS)}")
        self.cv_options = dict(cv_options or {})
        self.info.backend = "opencv"

    def _connect(self) -> _Connection:
        import cv2

        cap = cv2.VideoCapture(self.device)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"capture device {self.device} could not be opened; check that it is connected "
                "and not in use by another program"
            )
        for key, value in self.cv_options.items():
            cap.set(getattr(cv2, _PROPS[key]), float(value))
        self.info.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.info.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.info.fps = fps or None
        self.info.codec = "raw"
        return _CVConnection(cap)

    def _to_rgb(self, raw: Any) -> np.ndarray:
        import cv2

        h, w = raw.shape[:2]
        size = fit_within(int(w), int(h), self.max_pixels)
        if size != (w, h):  # resize the BGR frame first: the colour conversion then is small
            raw = cv2.resize(raw, size, interpolation=cv2.INTER_AREA)
        return np.asarray(cv2.cvtColor(raw, cv2.COLOR_BGR2RGB))
