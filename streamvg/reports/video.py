"""Reading every frame of a stretch of a video file and writing H.264 MP4, through PyAV.

Reports need every frame (clips and annotated videos play at the source's rate), not the
sampled frames the pipeline grounded, so they decode the file again here. Frame times come
from the container (PTS), as everywhere in StreamVG.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamvg.errors import SourceError, SourceNotFoundError, UnsupportedSourceError
from streamvg.redaction import mask_text

__all__ = ["VideoWriter", "read_frames"]

_TIME_BASE = Fraction(1, 90000)


def _open(path: str | os.PathLike[str]) -> Any:
    import av

    p = Path(path)
    if "://" in str(path):
        raise UnsupportedSourceError(
            f"{mask_text(str(path))} is a stream, not a file; clips and annotated videos need a video file",
            source=mask_text(str(path)),
        )
    if not p.is_file():
        raise SourceNotFoundError(f"{p}: no such video file; check the path", source=str(p))
    try:
        container = av.open(str(p))
    except Exception as exc:  # PyAV raises many kinds (InvalidDataError, OSError, ...)
        raise UnsupportedSourceError(
            f"{p} is not a video file StreamVG can read ({exc.__class__.__name__}); give an MP4/MKV/... file",
            source=str(p),
        ) from exc
    if not container.streams.video:
        container.close()
        raise UnsupportedSourceError(f"{p} has no video stream; give a video file", source=str(p))
    return container


def read_frames(
    path: str | os.PathLike[str], start_s: float | None = None, end_s: float | None = None
) -> Iterator[tuple[int | None, float, NDArray[np.uint8]]]:
    """Decode the frames of `path` with `start_s <= pts <= end_s`, in presentation order.

    Yields `(index, pts, image)`: `index` is the frame number in the file when decoding
    started at the beginning (None after a seek, where it is unknown), `pts` media seconds,
    `image` `(H, W, 3)` RGB uint8. Seeks to the keyframe before `start_s` when given.

    Raises:
        SourceError: the file is missing, not a video, or breaks while decoding.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base or _TIME_BASE
        counting = not start_s or start_s <= 0
        if not counting:
            assert start_s is not None
            container.seek(max(0, int(start_s / tb)), stream=stream, backward=True, any_frame=False)
        index = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * tb)
                if end_s is not None and t > end_s + 1e-6:
                    break
                if start_s is not None and t < start_s - 1e-6:
                    index += 1
                    continue
                yield (index if counting else None), t, frame.to_ndarray(format="rgb24")
                index += 1
        except SourceError:
            raise
        except Exception as exc:
            if exc.__class__.__module__.startswith("av"):
                raise SourceError(
                    f"{path} could not be decoded past {index} frames ({exc.__class__.__name__}); "
                    "the file may be truncated or corrupt",
                    source=str(path),
                ) from exc
            raise
    finally:
        container.close()


class VideoWriter:
    """Write RGB frames with their media times as an H.264 (yuv420p) MP4.

    Args:
        path: Output file (folders are created).
        width, height: Frame size; odd sizes are cropped by one pixel (4:2:0 needs even).
        fps: Nominal rate written in the header; each frame keeps the time it is given.
        crf: x264 quality (lower is larger and truer; 23 is x264's default).
        preset: x264 speed preset; "veryfast" trades a little size for speed.

    Example:
        with VideoWriter("clip.mp4", 640, 360, fps=25) as w:
            w.write(image, t=0.04)
    """

    def __init__(
        self, path: str | os.PathLike[str], width: int, height: int, *, fps: float = 25.0,
        crf: int = 23, preset: str = "veryfast",
    ) -> None:
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.width, self.height = width - width % 2, height - height % 2
        if self.width < 2 or self.height < 2:
            raise ValueError(f"frame size {width}x{height} is too small for H.264")
        self._container: Any = av.open(str(self.path), "w")
        rate = Fraction(fps if fps > 0 else 25.0).limit_denominator(1001)
        self._stream = self._container.add_stream("libx264", rate=rate)
        self._stream.width, self._stream.height, self._stream.pix_fmt = self.width, self.height, "yuv420p"
        self._stream.time_base = _TIME_BASE
        self._stream.codec_context.time_base = _TIME_BASE
        self._stream.options = {"preset": preset, "crf": str(crf)}
        self._last_tick = -1
        self.frames = 0

    def write(self, image: NDArray[np.uint8], t: float) -> None:
        """Add one frame shown from media time `t` (s); times must increase."""
        import av

        tick = max(round(t * 90000), self._last_tick + 1)  # strictly increasing PTS
        self._last_tick = tick
        img = np.ascontiguousarray(image[: self.height, : self.width])
        frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
        frame.pts = tick
        frame.time_base = _TIME_BASE
        self._container.mux(self._stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        if self._container is None:
            return
        try:
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
