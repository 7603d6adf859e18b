"""Change gating: the stage between windows and grounding that skips what did not change.

```
 windows ──▶ ChangeGate.check(window, queries) ──▶ ground: the engine answers every query
                                               └─▶ carry over: trackers hold, the last answer repeats
```

A camera watching an empty corridor should cost almost nothing. Each sampled frame is
compared with the **reference** of its camera, the newest frame that was grounded:

1. both are downscaled to `width` pixels (area averaging: sensor noise averages out, a
   4×4 block of noise with σ = 4 gray levels becomes σ = 1), turned to grayscale and
   lightly blurred (σ = 1 cell, for frames that were already small);
2. the frame's brightness and contrast are matched to the reference's (mean and standard
   deviation), so slow lighting drift, auto-exposure and compression flicker of the whole
   picture do not count;
3. a cell is changed when it differs by more than `pixel_threshold` gray levels; the frame
   changed when more than `min_changed_fraction` of the cells did.

A window is **unchanged** when none of its new frames (those after the reference) changed,
every query asked of it was asked of the reference too (a query added while the scene is
still is answered at once), and the reference is younger than `max_unchanged_s` media
seconds. Otherwise it is grounded for every query (the shared visual prefix makes the
other queries cheap) and its newest frame per camera becomes the reference. Comparing with
the last *grounded* frame rather than the previous one means slow change accumulates
until it counts, instead of slipping through in small steps.

The trade-off is in the two thresholds: lower ones see fainter, smaller changes but let
more noise through (more windows grounded); higher ones save more model work but may
carry an answer over a small change until `max_unchanged_s` forces a look.

Example:
    >>> import numpy as np
    >>> from streamvg.config import GatingConfig
    >>> from streamvg.types import Frame, Window
    >>> rng = np.random.default_rng(0)
    >>> still = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    >>> w = lambda i, img: Window((Frame(camera="c", index=i, pts=float(i), image=img),))
    >>> gate = ChangeGate(GatingConfig(enabled=True))
    >>> gate.check(w(0, still), {"q"}).ground, gate.check(w(1, still), {"q"}).ground
    (True, False)
    >>> moved = still.copy(); moved[10:40, 10:40] = 255
    >>> gate.check(w(2, moved), {"q"}).reason
    'changed'
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from streamvg.config import GatingConfig
from streamvg.types import Frame, Window

__all__ = ["ChangeGate", "GateDecision", "GateReason", "changed_fraction", "signature"]

GateReason = Literal["first", "changed", "new_query", "max_unchanged", "unchanged"]
F32 = NDArray[np.float32]


def signature(image: NDArray[np.uint8], width: int = 160) -> F32:
    """The frame as the gate compares it: `(h, width)` float32 grayscale, area-downscaled.

    Args:
        image: `(H, W, 3)` uint8 RGB (a `Frame.image`).
        width: Target width in pixels (never upscaled); the height keeps the aspect ratio.
    """
    h, w = image.shape[:2]
    sw = max(1, min(width, w))
    sh = max(1, round(h * sw / w))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA) if (sw, sh) != (w, h) else image
    gray = cv2.cvtColor(np.ascontiguousarray(small), cv2.COLOR_RGB2GRAY) if small.ndim == 3 else small
    # A light blur (sigma 1 cell) averages what downscaling could not (frames already about
    # `width` wide): it cuts per-cell sensor noise and block flicker about 3.5x.
    return np.asarray(cv2.GaussianBlur(gray.astype(np.float32), (5, 5), 1.0), np.float32)


def changed_fraction(reference: F32, current: F32, pixel_threshold: float = 12.0) -> float:
    """Fraction of cells of `current` that differ from `reference` by more than
    `pixel_threshold` gray levels, after matching `current`'s mean and standard deviation
    to `reference`'s (so a global brightness or contrast change counts as no change).

    Signatures of different shapes (the camera changed resolution) are fully changed: 1.0.
    """
    if reference.shape != current.shape:
        return 1.0
    mr, sr = float(reference.mean()), float(reference.std())
    mc, sc = float(current.mean()), float(current.std())
    gain = sr / sc if sc > 1e-3 and sr > 1e-3 else 1.0
    diff = np.abs((current - mc) * gain + (mr - reference))
    return float(np.count_nonzero(diff > pixel_threshold)) / float(diff.size)


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided for one window.

    Attributes:
        ground: Send the window to the engine (for every query).
        reason: `first` (no reference yet for a camera), `changed`, `new_query` (a query
            the reference was not grounded for), `max_unchanged` (the reference is older
            than `max_unchanged_s`), or `unchanged` (carried over).
        change: The largest changed fraction among the window's new frames (0 when none
            was compared).
    """

    ground: bool
    reason: GateReason
    change: float = 0.0


@dataclass
class _Reference:
    signature: F32
    pts: float
    queries: frozenset[str]


class ChangeGate:
    """Per-camera change gate in front of the engine (see the module docstring).

    Args:
        config: Thresholds and `max_unchanged_s` (`streamvg.config.GatingConfig`); the gate
            runs whatever `config.enabled` says (callers decide with `config.active`).
        cache_frames: Signatures kept for frames that overlapping windows share.

    Call `check` for windows in the order they are grounded; it moves the reference when
    it decides to ground. `forget(camera)` (grounding failed, the camera restarted) makes
    the next window of that camera be grounded.
    """

    def __init__(self, config: GatingConfig | None = None, *, cache_frames: int = 256) -> None:
        self.config = config or GatingConfig()
        self._refs: dict[str, _Reference] = {}
        self._sigs: OrderedDict[tuple[str, int, float], F32] = OrderedDict()
        self._cache_frames = cache_frames
        self._lock = threading.Lock()

    def _signature(self, frame: Frame) -> F32:
        key = (frame.camera, frame.index, frame.pts)
        sig = self._sigs.get(key)
        if sig is None:
            sig = self._sigs[key] = signature(frame.image, self.config.width)
            if len(self._sigs) > self._cache_frames:
                self._sigs.popitem(last=False)
        return sig

    def check(self, window: Window, queries: Iterable[str]) -> GateDecision:
        """Decide whether `window` must be grounded for `queries` (their ids)."""
        wanted = frozenset(queries)
        c = self.config
        with self._lock:
            decision = self._decide(window, wanted, c)
            if decision.ground:
                newest: dict[str, Frame] = {}
                for f in window.frames:
                    if f.camera not in newest or f.pts >= newest[f.camera].pts:
                        newest[f.camera] = f
                for cam, f in newest.items():
                    self._refs[cam] = _Reference(self._signature(f), f.pts, wanted)
            return decision

    def _decide(self, window: Window, wanted: frozenset[str], c: GatingConfig) -> GateDecision:
        worst = 0.0
        reason: GateReason | None = None
        for f in window.frames:
            ref = self._refs.get(f.camera)
            if ref is None:
                return GateDecision(True, "first")
            if not wanted <= ref.queries:
                reason = reason or "new_query"
            if f.pts <= ref.pts:
                continue  # grounded already (an overlapping window held it)
            if f.pts - ref.pts >= c.max_unchanged_s:
                reason = reason or "max_unchanged"
            change = changed_fraction(ref.signature, self._signature(f), c.pixel_threshold)
            worst = max(worst, change)
            if change > c.min_changed_fraction:
                return GateDecision(True, "changed", change)
        if reason is not None:
            return GateDecision(True, reason, worst)
        return GateDecision(False, "unchanged", worst)

    def forget(self, camera: str) -> None:
        """Drop `camera`'s reference: its next window is grounded."""
        with self._lock:
            self._refs.pop(camera, None)

    def forget_query(self, query_id: str) -> None:
        """A query was removed: if it comes back, it is grounded at once."""
        with self._lock:
            for ref in self._refs.values():
                ref.queries = ref.queries - {query_id}
