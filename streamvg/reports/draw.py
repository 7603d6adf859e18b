"""Drawing tracked boxes on RGB frames, and a track's box at any time between its samples.

Grounding runs at a few frames per second, videos play at 25-30: `BoxTrack.box_at` gives a
track's box on every frame in between by linear interpolation of its two neighbouring
samples (exact on a sampled frame), so clips and annotated videos show a box that moves
instead of one that blinks.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = ["BoxTrack", "draw_box", "line_px", "track_colour", "with_caption"]

# Saturated colours that stay distinct after H.264's chroma subsampling (RGB).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 230, 0),
    (0, 230, 255),
    (255, 60, 200),
    (60, 255, 60),
    (255, 140, 0),
    (150, 110, 255),
    (255, 255, 255),
    (0, 140, 255),
)

def line_px(height: int) -> int:
    """Box line width (pixels) for a frame `height` pixels high: at least 4, so that every
    line covers a whole 2x2 chroma block of H.264's 4:2:0 and keeps its colour after
    encoding (a thinner line takes the colour of what is under it); 6 px at 1080p.

    Example:
        >>> line_px(360), line_px(1080)
        (4, 6)
    """
    return max(4, round(height / 180))


def track_colour(*key: object) -> tuple[int, int, int]:
    """A stable RGB colour for a track key (e.g. `(camera, query_id, track_id)`).

    Example:
        >>> track_colour("cam0", "q1", 3) == track_colour("cam0", "q1", 3)
        True
    """
    digest = hashlib.blake2s(repr(key).encode(), digest_size=2).digest()
    return _PALETTE[int.from_bytes(digest, "big") % len(_PALETTE)]


def draw_box(
    image: NDArray[np.uint8], xyxy: Sequence[float], colour: tuple[int, int, int], label: str = "",
    *, thickness: int | None = None,
) -> None:
    """Draw a box (and a label above it) on an RGB `(H, W, 3)` uint8 image, in place.

    The rectangle's outer edge lies on the box edge (`x1, y1` to `x2, y2` in pixels, x2/y2
    exclusive as in the ground truth), so the line covers the box's own border pixels.
    """
    import cv2

    h, w = image.shape[:2]
    x1, y1, x2, y2 = (round(float(v)) for v in xyxy)
    x1, y1 = max(0, min(w - 1, x1)), max(0, min(h - 1, y1))
    x2, y2 = max(0, min(w - 1, x2 - 1)), max(0, min(h - 1, y2 - 1))
    if x2 < x1 or y2 < y1:
        return
    t = max(1, thickness if thickness is not None else line_px(h))
    # Filled bands instead of cv2.rectangle(thickness=t), whose line is centred on the edge.
    image[y1 : min(y1 + t, y2 + 1), x1 : x2 + 1] = colour
    image[max(y2 - t + 1, y1) : y2 + 1, x1 : x2 + 1] = colour
    image[y1 : y2 + 1, x1 : min(x1 + t, x2 + 1)] = colour
    image[y1 : y2 + 1, max(x2 - t + 1, x1) : x2 + 1] = colour
    if label:
        scale = max(0.35, min(0.6, h / 720))
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y1 - 3 if y1 - th - base - 3 >= 0 else min(h - 1, y2 + th + 3)
        tx = max(0, min(x1, w - tw - 1))
        cv2.rectangle(image, (tx, ty - th - 2), (tx + tw + 2, ty + base - 1), (0, 0, 0), -1)
        cv2.putText(image, label, (tx + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def with_caption(image: NDArray[np.uint8], text: str) -> NDArray[np.uint8]:
    """`image` with a black strip below it holding `text` in white (the picture itself
    stays untouched, so no caption ever hides a box). The strip's height keeps the total
    height even (H.264 4:2:0)."""
    import cv2

    h, w = image.shape[:2]
    scale = max(0.35, min(0.6, h / 720))
    (_tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    strip_h = th + base + 6
    strip_h += (h + strip_h) % 2
    out = np.zeros((h + strip_h, w, 3), dtype=np.uint8)
    out[:h] = image
    cv2.putText(out, text, (3, h + strip_h - base - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


class BoxTrack:
    """A track's boxes at its sampled times, and its box at any time in between.

    Args:
        times: Media seconds of the samples (any order; sorted here).
        boxes: `x1, y1, x2, y2` per sample, frame pixels.
        max_gap_s: Samples further apart than this are not bridged (the object was
            away): no box is drawn between them. Larger fills longer gaps, at the risk of
            drawing a box over a stretch where the object was not seen.
        tolerance_s: How close a frame time must be to a sample to get its box exactly,
            and how far before the first / after the last sample a box is still drawn.

    Example:
        >>> tr = BoxTrack([0.0, 1.0], [[0, 0, 10, 10], [10, 0, 20, 10]])
        >>> tr.box_at(0.5)
        [5.0, 0.0, 15.0, 10.0]
        >>> tr.box_at(2.0) is None
        True
    """

    def __init__(
        self, times: Sequence[float], boxes: Sequence[Sequence[float]], *, max_gap_s: float = 2.0,
        tolerance_s: float = 1e-3,
    ) -> None:
        order = sorted(range(len(times)), key=lambda i: times[i])
        self.times = [float(times[i]) for i in order]
        self.boxes = [[float(v) for v in boxes[i]] for i in order]
        self.max_gap_s = float(max_gap_s)
        self.tolerance_s = float(tolerance_s)

    @property
    def start(self) -> float:
        return self.times[0] if self.times else 0.0

    @property
    def end(self) -> float:
        return self.times[-1] if self.times else 0.0

    def box_at(self, t: float) -> list[float] | None:
        """The box at media time `t` (s), or None outside the track or across a long gap."""
        if not self.times:
            return None
        tol = self.tolerance_s
        if t < self.times[0] - tol or t > self.times[-1] + tol:
            return None
        i = bisect.bisect_left(self.times, t - tol)
        if i < len(self.times) and abs(self.times[i] - t) <= tol:
            return list(self.boxes[i])
        if i == 0 or i >= len(self.times):
            return None
        t0, t1 = self.times[i - 1], self.times[i]
        if t1 - t0 > self.max_gap_s:
            return None
        a = (t - t0) / (t1 - t0)
        b0, b1 = self.boxes[i - 1], self.boxes[i]
        return [p + a * (q - p) for p, q in zip(b0, b1, strict=True)]
