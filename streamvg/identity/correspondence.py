"""The correspondence request: "this box in camera A's image — which box in the other
cameras' images is the same object?", asked in the multi-image prompt style GeM-VG and
Migician were trained on (MIG-Bench's `multi_view` / `object_tracking` tasks):

    These images share one object in common(the object marked with red bounding box in the
    first image(<|box_start|>(451,265),(519,388)<|box_end|>). Recognize and locate this
    object in the 2th image.

The first image is the reference camera's frame with the track's box **drawn** in red (as in
training) and **written** in the model family's convention (`qwen2_vl`: 0–1000 relative
`<|box_start|>(x1,y1),(x2,y2)<|box_end|>`; `qwen2_5_vl`: `{"bbox_2d": [...]}` in pixels of
the resized model input); the other cameras' frames of the same instant follow. ("2th" is
the training data's own spelling.) The request is an ordinary `(Window, Query)` pair, so
every engine grounds it with its usual prompt, batching and parser (`parse_answer`): the
answer's boxes come back with the image they are in, and `read_answer` turns them into one
box (or none) per target camera.

The marked copy of a frame carries a negative frame index (`-(index + 1)`), so visual-token
caches keyed by camera and index never mix it up with the unmarked frame.

Example:
    >>> print(correspondence_text((10, 20, 30, 60), (100, 100), targets=[2], convention="qwen2_vl"))
    These images share one object in common(the object marked with red bounding box in the first image(<|box_start|>(100,200),(300,600)<|box_end|>). Recognize and locate this object in the 2th image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from streamvg.grounding.answers import parse_answer_full
from streamvg.grounding.prompts import Convention, build_messages
from streamvg.types import Detections, Frame, Query, Window

__all__ = [
    "MARK_RGB",
    "CorrespondenceRequest",
    "build_correspondence_messages",
    "correspondence_text",
    "is_correspondence",
    "mark_box",
    "marked_frame",
    "parse_correspondence",
    "read_answer",
]

MARK_RGB = (255, 0, 0)
"""Colour of the drawn reference box (red, as in MIG-Bench)."""

_LEAD = "These images share one object in common(the object marked with red bounding box in the first image("
QUERY_SUFFIX = "~same"
"""Appended to the query id of a correspondence request (`vest~same`)."""

Box = tuple[float, float, float, float]


def _ordinal_list(targets: Sequence[int]) -> str:
    words = [f"the {k}th image" for k in targets]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def correspondence_text(
    ref_xyxy: Sequence[float],
    ref_size: tuple[int, int],
    *,
    targets: Sequence[int],
    convention: Convention = "qwen2_vl",
    input_size: tuple[int, int] | None = None,
) -> str:
    """The question of a correspondence request (the engine appends the answer format).

    Args:
        ref_xyxy: The track's box in the reference frame, original frame pixels.
        ref_size: `(width, height)` of the reference frame.
        targets: 1-based numbers of the images to search (2 = the first other camera).
        convention: Box convention of the model family (how the reference box is written).
        input_size: `(width, height)` of the reference image as the model sees it
            (`qwen2_5_vl` only; without it the box is given 0–1000 relative, the marking
            still shows it).

    Returns:
        Text ending with "." (so `build_question` uses it as the lead unchanged).
    """
    if not targets or any(k < 2 for k in targets):
        raise ValueError(f"targets must be image numbers >= 2 (image 1 is the reference), got {list(targets)}")
    w, h = max(int(ref_size[0]), 1), max(int(ref_size[1]), 1)
    x1, y1, x2, y2 = (float(v) for v in ref_xyxy)
    if convention == "qwen2_5_vl" and input_size is not None:
        sx, sy = input_size[0] / w, input_size[1] / h
        box = f'{{"bbox_2d": [{round(x1 * sx)}, {round(y1 * sy)}, {round(x2 * sx)}, {round(y2 * sy)}]}}'
    else:
        r = [min(999, max(0, round(v))) for v in (x1 / w * 1000, y1 / h * 1000, x2 / w * 1000, y2 / h * 1000)]
        box = f"<|box_start|>({r[0]},{r[1]}),({r[2]},{r[3]})<|box_end|>"
    return f"{_LEAD}{box}). Recognize and locate this object in {_ordinal_list(targets)}."


def is_correspondence(text: str) -> bool:
    """Whether a query text is a correspondence request (engines that answer from stored
    boxes cannot answer one; test doubles use this to tell the request kinds apart)."""
    return text.startswith(_LEAD)


def mark_box(image: NDArray[np.uint8], xyxy: Sequence[float], *, thickness: int | None = None) -> NDArray[np.uint8]:
    """A copy of `image` (H×W×3 RGB) with the box drawn as a red rectangle.

    `thickness` defaults to 1/150 of the larger side, at least 2 pixels (visible after the
    model's resize).
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    t = thickness if thickness is not None else max(2, round(max(w, h) / 150))
    x1 = int(np.clip(np.floor(xyxy[0]), 0, w - 1))
    y1 = int(np.clip(np.floor(xyxy[1]), 0, h - 1))
    x2 = int(np.clip(np.ceil(xyxy[2]), x1 + 1, w))
    y2 = int(np.clip(np.ceil(xyxy[3]), y1 + 1, h))
    color = np.array(MARK_RGB, dtype=np.uint8)
    out[y1 : min(y1 + t, y2), x1:x2] = color
    out[max(y2 - t, y1) : y2, x1:x2] = color
    out[y1:y2, x1 : min(x1 + t, x2)] = color
    out[y1:y2, max(x2 - t, x1) : x2] = color
    return out


def marked_frame(frame: Frame, xyxy: Sequence[float]) -> Frame:
    """The reference frame with the box drawn, under a negative frame index (cache-safe)."""
    return Frame(frame.camera, -(frame.index + 1), frame.pts, mark_box(frame.image, xyxy), frame.wall_time)


@dataclass(frozen=True)
class CorrespondenceRequest:
    """One correspondence request about one track.

    Attributes:
        query_id: The query whose track is asked about.
        camera, track_id: The track (reference camera).
        ref_xyxy: Its box in the reference frame (frame pixels).
        window_id: The multi-camera window it comes from (votes are counted per window).
        window: What the engine sees: the marked reference frame, then the target frames.
        query: The engine query (`id` = `query_id + "~same"`, `text` = the question).
        targets: Camera of each target image, in order (`window.frames[1:]`).
    """

    query_id: str
    camera: str
    track_id: int
    ref_xyxy: Box
    window_id: str
    window: Window
    query: Query
    targets: tuple[str, ...]

    @classmethod
    def build(
        cls,
        *,
        query_id: str,
        ref: Frame,
        track_id: int,
        ref_xyxy: Sequence[float],
        others: Sequence[Frame],
        window_id: str,
        convention: Convention = "qwen2_vl",
        input_size: tuple[int, int] | None = None,
    ) -> CorrespondenceRequest:
        """Mark the reference frame, write the question, assemble the window.

        Args:
            ref: The reference camera's frame (unmarked).
            others: The other cameras' frames of the same instant (one per camera).
            input_size: The reference image's model input size (`qwen2_5_vl`).
        """
        if not others:
            raise ValueError("a correspondence request needs at least one other camera's frame")
        box = (float(ref_xyxy[0]), float(ref_xyxy[1]), float(ref_xyxy[2]), float(ref_xyxy[3]))
        text = correspondence_text(box, ref.size, targets=list(range(2, len(others) + 2)),
                                   convention=convention, input_size=input_size)
        frames = (marked_frame(ref, box), *others)
        key = f"{window_id}|{ref.camera}|{track_id}"
        wid = hashlib.sha1(key.encode()).hexdigest()[:16]
        return cls(
            query_id=query_id, camera=ref.camera, track_id=int(track_id), ref_xyxy=box, window_id=window_id,
            window=Window(frames, id=wid), query=Query(id=f"{query_id}{QUERY_SUFFIX}", text=text),
            targets=tuple(f.camera for f in others),
        )


def build_correspondence_messages(
    request: CorrespondenceRequest, *, convention: Convention = "qwen2_vl"
) -> list[dict[str, object]]:
    """The chat messages an engine builds for `request` (images, then the question with the
    answer format), via `streamvg.grounding.prompts.build_messages`."""
    return build_messages(request.query.text, n_images=len(request.window), convention=convention)


def _iou(a: Sequence[float], b: NDArray[np.float32]) -> NDArray[np.float64]:
    bb = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(np.asarray(a[:2], dtype=np.float64), bb[:, :2])
    rb = np.minimum(np.asarray(a[2:], dtype=np.float64), bb[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area_a = max(0.0, (a[2] - a[0]) * (a[3] - a[1]))
    area_b = np.prod(np.clip(bb[:, 2:] - bb[:, :2], 0, None), axis=1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def read_answer(request: CorrespondenceRequest, detections: Detections) -> dict[str, Box | None]:
    """One box (or none) per target camera from the parsed answer of `request`.

    Boxes in image k (k ≥ 1) belong to target camera `targets[k-1]`. An answer that names
    no image gets image 0 from the parser: with one target, a box that is not an echo of
    the reference box (IoU < 0.9) is taken as the target's, rescaled from the reference
    frame's size to the target's. A target with two or more boxes is ambiguous (the request
    asks for one object) and left out, like one with none.

    Returns:
        `{camera: xyxy or None}` for every target camera.
    """
    frames = request.window.frames
    out: dict[str, Box | None] = {c: None for c in request.targets}
    det = detections
    if not len(det):
        return out
    per: dict[int, list[NDArray[np.float32]]] = {}
    for i in range(len(det)):
        per.setdefault(int(det.image_index[i]), []).append(det.xyxy[i])
    if len(request.targets) == 1 and 1 not in per and 0 in per:
        ref_w, ref_h = frames[0].size
        tw, th = frames[1].size
        keep = [b for b in per[0] if float(_iou(request.ref_xyxy, b)[0]) < 0.9]
        if keep:
            s = np.array([tw / ref_w, th / ref_h, tw / ref_w, th / ref_h], dtype=np.float32)
            per[1] = [b * s for b in keep]
    for k, cam in enumerate(request.targets, start=1):
        boxes = per.get(k, [])
        if len(boxes) == 1:
            b = boxes[0]
            out[cam] = (float(b[0]), float(b[1]), float(b[2]), float(b[3]))
    return out


def parse_correspondence(
    text: str,
    request: CorrespondenceRequest,
    *,
    input_sizes: Sequence[tuple[int, int]] | None = None,
    convention: Convention = "qwen2_vl",
) -> dict[str, Box | None]:
    """`read_answer` of a raw model answer, parsed with `parse_answer` (never raises on it)."""
    # With one camera to search, a box that names no image goes to image 0, where
    # `read_answer` tells an echo of the reference box from the target's box; with several,
    # such a box is ambiguous and left out.
    parsed = parse_answer_full(text, frame_sizes=request.window.frame_sizes, input_sizes=input_sizes,
                               convention=convention, default_image=0 if len(request.targets) == 1 else None)
    return read_answer(request, parsed.detections)


def match_track(box: Sequence[float], tracked: Detections, min_iou: float) -> int | None:
    """Row of the tracked box that `box` points at (highest IoU ≥ `min_iou`), else None."""
    if not len(tracked):
        return None
    ious = _iou(box, tracked.xyxy)
    i = int(np.argmax(ious))
    return i if ious[i] >= min_iou else None
