"""Windows: the frames the grounding engine sees together.

- `windows(frames, size, stride)`: one camera over time, `size` consecutive sampled frames,
  advancing by `stride` frames (stride < size overlaps). At the end of a finite stream the
  last frames not yet covered get one final window (the last `size` frames), so every frame
  is grounded at least once.
- `MultiCameraWindows`: one frame per camera at (nearly) the same instant, matched within
  `tolerance_s` on media time (`clock="pts"`, files) or capture time (`clock="wall"`, live).
  A camera without a frame near that instant is listed in `Window.missing` instead of being
  waited for forever.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

from streamvg.types import Frame, Window

__all__ = ["MultiCameraWindows", "windows"]


def windows(frames: Iterable[Frame], size: int, stride: int) -> Iterator[Window]:
    """Group one camera's frames into sliding windows.

    Args:
        frames: Frames in time order (e.g. a `Source`).
        size: Frames per window.
        stride: Frames the window advances by (1 ≤ stride ≤ size for full coverage).

    Yields:
        `Window`s of `size` frames; at the end, if frames were left uncovered, one more
        window of the last `size` frames (overlapping the previous one; shorter when the
        stream had fewer frames, or when `stride > size` left a gap before them). Memory
        holds one window.

    Example:
        >>> import numpy as np
        >>> img = np.zeros((2, 2, 3), np.uint8)
        >>> fs = [Frame("a", i, i * 0.5, img) for i in range(5)]
        >>> [[f.index for f in w] for w in windows(fs, 3, 2)]
        [[0, 1, 2], [2, 3, 4]]
        >>> [[f.index for f in w] for w in windows(fs, 2, 2)]
        [[0, 1], [2, 3], [3, 4]]
    """
    if size < 1:
        raise ValueError(f"size must be at least 1 frame, got {size}")
    if stride < 1:
        raise ValueError(f"stride must be at least 1 frame, got {stride}")
    buf: deque[Frame] = deque()
    recent: deque[Frame] = deque(maxlen=size)  # the last `size` frames taken
    uncovered = 0  # frames taken since the last emitted window
    skip = 0
    for frame in frames:
        if skip:
            skip -= 1  # stride > size: frames between windows are left out
            continue
        buf.append(frame)
        recent.append(frame)
        uncovered += 1
        if len(buf) == size:
            yield Window(tuple(buf))
            uncovered = 0
            if stride >= size:
                buf.clear()
                skip = stride - size
                if skip:
                    recent.clear()  # never bridge a gap left on purpose
            else:
                for _ in range(stride):
                    buf.popleft()
    if uncovered:
        yield Window(tuple(recent))


class MultiCameraWindows:
    """Align one frame per camera into multi-camera windows.

    Frames are `push`ed as they come (from several threads: guard with a lock). A group is
    formed around the earliest pending frame (the anchor): each other camera contributes its
    frame closest in time within `tolerance_s`, or is listed as missing. A group is emitted
    once every camera has shown a frame later than `anchor + tolerance_s` (so no better
    match can come), or has ended (`flush(camera)`), or — with the wall clock — once frames
    more than `max_wait_s` newer than the anchor arrived from another camera (a dead camera
    does not hold the others back). Frames matched into no group are dropped.

    Args:
        cameras: Camera names, in the order frames appear in each window.
        tolerance_s: Largest time difference between frames of one window (seconds).
        clock: "pts" (media time; files) or "wall" (capture time; live).
        max_wait_s: Wall clock only: how long a group waits for a late camera (seconds;
            default `2 * tolerance_s`). Raising it tolerates slower cameras but adds latency.
        max_buffer: Frames kept per camera before the oldest group is decided anyway.
        offsets_s: Seconds added to a camera's time before matching (cameras whose files
            start at different moments).

    Example:
        >>> import numpy as np
        >>> img = np.zeros((2, 2, 3), np.uint8)
        >>> mc = MultiCameraWindows(["a", "b"], tolerance_s=0.1)
        >>> out = mc.push(Frame("a", 0, 0.0, img)) + mc.push(Frame("b", 0, 0.04, img))
        >>> out += mc.push(Frame("a", 1, 1.0, img)) + mc.push(Frame("b", 1, 1.02, img))
        >>> [(w.cameras, w.missing) for w in out]
        [(('a', 'b'), ())]
        >>> [(w.cameras, w.missing) for w in mc.flush()]
        [(('a', 'b'), ())]
    """

    def __init__(
        self,
        cameras: Sequence[str],
        *,
        tolerance_s: float,
        clock: Literal["pts", "wall"] = "pts",
        max_wait_s: float | None = None,
        max_buffer: int = 64,
        offsets_s: Mapping[str, float] | None = None,
    ) -> None:
        if not cameras:
            raise ValueError("cameras must name at least one camera")
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"camera names must be unique, got {list(cameras)}")
        if not tolerance_s >= 0:
            raise ValueError(f"tolerance_s must be >= 0 seconds, got {tolerance_s}")
        if clock not in ("pts", "wall"):
            raise ValueError(f"clock must be 'pts' or 'wall', got {clock!r}")
        self.cameras = tuple(cameras)
        self.tolerance_s = float(tolerance_s)
        self.clock = clock
        self.max_wait_s = 2 * self.tolerance_s if max_wait_s is None else float(max_wait_s)
        self.max_buffer = max(1, max_buffer)
        self.offsets_s = dict(offsets_s or {})
        self._buf: dict[str, deque[tuple[float, Frame]]] = {c: deque() for c in self.cameras}
        self._latest: dict[str, float] = {}
        self._ended: set[str] = set()
        self.frames_dropped = 0
        self.windows_made = 0

    def _time(self, frame: Frame) -> float:
        if self.clock == "wall":
            if frame.wall_time is None:
                raise ValueError(
                    f"frame {frame.index} of camera {frame.camera!r} has no wall_time; use clock='pts' for files"
                )
            t = frame.wall_time
        else:
            t = frame.pts
        return t + self.offsets_s.get(frame.camera, 0.0)

    def pending(self, camera: str) -> int:
        """Frames of `camera` waiting for their group."""
        return len(self._buf[camera]) if camera in self._buf else 0

    def push(self, frame: Frame) -> list[Window]:
        """Add one frame; returns the windows that are now complete (often none)."""
        if frame.camera not in self._buf:
            raise ValueError(f"camera {frame.camera!r} is not one of {list(self.cameras)}")
        t = self._time(frame)
        self._buf[frame.camera].append((t, frame))
        self._latest[frame.camera] = max(t, self._latest.get(frame.camera, t))
        self._ended.discard(frame.camera)
        return self._drain(force=False)

    def flush(self, camera: str | None = None) -> list[Window]:
        """Mark `camera` as ended (no more frames) and return what that completes; with no
        camera, every camera has ended: emit everything still pending."""
        if camera is None:
            self._ended.update(self.cameras)
        else:
            if camera not in self._buf:
                raise ValueError(f"camera {camera!r} is not one of {list(self.cameras)}")
            self._ended.add(camera)
        return self._drain(force=camera is None)

    def _drain(self, force: bool) -> list[Window]:
        out: list[Window] = []
        while True:
            heads = [(q[0][0], c) for c, q in self._buf.items() if q]
            if not heads:
                return out
            t0, anchor_cam = min(heads)
            newest = max(self._latest.values())
            ready = True
            if not force:
                for c in self.cameras:
                    if c == anchor_cam or c in self._ended:
                        continue
                    if self._latest.get(c, float("-inf")) > t0 + self.tolerance_s:
                        continue
                    if len(self._buf[c]) >= self.max_buffer or len(self._buf[anchor_cam]) >= self.max_buffer:
                        continue
                    if self.clock == "wall" and newest > t0 + self.tolerance_s + self.max_wait_s:
                        continue
                    ready = False
                    break
            if not ready:
                return out
            chosen: dict[str, Frame] = {}
            missing: list[str] = []
            for c in self.cameras:
                q = self._buf[c]
                best_i = -1
                best_d = self.tolerance_s + 1e-9
                for i, (t, _f) in enumerate(q):
                    d = abs(t - t0)
                    if d <= best_d and (best_i < 0 or d < best_d):
                        best_i, best_d = i, d
                    if t > t0 + self.tolerance_s:
                        break
                if best_i < 0:
                    missing.append(c)
                    # Frames too old to match any later anchor are dropped.
                    while q and q[0][0] < t0 - self.tolerance_s:
                        q.popleft()
                        self.frames_dropped += 1
                    continue
                for _ in range(best_i):
                    q.popleft()
                    self.frames_dropped += 1
                chosen[c] = q.popleft()[1]
            frames = tuple(chosen[c] for c in self.cameras if c in chosen)
            self.windows_made += 1
            out.append(Window(frames, missing=tuple(missing)))
