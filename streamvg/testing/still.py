"""Still scenes with activity at known times, for change-gating tests and benchmarks.

`write_still_scene` encodes (H.264, x264) a camera that sees nothing happen most of the
time: a textured background and a parked object, under temporal sensor noise and a slow
brightness drift (auto-exposure, clouds), interrupted by `activity` intervals during which
the object moves to another place (and stays there). `write_still_clip` does the same
with a real clip (`tests/media`): its first frame repeated with noise, and the real frames
playing during the activity intervals. Both return the per-frame ground truth, so a test
knows exactly which sampled frames show activity, and replay records for the replay engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["StillScene", "write_still_clip", "write_still_scene"]

_TB = Fraction(1, 90000)


@dataclass
class StillScene:
    """What `write_still_scene` / `write_still_clip` wrote.

    Attributes:
        video: The encoded file.
        activity: `(start_s, end_s)` intervals of media time during which something moves.
        frames: Per encoded frame: `{"index", "pts", "moving": bool, "box": [x1,y1,x2,y2] | None}`;
            `moving` when the object is not where it was in the previous frame (clips: a
            frame of the clip playing).
        records_path: Replay-engine records (one per frame, the object's box) as JSONL.
    """

    video: Path
    activity: list[tuple[float, float]]
    frames: list[dict[str, Any]]
    records_path: Path

    def active(self, t0: float, t1: float) -> bool:
        """Whether any activity interval overlaps media time `[t0, t1]`."""
        return any(a <= t1 and t0 <= b for a, b in self.activity)


def _encode(path: Path, images: Sequence[NDArray[np.uint8]], fps: float, crf: int) -> list[float]:
    import av

    pts: list[float] = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        h, w = images[0].shape[:2]
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = _TB
        stream.codec_context.time_base = _TB
        stream.options = {"preset": "veryfast", "crf": str(crf), "x264-params": "keyint=50:bframes=2"}
        for i, img in enumerate(images):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts = round(i / fps / _TB)
            frame.time_base = _TB
            pts.append(float(frame.pts * _TB))
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return pts


def _noisy(base: NDArray[np.float32], t: float, rng: np.random.Generator, noise: float, drift: float, period_s: float) -> NDArray[np.uint8]:
    gain = 1.0 + drift * np.sin(2 * np.pi * t / period_s)  # slow lighting drift
    img = base * gain + rng.standard_normal(base.shape, dtype=np.float32) * noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(out_dir: Path, name: str, images: list[NDArray[np.uint8]], meta: list[tuple[bool, list[float] | None]],
           fps: float, crf: int, activity: list[tuple[float, float]]) -> StillScene:
    out_dir.mkdir(parents=True, exist_ok=True)
    video = out_dir / f"{name}.mp4"
    pts = _encode(video, images, fps, crf)
    frames = [{"index": i, "pts": p, "moving": m, "box": b} for i, (p, (m, b)) in enumerate(zip(pts, meta, strict=True))]
    records = out_dir / f"{name}.answers.jsonl"
    with records.open("w", encoding="utf-8") as fh:
        for f in frames:
            boxes = [] if f["box"] is None else [{"xyxy": f["box"], "score": 0.9, "label": "object"}]
            fh.write(json.dumps({"camera": name, "pts": f["pts"], "query": None, "boxes": boxes}) + "\n")
    return StillScene(video=video, activity=list(activity), frames=frames, records_path=records)


def write_still_scene(
    out_dir: str | Path,
    *,
    name: str = "still",
    duration_s: float = 40.0,
    fps: float = 10.0,
    width: int = 320,
    height: int = 180,
    activity: Sequence[tuple[float, float]] = ((8.0, 12.0), (24.0, 27.0)),
    noise: float = 4.0,
    drift: float = 0.06,
    drift_period_s: float = 30.0,
    crf: int = 26,
    seed: int = 0,
    wander_px_s: float = 0.0,
) -> StillScene:
    """Encode a still scene whose object moves only during `activity` (media seconds).

    Args:
        wander_px_s: During activity, the object also walks back and forth sideways at
            this speed (pixels per second, over a tenth of the frame's width), as a person
            pacing does; 0 keeps it on the straight path between its parking spots.
        noise: Temporal sensor noise, gray levels (one standard deviation) per pixel per frame.
        drift: Relative brightness swing of the slow lighting drift (0.06 = ±6 %).
        drift_period_s: Period of that drift, seconds.
        crf: x264 quality; higher adds more compression flicker.
    """
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(30, 200, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.uint8)
    bg = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    size = max(8, height // 6)
    # Where the object parks, before and after each activity: a walk of about a quarter of
    # the frame, slow enough (at the default intervals) that boxes sampled at 2 fps overlap.
    spots = [(width * 0.3, height * 0.4)]
    for k in range(len(activity)):
        spots.append((width * (0.55 if k % 2 == 0 else 0.35), height * (0.55 if k % 2 == 0 else 0.45)))
    images: list[NDArray[np.uint8]] = []
    meta: list[tuple[bool, list[float] | None]] = []
    for i in range(round(duration_s * fps)):
        t = i / fps
        spot, moving = spots[0], False
        for k, (a, b) in enumerate(activity):
            if t >= b:
                spot = spots[k + 1]
            elif t >= a:
                u = (t - a) / (b - a)
                spot = (spots[k][0] + u * (spots[k + 1][0] - spots[k][0]), spots[k][1] + u * (spots[k + 1][1] - spots[k][1]))
                if wander_px_s > 0:  # a triangle wave that starts and ends at 0
                    amp = width * 0.1
                    phase = ((t - a) * wander_px_s / amp) % 4.0
                    tri = phase if phase < 1 else 2 - phase if phase < 3 else phase - 4
                    spot = (spot[0] + amp * tri * min(1.0, (b - t) * wander_px_s / amp), spot[1])
                moving = True
                break
        base = bg.copy()
        x1, y1 = round(spot[0] - size / 2), round(spot[1] - size / 2)
        base[max(0, y1) : y1 + size, max(0, x1) : x1 + size] = (230, 40, 40)
        images.append(_noisy(base, t, rng, noise, drift, drift_period_s))
        box = [float(x1), float(y1), float(x1 + size), float(y1 + size)]
        # "moving" = the picture differs from the previous frame's (not just "inside an interval").
        meta.append((moving and bool(meta) and meta[-1][1] != box, box))
    return _write(Path(out_dir), name, images, meta, fps, crf, list(activity))


def write_still_clip(
    clip: str | Path,
    out_dir: str | Path,
    *,
    name: str | None = None,
    duration_s: float = 20.0,
    activity: Sequence[tuple[float, float]] = ((6.0, 8.0),),
    noise: float = 3.0,
    drift: float = 0.05,
    crf: int = 26,
    seed: int = 0,
) -> StillScene:
    """A real clip made still: its first frame repeated with noise and drift, and the clip's
    own frames playing (from its start) during each `activity` interval. The records have no
    boxes (nothing in the clip is annotated); `moving` marks the playing frames."""
    import av

    with av.open(str(clip)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or 25)
        real: list[NDArray[np.uint8]] = [np.asarray(f.to_ndarray(format="rgb24"), np.uint8) for f in c.decode(video=0)]
    rng = np.random.default_rng(seed)
    still = real[0].astype(np.float32)
    images: list[NDArray[np.uint8]] = []
    meta: list[tuple[bool, list[float] | None]] = []
    for i in range(round(duration_s * fps)):
        t = i / fps
        playing = next(((t - a) for a, b in activity if a <= t < b), None)
        if playing is None:
            images.append(_noisy(still, t, rng, noise, drift, 30.0))
        else:
            images.append(real[min(len(real) - 1, 1 + round(playing * fps))])
        meta.append((playing is not None, None))
    return _write(Path(out_dir), name or Path(clip).stem + "-still", images, meta, fps, crf, list(activity))
