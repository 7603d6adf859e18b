"""`--model` runs: ask the engine every benchmark item not answered yet, append the answers.

Items are grounded in batches (`engine.batch_size` at a time); each answer is appended to
the predictions file as soon as its batch returns, so an interrupted run resumes where it
stopped and a finished one is a no-op. An item whose images cannot be read, or whose batch
the engine fails, is reported and left unanswered (the next run asks it again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamvg.errors import StreamVGError
from streamvg.evaluation.predictions import Prediction, append_prediction
from streamvg.grounding import GroundingEngine
from streamvg.types import Frame, Query, Window

__all__ = ["EvalItem", "RunReport", "read_image", "resolve_image", "run_items"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalItem:
    """One question over a few images (a MIG-Bench item or an MC-Bench sample)."""

    index: int
    question: str
    images: tuple[Path, ...]


@dataclass
class RunReport:
    """What a `--model` run did."""

    asked: int = 0
    skipped: int = 0  # already answered in the predictions file
    failures: dict[int, str] = field(default_factory=dict)  # item index -> one sentence


def resolve_image(root: Path, rel: str) -> Path:
    """`rel` (a path as the dataset writes it, e.g. `./MIG-Bench/images/a.jpg`) under `root`.

    Tries the path as written, then without its leading folders one by one, so `--images`
    may name the dataset folder or any folder above the images.
    """
    parts = Path(rel.lstrip("./") if rel.startswith("./") else rel).parts
    for k in range(len(parts)):
        cand = root.joinpath(*parts[k:])
        if cand.is_file():
            return cand
    return root.joinpath(*parts)


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 pixels of an image file (raises `ValueError` with a sentence)."""
    import cv2

    if not path.is_file():
        raise ValueError(f"image {path} not found; check --images")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{path} is not an image OpenCV can read")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _input_sizes(engine: GroundingEngine, images: Sequence[np.ndarray]) -> list[tuple[int, int]] | None:
    """Each image's size as the model saw it, from the engine's own image processor."""
    proc = getattr(engine, "image_processor", None)
    patch = getattr(engine, "patch_size", None)
    if proc is None or patch is None:
        return None
    try:
        grid = proc(images=list(images), return_tensors="np")["image_grid_thw"]
    except Exception:  # a size only matters for pixel conventions; the answer still counts
        log.debug("could not read the model input sizes", exc_info=True)
        return None
    return [(int(g[2]) * int(patch), int(g[1]) * int(patch)) for g in np.asarray(grid).tolist()]


def run_items(
    engine: GroundingEngine,
    items: Sequence[EvalItem],
    predictions_path: Path,
    answered: set[int],
    *,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunReport:
    """Ground every item not in `answered`; append each answer to `predictions_path`.

    KeyboardInterrupt propagates (answers so far are on disk).
    """
    report = RunReport(skipped=sum(1 for it in items if it.index in answered))
    todo = [it for it in items if it.index not in answered]
    convention = getattr(engine, "convention", None)
    done = 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        requests: list[tuple[Window, Query]] = []
        pixels: list[list[np.ndarray]] = []
        kept: list[EvalItem] = []
        for it in chunk:
            try:
                imgs = [read_image(p) for p in it.images]
                frames = tuple(Frame(camera=f"eval-{it.index}", index=k, pts=0.0, image=im) for k, im in enumerate(imgs))
                requests.append((Window(frames), Query(id=f"item-{it.index}", text=it.question)))
            except ValueError as exc:
                report.failures[it.index] = str(exc)
                continue
            pixels.append(imgs)
            kept.append(it)
        if requests:
            t0 = time.perf_counter()
            try:
                groundings: list[Any] = engine.ground_many(requests)
            except (StreamVGError, RuntimeError, ValueError, MemoryError) as exc:
                for it in kept:
                    report.failures[it.index] = f"the engine failed on this item's batch ({str(exc)[:160]})"
                groundings = []
            log.debug("batch of %d in %.2fs", len(requests), time.perf_counter() - t0)
            for it, imgs, g in zip(kept, pixels, groundings, strict=False):
                append_prediction(predictions_path, Prediction(
                    index=it.index, text=g.raw_text,
                    frame_sizes=[(im.shape[1], im.shape[0]) for im in imgs],
                    input_sizes=_input_sizes(engine, imgs),
                    convention=convention,
                ))
                report.asked += 1
        done += len(chunk)
        if on_progress is not None:
            on_progress(done, len(todo))
    return report
