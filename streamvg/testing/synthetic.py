"""Synthetic video with exact ground truth: moving, labelled, coloured shapes.

`write_scene` draws a small world of shapes (circles and squares in distinct saturated
colours, some bouncing, one entering, one leaving, a grey pillar that occludes them) with
numpy, encodes it to H.264 MP4 with PyAV for one or several cameras, and writes the exact
box of every object in every frame to `ground_truth.json`. Several cameras view the same
world with their own offset, scale and start time, so an object keeps its `id` across
cameras (cross-camera tests). Frame times are chosen here and written into the container
as PTS, so the ground truth's `pts` is exactly what a decoder reads back, also for
variable frame rate and B-frames.

Ground-truth format (`ground_truth.json`)::

    {"cameras": {name: {"video": str, "width": int, "height": int, "start_s": float,
                        "fps": float, "vfr": bool,
                        "frames": [{"index": int, "pts": float,
                                    "objects": [{"id": int, "label": "red circle",
                                                 "color": [r, g, b],
                                                 "xyxy": [x1, y1, x2, y2],
                                                 "visible": float}]}]}}}

`xyxy` is the tight box of the object's drawn pixels (pixel edges, so a one-pixel object at
column 3 has x1=3, x2=4), clipped to the frame; `visible` is the fraction of the object's
full area that is drawn unoccluded inside the frame. Objects are listed only while some part
of them is inside the frame. Scene time of a frame is `start_s + pts`.

Example:
    >>> import tempfile
    >>> scene = write_scene(tempfile.mkdtemp(), cameras=2, duration_s=1.0, width=160, height=96)
    >>> sorted(scene.cameras)
    ['cam0', 'cam1']
    >>> len(scene.ground_truth["cameras"]["cam0"]["frames"])
    25
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "PTS_TIME_BASE",
    "CameraSpec",
    "GroundTruthEngine",
    "ObjectSpec",
    "Scene",
    "cross_camera_objects",
    "cross_camera_specs",
    "identity_scores",
    "replay_records",
    "truth_boxes",
    "write_scene",
]

#: Time base of every synthetic video (90 kHz, the MPEG clock): frame times are whole ticks.
PTS_TIME_BASE = Fraction(1, 90000)

Shape = Literal["circle", "square"]

_PALETTE: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (230, 30, 30)),
    ("blue", (30, 70, 235)),
    ("green", (30, 200, 50)),
    ("yellow", (240, 220, 20)),
    ("magenta", (225, 30, 225)),
    ("cyan", (20, 220, 230)),
    ("orange", (245, 130, 10)),
    ("white", (245, 245, 245)),
]
_BACKGROUND = (38, 38, 42)
_OCCLUDER = (128, 128, 128)


@dataclass(frozen=True)
class ObjectSpec:
    """One shape in the world (world coordinates are the first camera's pixels at scale 1).

    Attributes:
        id: Identity, the same in every camera's ground truth.
        label: What a query would call it, e.g. "red circle".
        color: RGB drawn colour (keep colours distinct so tests can find each object).
        shape: "circle" (diameter `size`) or "square" (side `size`), in world pixels.
        x, y: Top-left corner at scene time 0, world pixels.
        vx, vy: Velocity in world pixels per second.
        bounce: Reflect off the world's borders; False lets it leave (or enter) the view.
        enter_s, leave_s: Scene seconds during which the object exists (`None` = until the end).
    """

    id: int
    label: str
    color: tuple[int, int, int]
    shape: Shape = "circle"
    size: float = 40.0
    x: float = 0.0
    y: float = 0.0
    vx: float = 0.0
    vy: float = 0.0
    bounce: bool = True
    enter_s: float = 0.0
    leave_s: float | None = None

    def box_at(self, t: float, world_w: float, world_h: float) -> tuple[float, float, float, float] | None:
        """World box `(x1, y1, x2, y2)` at scene time `t`, or None when it does not exist."""
        if t < self.enter_s or (self.leave_s is not None and t >= self.leave_s):
            return None
        x = _move(self.x, self.vx, t, world_w - self.size, self.bounce)
        y = _move(self.y, self.vy, t, world_h - self.size, self.bounce)
        return (x, y, x + self.size, y + self.size)


def _move(p0: float, v: float, t: float, hi: float, bounce: bool) -> float:
    p = p0 + v * t
    if not bounce or hi <= 0:
        return p
    period = 2.0 * hi
    p = math.fmod(p, period)
    if p < 0:
        p += period
    return period - p if p > hi else p


@dataclass(frozen=True)
class CameraSpec:
    """One camera's view of the world: camera pixel = (world - offset) * scale.

    Attributes:
        name: Camera name (video file `<name>.mp4`).
        offset: World point `(x, y)` shown at the camera's top-left pixel.
        scale: Zoom; 1.2 shows objects 20 % larger (and less of the world).
        start_s: Scene time of the camera's first frame (its PTS 0).
        width, height: Frame size in pixels (default: the scene's).
    """

    name: str
    offset: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    start_s: float = 0.0
    width: int | None = None
    height: int | None = None


@dataclass
class Scene:
    """What `write_scene` made.

    Attributes:
        out_dir: Folder holding the videos and `ground_truth.json`.
        cameras: Camera name -> video path.
        ground_truth: The ground-truth dict (the format is in this module's docstring).
        ground_truth_path: Path of `ground_truth.json`.
        objects: The world's objects.
    """

    out_dir: Path
    cameras: dict[str, Path]
    ground_truth: dict[str, Any]
    ground_truth_path: Path
    objects: list[ObjectSpec] = field(default_factory=list)


def default_objects(width: int, height: int, duration_s: float, n: int = 4, seed: int = 0) -> list[ObjectSpec]:
    """A world of `n` shapes: bouncing ones, one entering from the left part-way through,
    one leaving through the bottom; speeds scale with the frame size."""
    rng = np.random.default_rng(seed)
    out: list[ObjectSpec] = []
    base = min(width, height)
    for i in range(n):
        name, color = _PALETTE[i % len(_PALETTE)]
        shape: Shape = "circle" if i % 2 == 0 else "square"
        size = float(base * rng.uniform(0.13, 0.2))
        speed = base * rng.uniform(0.25, 0.45)
        ang = rng.uniform(0, 2 * math.pi)
        vx, vy = speed * math.cos(ang), speed * math.sin(ang)
        x = float(rng.uniform(0, width - size))
        y = float(rng.uniform(0, height - size))
        bounce = True
        enter_s = 0.0
        if i == 2:  # enters from the left a third of the way in, crosses, leaves on the right
            enter_s = duration_s / 3.0
            vx, vy = width / max(duration_s * 0.5, 1e-3), 0.0
            x = -size - vx * enter_s
            y = float(rng.uniform(0, height - size))
            bounce = False
        elif i == 3:  # leaves through the bottom
            vx, vy = 0.0, height / max(duration_s * 0.6, 1e-3)
            y = float(rng.uniform(0, height * 0.4))
            bounce = False
        out.append(ObjectSpec(i, f"{name} {shape}", color, shape, size, x, y, vx, vy, bounce, enter_s))
    return out


def _default_cameras(n: int, width: int, height: int) -> list[CameraSpec]:
    specs = []
    for i in range(n):
        dx = (i % 3) * 0.06 * width
        dy = ((i // 3) % 3) * 0.05 * height
        specs.append(CameraSpec(f"cam{i}", offset=(dx, dy), scale=1.0 + 0.1 * (i % 3)))
    return specs


def _frame_ticks(fps: float, duration_s: float, vfr: bool, rng: np.random.Generator) -> list[int]:
    """Frame PTS in 90 kHz ticks covering `[0, duration_s)`."""
    period = 1.0 / fps
    if not vfr:
        n = max(1, round(duration_s * fps))
        return [round(k * period * 90000) for k in range(n)]
    ticks = [0]
    end = round(duration_s * 90000)
    while True:
        step = round(period * float(rng.choice([0.5, 1.0, 1.0, 2.0, 3.0])) * 90000)
        nxt = ticks[-1] + max(step, 1)
        if nxt >= end:
            return ticks
        ticks.append(nxt)


def _raster(shape: Shape, x1: float, y1: float, x2: float, y2: float) -> tuple[int, int, NDArray[np.bool_]]:
    """Pixel mask of a shape whose bounding box is `(x1, y1, x2, y2)` (camera pixels,
    unclipped): returns the mask's top-left pixel `(c0, r0)` and the boolean mask."""
    c0, r0 = math.floor(x1), math.floor(y1)
    c1, r1 = math.ceil(x2), math.ceil(y2)
    if shape == "square":
        xs = np.arange(c0, c1) + 0.5
        ys = np.arange(r0, r1) + 0.5
        mask = ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]
        return c0, r0, mask
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2
    xs = (np.arange(c0, c1) + 0.5 - cx) ** 2
    ys = (np.arange(r0, r1) + 0.5 - cy) ** 2
    return c0, r0, (ys[:, None] + xs[None, :]) <= r * r


def _background(w: int, h: int) -> NDArray[np.uint8]:
    """A static, mildly textured background (a gradient and a faint grid)."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    gx = np.linspace(0, 18, w, dtype=np.float32)[None, :]
    gy = np.linspace(0, 12, h, dtype=np.float32)[:, None]
    base = np.asarray(_BACKGROUND, dtype=np.float32)
    img[:] = np.clip(base[None, None, :] + (gx + gy)[:, :, None], 0, 255).astype(np.uint8)
    img[::32, :, :] = 60
    img[:, ::32, :] = 60
    return img


def _texture(w: int, h: int, seed: int) -> NDArray[np.uint8]:
    """A smooth random texture (blurred noise), for backgrounds that cost real bits."""
    import cv2

    rng = np.random.default_rng(seed + 1000)
    small = rng.integers(20, 110, size=(max(2, h // 12), max(2, w // 12), 3), dtype=np.uint8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    fine = rng.integers(0, 12, size=(h, w, 1), dtype=np.uint8)
    return np.ascontiguousarray(np.clip(big.astype(np.int16) + fine, 0, 255).astype(np.uint8))


def _draw_frame(
    bg: NDArray[np.uint8], objects: Sequence[ObjectSpec], cam: CameraSpec, t: float,
    world_w: float, world_h: float, occluder: tuple[float, float] | None,
) -> tuple[NDArray[np.uint8], list[dict[str, Any]]]:
    h, w = bg.shape[:2]
    img = bg.copy()
    owner = np.full((h, w), -1, dtype=np.int16)
    placed: list[tuple[ObjectSpec, int, int, NDArray[np.bool_], tuple[int, int, int, int]]] = []
    dx, dy = cam.offset
    s = cam.scale
    for k, obj in enumerate(objects):
        wb = obj.box_at(t, world_w, world_h)
        if wb is None:
            continue
        x1, y1, x2, y2 = ((wb[0] - dx) * s, (wb[1] - dy) * s, (wb[2] - dx) * s, (wb[3] - dy) * s)
        c0, r0, mask = _raster(obj.shape, x1, y1, x2, y2)
        # Clip the mask to the frame.
        a0, b0 = max(c0, 0), max(r0, 0)
        a1, b1 = min(c0 + mask.shape[1], w), min(r0 + mask.shape[0], h)
        if a1 <= a0 or b1 <= b0:
            continue
        sub = mask[b0 - r0 : b1 - r0, a0 - c0 : a1 - c0]
        if not sub.any():
            continue
        img[b0:b1, a0:a1][sub] = obj.color
        owner[b0:b1, a0:a1][sub] = k
        rows = np.flatnonzero(sub.any(axis=1))
        cols = np.flatnonzero(sub.any(axis=0))
        box = (a0 + int(cols[0]), b0 + int(rows[0]), a0 + int(cols[-1]) + 1, b0 + int(rows[-1]) + 1)
        placed.append((obj, k, int(mask.sum()), sub, box))
    if occluder is not None:
        ox1 = max(0, math.floor((occluder[0] - dx) * s))
        ox2 = min(w, math.ceil((occluder[1] - dx) * s))
        if ox2 > ox1:
            img[:, ox1:ox2] = _OCCLUDER
            owner[:, ox1:ox2] = -2
    out = []
    for obj, k, full_area, _sub, box in placed:
        x1i, y1i, x2i, y2i = box
        visible = int(np.count_nonzero(owner[y1i:y2i, x1i:x2i] == k))
        out.append({
            "id": obj.id, "label": obj.label, "color": list(obj.color),
            "xyxy": [float(x1i), float(y1i), float(x2i), float(y2i)],
            "visible": round(visible / max(full_area, 1), 4),
        })
    return img, out


def write_scene(
    out_dir: str | Path,
    *,
    cameras: int | Sequence[CameraSpec] = 1,
    width: int = 640,
    height: int = 360,
    fps: float = 25.0,
    duration_s: float = 6.0,
    gop: int | None = None,
    bframes: int = 2,
    vfr: bool = False,
    seed: int = 0,
    objects: int | Sequence[ObjectSpec] | None = None,
    occluder: bool = True,
    crf: int = 20,
    preset: str = "ultrafast",
    faststart: bool = False,
    background: Literal["static", "panning"] = "static",
) -> Scene:
    """Draw and encode a scene; write `<camera>.mp4` per camera and `ground_truth.json`.

    Args:
        out_dir: Folder to write into (created if needed).
        cameras: Number of cameras (named `cam0`, `cam1`, … with growing offsets and zoom,
            all starting at scene time 0) or explicit `CameraSpec`s.
        width, height: Frame size in pixels (even numbers; H.264 4:2:0 needs them).
        fps: Nominal frames per second (the mean rate when `vfr`).
        duration_s: Length of each video in seconds.
        gop: Keyframe interval in nominal frames (default two seconds' worth): a keyframe
            is forced at the first frame at or after every `gop / fps` seconds, also with
            `vfr`; the encoder adds none of its own (no scene cuts).
        bframes: Consecutive B-frames x264 may use (0 = none); B-frames make decode order
            differ from presentation order, which tests of PTS handling need.
        vfr: Variable frame rate: frame intervals vary between 0.5 and 3 nominal periods.
        seed: Seed for object placement and VFR intervals (same seed, same videos).
        objects: Number of default objects, or explicit `ObjectSpec`s (default: 4 objects).
        occluder: Draw a grey pillar in front of the objects (partial occlusions).
        crf: x264 quality (lower = larger files, truer colours).
        preset: x264 speed preset; "ultrafast" keeps test setup fast.
        faststart: Put the MP4 index first (a truncated file then still decodes up to the cut).
        background: "static" (flat, cheap to encode and decode) or "panning" (a textured
            background the camera pans over at 60 px/s, so every frame costs real bits
            like camera footage does; slower to write, used by benchmarks).

    Returns:
        The `Scene` with video paths and the ground truth.
    """
    import av  # local: importing the testing package must stay cheap

    if width % 2 or height % 2:
        raise ValueError(f"width and height must be even for H.264 4:2:0, got {width}x{height}")
    if fps <= 0 or duration_s <= 0:
        raise ValueError(f"fps and duration_s must be positive, got fps={fps}, duration_s={duration_s}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = _default_cameras(cameras, width, height) if isinstance(cameras, int) else list(cameras)
    if not specs:
        raise ValueError("cameras must be at least 1")
    total_s = duration_s + max(c.start_s for c in specs)
    if objects is None or isinstance(objects, int):
        objs = default_objects(width, height, total_s, 4 if objects is None else objects, seed)
    else:
        objs = list(objects)
    occ = (0.55 * width, 0.55 * width + max(4.0, 0.05 * width)) if occluder else None
    gop_frames = gop if gop is not None else max(1, round(2 * fps))
    rate = Fraction(fps).limit_denominator(1001)

    gt: dict[str, Any] = {"cameras": {}}
    paths: dict[str, Path] = {}
    for spec in specs:
        cw, ch = spec.width or width, spec.height or height
        path = out / f"{spec.name}.mp4"
        ticks = _frame_ticks(fps, duration_s, vfr, rng)
        frames_gt: list[dict[str, Any]] = []
        bg = _background(cw, ch)
        pan: NDArray[np.uint8] | None = None
        if background == "panning":
            pan = _texture(cw + round(60 * (duration_s + 1)), ch, seed)
        options = {"movflags": "+faststart"} if faststart else {}
        with av.open(str(path), "w", options=options) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = cw, ch, "yuv420p"
            stream.time_base = PTS_TIME_BASE
            stream.codec_context.time_base = PTS_TIME_BASE
            # Keyframes are forced every `gop_frames / fps` seconds of media time (so VFR
            # videos keep a time-regular GOP too); x264 adds none of its own.
            stream.options = {
                "preset": preset, "crf": str(crf), "forced-idr": "1",
                "x264-params": f"keyint={10 * gop_frames + 1000}:min-keyint=1:scenecut=0:bframes={bframes}",
            }
            gop_ticks = round(gop_frames / fps * 90000)
            next_key = 0
            for idx, tick in enumerate(ticks):
                pts_s = float(tick * PTS_TIME_BASE)
                if pan is not None:
                    x0 = round(60 * pts_s)
                    bg = pan[:, x0 : x0 + cw]
                img, objs_gt = _draw_frame(bg, objs, spec, spec.start_s + pts_s, width, height, occ)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
                frame.pts = tick
                if tick >= next_key:
                    frame.pict_type = av.video.frame.PictureType.I
                    next_key += gop_ticks * (1 + (tick - next_key) // gop_ticks)
                frame.time_base = PTS_TIME_BASE
                container.mux(stream.encode(frame))
                frames_gt.append({"index": idx, "pts": pts_s, "objects": objs_gt})
            container.mux(stream.encode(None))
        paths[spec.name] = path
        gt["cameras"][spec.name] = {
            "video": str(path), "width": cw, "height": ch, "start_s": float(spec.start_s),
            "fps": float(fps), "vfr": bool(vfr), "frames": frames_gt,
        }
    gt_path = out / "ground_truth.json"
    gt_path.write_text(json.dumps(gt), encoding="utf-8")
    return Scene(out_dir=out, cameras=paths, ground_truth=gt, ground_truth_path=gt_path, objects=objs)


def replay_records(
    ground_truth: dict[str, Any],
    *,
    query: str | None = None,
    labels: Sequence[str] | None = None,
    score: float = 0.9,
    min_visible: float = 0.5,
) -> list[dict[str, Any]]:
    """Turn ground truth into replay-engine records, one per camera frame.

    A perfect "model" for tests and the demo: each record holds the boxes of the objects
    whose label is in `labels` (all objects when None) and that are at least `min_visible`
    unoccluded (a model cannot see a hidden object either).

    Args:
        ground_truth: The dict `write_scene` made (or `json.load` of its file).
        query: The query id or text the records answer; None answers any query.
        labels: Object labels to include, e.g. ["red circle"].
        score: Score given to every box.
        min_visible: Drop objects less visible than this fraction.

    Returns:
        `[{"camera", "pts", "query", "boxes": [{"xyxy", "score", "label"}]}]`.
    """
    wanted = set(labels) if labels is not None else None
    out: list[dict[str, Any]] = []
    for cam, info in ground_truth["cameras"].items():
        for fr in info["frames"]:
            boxes = [
                {"xyxy": list(o["xyxy"]), "score": float(score), "label": o["label"]}
                for o in fr["objects"]
                if (wanted is None or o["label"] in wanted) and float(o.get("visible", 1.0)) >= min_visible
            ]
            out.append({"camera": cam, "pts": float(fr["pts"]), "query": query, "boxes": boxes})
    return out


# --- cross-camera worlds and a ground-truth "model" ----------------------------------------


def cross_camera_specs(
    width: int, height: int, *, n: int = 3, start_s: Sequence[float] = (0.0, 1.0, 2.0)
) -> list[CameraSpec]:
    """`n` cameras over one world with different offsets, zooms and start times.

    Camera k looks at a shifted part of the world (so objects enter and leave each view at
    different moments) with zoom 1.0, 1.15, 1.3, … and starts at scene time `start_s[k]`
    (its PTS 0), so the files' media clocks differ by those seconds.
    """
    specs = []
    for k in range(n):
        dx = (0.0, 0.18, -0.12, 0.08)[k % 4] * width
        dy = (0.0, 0.1, 0.16, -0.08)[k % 4] * height
        specs.append(CameraSpec(f"cam{k}", offset=(dx, dy), scale=1.0 + 0.15 * (k % 3),
                                start_s=float(start_s[k % len(start_s)])))
    return specs


def cross_camera_objects(width: int, height: int, duration_s: float, *, n: int = 5, seed: int = 0) -> list[ObjectSpec]:
    """`n` shapes for cross-camera scenes: distinct colours, walking pace (a tenth of the
    frame's short side per second or less, so a 2–5 fps tracker follows them), most
    bouncing; one enters a third of the way in and one leaves the world two thirds in."""
    rng = np.random.default_rng(seed)
    base = min(width, height)
    out: list[ObjectSpec] = []
    for i in range(n):
        name, color = _PALETTE[i % len(_PALETTE)]
        shape: Shape = "circle" if i % 2 == 0 else "square"
        size = float(base * rng.uniform(0.16, 0.22))
        speed = base * rng.uniform(0.05, 0.1)
        ang = rng.uniform(0, 2 * math.pi)
        x = float(rng.uniform(0, width - size))
        y = float(rng.uniform(0, height - size))
        enter_s, leave_s = 0.0, None
        if i == 2:
            enter_s = duration_s / 3.0
        elif i == 3:
            leave_s = 2.0 * duration_s / 3.0
        out.append(ObjectSpec(i, f"{name} {shape}", color, shape, size, x, y, speed * math.cos(ang),
                              speed * math.sin(ang), True, enter_s, leave_s))
    return out


def _q(v: float, size: int) -> int:
    return min(999, max(0, round(v / max(size, 1) * 1000)))


class GroundTruthEngine:
    """A stand-in for GeM-VG that answers from a scene's ground truth, wrong at a set rate.

    It answers both request kinds the way the model does, in the model's own text
    (Qwen2-VL convention: `Image k: <|box_start|>(x1,y1),(x2,y2)<|box_end|>`, 0–1000
    relative), and reads its text back with the real parser (`parse_answer`), so prompts,
    answers and parsing are exercised end to end:

    - **grounding**: the boxes of the objects whose label the query names ("the red circle";
      a query naming no label means every object) in each image; with probability
      `wrong_rate` per image, one box is another visible object's (or dropped if none);
    - **correspondence** (`streamvg.identity.correspondence`): it reads the reference box from
      the question, finds that object in image 1's ground truth and answers its box in each
      target image where it is visible; with probability `wrong_rate` per target image, the
      box of another visible object instead (or none).

    Objects less than `min_visible` unoccluded are not seen (a model cannot see them either).

    Args:
        ground_truth: `Scene.ground_truth`.
        wrong_rate: Probability of a wrong answer per image.
        seed: Random seed (same seed, same answers).
    """

    convention = "qwen2_vl"

    def __init__(
        self, ground_truth: dict[str, Any], *, wrong_rate: float = 0.0, seed: int = 0,
        min_visible: float = 0.5, score: float = 0.9, tolerance_s: float = 0.02, name: str = "ground-truth",
    ) -> None:
        if not 0.0 <= wrong_rate <= 1.0:
            raise ValueError(f"wrong_rate must be in [0, 1], got {wrong_rate}")
        self.name = name
        self.wrong_rate = wrong_rate
        self.min_visible = min_visible
        self.score = score
        self.tolerance_s = tolerance_s
        self._seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self._frames: dict[str, tuple[list[float], list[dict[str, Any]]]] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        for cam, info in ground_truth["cameras"].items():
            frs = sorted(info["frames"], key=lambda f: f["pts"])
            self._frames[cam] = ([float(f["pts"]) for f in frs], frs)
            self._sizes[cam] = (int(info["width"]), int(info["height"]))
        self.labels = sorted({o["label"] for info in ground_truth["cameras"].values() for f in info["frames"] for o in f["objects"]})
        self.requests = {"grounding": 0, "correspondence": 0}
        self.wrong_answers = 0

    def _objects(self, camera: str, pts: float) -> list[dict[str, Any]]:
        entry = self._frames.get(camera)
        if entry is None:
            return []
        times, frs = entry
        import bisect

        i = bisect.bisect_left(times, pts - self.tolerance_s)
        best = None
        for j in range(i, min(i + 3, len(times))):
            if abs(times[j] - pts) <= self.tolerance_s and (best is None or abs(times[j] - pts) < abs(times[best] - pts)):
                best = j
        if best is None:
            return []
        return [o for o in frs[best]["objects"] if float(o.get("visible", 1.0)) >= self.min_visible]

    def _seed_for(self, frames: Sequence[Any], text: str) -> None:
        # Answers depend on the request, not on the order requests come in (the pipeline's
        # batches vary with thread timing), so a run is repeatable.
        key = "|".join(f"{f.camera}:{f.index}:{f.pts:.4f}" for f in frames) + "|" + text
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        self._rng = np.random.default_rng([self._seed, digest])

    def _wrong(self) -> bool:
        if self.wrong_rate > 0 and self._rng.random() < self.wrong_rate:
            self.wrong_answers += 1
            return True
        return False

    def _line(self, k: int, box: Sequence[float], size: tuple[int, int], label: str) -> str:
        w, h = size
        return (f"Image {k}: <|object_ref_start|>{label}<|object_ref_end|><|box_start|>"
                f"({_q(box[0], w)},{_q(box[1], h)}),({_q(box[2], w)},{_q(box[3], h)})<|box_end|>")

    def answer_text(self, frames: Sequence[Any], text: str) -> str:
        """The answer text for images `frames` (`Frame`s) and question `text`."""
        import re

        from streamvg.identity.correspondence import is_correspondence

        lines: list[str] = []
        self._seed_for(frames, text)
        if is_correspondence(text):
            self.requests["correspondence"] += 1
            m = re.search(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>", text)
            ref = frames[0]
            if m is None:
                return "None"
            w, h = ref.size
            rb = [int(m.group(1)) * w / 1000, int(m.group(2)) * h / 1000, int(m.group(3)) * w / 1000, int(m.group(4)) * h / 1000]
            objs = self._objects(ref.camera, ref.pts)
            if not objs:
                return "None"
            from streamvg.testing.metrics import iou_matrix

            ious = iou_matrix(np.array([rb]), np.array([o["xyxy"] for o in objs]))[0]
            if float(ious.max()) < 0.3:
                return "None"
            oid = objs[int(np.argmax(ious))]["id"]
            targets = [int(t) for t in re.findall(r"the (\d+)th image", text.split("Recognize", 1)[-1])]
            for k in targets:
                if not 2 <= k <= len(frames):
                    continue
                f = frames[k - 1]
                vis = self._objects(f.camera, f.pts)
                same = [o for o in vis if o["id"] == oid]
                others = [o for o in vis if o["id"] != oid]
                pick = same[0] if same else None
                if self._wrong():
                    pick = others[int(self._rng.integers(len(others)))] if others else None
                if pick is not None:
                    lines.append(self._line(k, pick["xyxy"], f.size, pick["label"]))
            return "\n".join(lines) if lines else "None"
        self.requests["grounding"] += 1
        low = text.lower()
        named = [lab for lab in self.labels if lab in low]
        for k, f in enumerate(frames, start=1):
            vis = self._objects(f.camera, f.pts)
            want = [o for o in vis if not named or o["label"] in named]
            if want and self._wrong():
                i = int(self._rng.integers(len(want)))
                others = [o for o in vis if o not in want]
                if others:
                    want[i] = others[int(self._rng.integers(len(others)))]
                else:
                    want.pop(i)
            lines.extend(self._line(k, o["xyxy"], f.size, o["label"]) for o in want)
        return "\n".join(lines) if lines else "None"

    def ground(self, windows: Sequence[Any], query: Any) -> list[Any]:
        return self.ground_many([(w, query) for w in windows])

    def ground_many(self, requests: Sequence[tuple[Any, Any]]) -> list[Any]:
        from streamvg.grounding import Grounding
        from streamvg.grounding.answers import parse_answer_full
        from streamvg.types import Detections

        out = []
        for window, query in requests:
            text = self.answer_text(window.frames, query.text)
            parsed = parse_answer_full(text, frame_sizes=window.frame_sizes, convention="qwen2_vl")
            det = parsed.detections
            det = Detections(det.xyxy, np.full(len(det), self.score, np.float32), det.image_index)
            out.append(Grounding(window_id=window.id, query_id=query.id, detections=det, raw_text=text,
                                 reasoning=None, model=self.name, parse_ok=parsed.ok))
        return out

    def close(self) -> None:
        return None


def truth_boxes(
    ground_truth: dict[str, Any], *, labels: Sequence[str] | None = None, min_visible: float = 0.5,
    times: dict[str, set[float]] | None = None,
) -> dict[tuple[str, float], dict[int, list[float]]]:
    """`{(camera, pts): {object id: xyxy}}` of the visible objects (cross-camera IDF1's truth).

    `times` keeps only those `pts` per camera (the frames a pipeline sampled), rounded to 4 places.
    """
    out: dict[tuple[str, float], dict[int, list[float]]] = {}
    for cam, info in ground_truth["cameras"].items():
        for fr in info["frames"]:
            t = round(float(fr["pts"]), 4)
            if times is not None and t not in times.get(cam, set()):
                continue
            out[(cam, t)] = {
                int(o["id"]): list(o["xyxy"]) for o in fr["objects"]
                if (labels is None or o["label"] in labels) and float(o.get("visible", 1.0)) >= min_visible
            }
    return out


def identity_scores(
    ground_truth: dict[str, Any],
    events: Sequence[Any],
    *,
    gid_of: Any = None,
    min_iou: float = 0.5,
    min_visible: float = 0.5,
    pure: float = 0.8,
) -> dict[str, Any]:
    """Cross-camera identity scores of a run's events against the ground truth.

    Args:
        ground_truth: `Scene.ground_truth`.
        events: The run's `Event`s (grounding events say which frames were sampled; track
            events carry the boxes and `global_id`).
        gid_of: `(query_id, camera, track_id) -> global_id` to score the final identities
            (e.g. `IdentityStage.global_id`); None scores the `global_id` each event carried.

    Returns:
        `{"idf1": …, "merged": [(query_id, global_id, [object ids])], "identities": n,
        "switched_tracks": n}`: IDF1 with each world object one identity across all cameras
        (boxes of every query pooled), and the identities that join camera tracks following
        different objects that exist at the same time (merges). A camera track counts as
        following an object when at least `pure` of its matched boxes are on it; tracks the
        camera's tracker swapped between objects are counted apart (`switched_tracks`).
    """
    from collections import Counter, defaultdict

    from streamvg.testing.metrics import idf1, iou_matrix

    times: dict[str, set[float]] = defaultdict(set)
    hyp: dict[tuple[str, float], dict[tuple[str, int], list[float]]] = defaultdict(dict)
    track_of: dict[tuple[tuple[str, float], tuple[str, int]], tuple[str, str, int]] = {}
    last_gid: dict[tuple[str, str, int], int] = {}
    for e in events:
        if e.kind == "grounding":
            times[e.camera].add(round(float(e.t), 4))
        elif e.kind in ("track_start", "track_update") and e.detail is None and e.track_id is not None:
            gid = gid_of(e.query_id, e.camera, e.track_id) if gid_of is not None else e.global_id
            key, ident = (e.camera, round(float(e.t), 4)), (str(e.query_id), int(gid if gid is not None else -1 - e.track_id))
            hyp[key][ident] = list(e.boxes[0]["xyxy"])
            track_of[(key, ident)] = (str(e.query_id), e.camera, int(e.track_id))
            last_gid[(str(e.query_id), e.camera, int(e.track_id))] = ident[1]
    truth = truth_boxes(ground_truth, times=times, min_visible=min_visible)
    index: dict[tuple[str, int], int] = {}
    numbered = {k: {index.setdefault(i, len(index)): b for i, b in v.items()} for k, v in hyp.items()}
    score = idf1(truth, numbered, min_iou=min_iou)  # type: ignore[arg-type]  # (camera, pts) keys
    # Majority object of each camera track, then the objects each identity holds.
    follows: dict[tuple[str, str, int], Counter[int]] = defaultdict(Counter)
    for key, idents in hyp.items():
        gt = truth.get(key) or {}
        if not gt:
            continue
        ids = list(gt)
        for ident, box in idents.items():
            ious = iou_matrix(np.array([box]), np.array([gt[i] for i in ids]))[0]
            if float(ious.max()) >= min_iou:
                follows[track_of[(key, ident)]][ids[int(np.argmax(ious))]] += 1
    span: dict[int, tuple[float, float]] = {}
    for info in ground_truth["cameras"].values():
        for fr in info["frames"]:
            t = float(info["start_s"]) + float(fr["pts"])
            for o in fr["objects"]:
                a, b = span.get(int(o["id"]), (t, t))
                span[int(o["id"])] = (min(a, t), max(b, t))
    holds: dict[tuple[str, int], set[int]] = defaultdict(set)
    switched = 0
    for (q, cam, tid), c in follows.items():
        gid = gid_of(q, cam, tid) if gid_of is not None else last_gid[(q, cam, tid)]
        obj, n = c.most_common(1)[0]
        if n < pure * sum(c.values()):
            switched += 1  # the camera's tracker swapped objects within this track: not the linker's doing
            continue
        holds[(q, int(gid))].add(obj)
    merged = []
    for (q, gid), objs in sorted(holds.items()):
        together = [(a, b) for a in objs for b in objs if a < b and span[a][0] <= span[b][1] and span[b][0] <= span[a][1]]
        if together:
            merged.append((q, gid, sorted(objs)))
    return {"idf1": score, "merged": merged, "identities": len(holds), "switched_tracks": switched}
