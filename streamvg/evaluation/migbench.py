"""MIG-Bench scoring (multi-image grounding, 10 tasks), from the model's raw answers.

The benchmark's protocol (Migician's `eval/MIG_bench_eval.py` and `eval/utils.py`):

- one box per item: the first box of the answer;
- the ground truth `answer` is `[x1, y1, x2, y2]` relative (0–1) to the target image;
- predicted values of 1 or more are divided by 1000 (Qwen2-VL's 0–1000 grid), smaller
  values are taken as already relative;
- IoU of the two boxes; per task the fraction of items with IoU ≥ 0.3 / 0.5 / 0.7 and the
  mean IoU; an answer with no box scores IoU 0.

Differences, on purpose: boxes are read by StreamVG's own parser (`parse_answer_full`)
rather than Migician's regular expressions, so every form the engine meets in production
counts (JSON, bracket lists, box tokens, prose; the first box by position in the text).
Migician applies a y-axis stretch to its own model's boxes (`migician_eval`: y1 × 1.05,
y2 × 1.10); that is a property of one checkpoint, not of the benchmark, and is not applied.
Items with no answer in the predictions file score 0 and are counted as `missing`.

Conventions (`convention=`):

- `migician` (default): the benchmark's own rule above;
- `qwen2_vl`: every value on the 0–1000 grid;
- `relative`: every value already in 0–1;
- `qwen2_5_vl`: absolute pixels of the image as the model saw it (Qwen2.5-VL); needs each
  answer's `frame_sizes` and `input_sizes`, which `--model` runs record (a box that names no
  image is read in the first image's pixels);
- `auto`: `qwen2_5_vl` for answers recorded with that convention and sizes, else `migician`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamvg.errors import ConfigError
from streamvg.evaluation.predictions import Prediction
from streamvg.grounding import parse_answer_full

__all__ = ["CONVENTIONS", "MigBenchScore", "TaskScore", "answer_box", "iou", "load_mig_bench", "score_mig_bench"]

MigConvention = Literal["auto", "migician", "qwen2_vl", "relative", "qwen2_5_vl"]
CONVENTIONS: tuple[str, ...] = ("auto", "migician", "qwen2_vl", "relative", "qwen2_5_vl")
THRESHOLDS = (0.3, 0.5, 0.7)
_GRID = (1000, 1000)  # parse on a 1000-unit canvas: numbers come back as written, clamped


def load_mig_bench(path: str | Path) -> list[dict[str, Any]]:
    """The items of a MIG-Bench data file (Migician's `MIG_data.json` layout).

    Raises:
        ConfigError: the file is missing, not JSON, or an item lacks `task`, `images`,
            `question` or a 4-number `answer`.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"MIG-Bench data file {p} not found; give the path of MIG_data.json") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"MIG-Bench data file {p} is not readable JSON ({str(exc)[:120]})") from None
    if not isinstance(data, list):
        raise ConfigError(f"MIG-Bench data file {p} must hold a list of items, got {type(data).__name__}")
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not {"task", "images", "question", "answer"} <= item.keys():
            raise ConfigError(f"MIG-Bench item {i} of {p} needs task, images, question and answer")
        ans = item["answer"]
        if not (isinstance(ans, list) and len(ans) == 4 and all(isinstance(v, int | float) for v in ans)):
            raise ConfigError(f"MIG-Bench item {i} of {p}: answer must be [x1, y1, x2, y2], got {str(ans)[:80]}")
        if not isinstance(item["images"], list) or not item["images"]:
            raise ConfigError(f"MIG-Bench item {i} of {p}: images must be a non-empty list")
    return data


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two `[x1, y1, x2, y2]` boxes (0 when they do not overlap or one is empty)."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    if x2 <= x1 or y2 <= y1:
        return 0.0
    inter = (x2 - x1) * (y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _first(parsed_xyxy: np.ndarray) -> list[float] | None:
    return [float(v) for v in parsed_xyxy[0]] if len(parsed_xyxy) else None


def answer_box(
    text: str,
    n_images: int,
    convention: str = "migician",
    *,
    frame_sizes: Sequence[tuple[int, int]] | None = None,
    input_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[float] | None:
    """The first box of `text` as `[x1, y1, x2, y2]` relative to its image, or `None`.

    Raises:
        ConfigError: `convention` is unknown, or `qwen2_5_vl` without the sizes it needs.
    """
    n = max(1, n_images)
    if convention == "qwen2_5_vl":
        if not frame_sizes or not input_sizes or len(frame_sizes) != len(input_sizes):
            raise ConfigError(
                "convention qwen2_5_vl needs each answer's frame_sizes and input_sizes (recorded by --model runs); "
                "use --convention migician for answers on the 0-1000 grid"
            )
        det = parse_answer_full(
            text, frame_sizes=frame_sizes, input_sizes=input_sizes, convention="qwen2_5_vl", default_image=0
        ).detections
        if not len(det):
            return None
        k = int(det.image_index[0])
        w, h = frame_sizes[k]
        x1, y1, x2, y2 = (float(v) for v in det.xyxy[0])
        return [x1 / w, y1 / h, x2 / w, y2 / h]
    if convention not in ("migician", "qwen2_vl", "relative"):
        raise ConfigError(f"convention {convention!r} is unknown; use one of {', '.join(CONVENTIONS)}")
    # Numbers as written: on a 1000×1000 canvas with the 0–1000 convention they come back
    # unscaled (corners ordered, clamped to 0..1000). The benchmark scores the first box
    # whatever image it names, so a box that names none is kept too (default_image).
    box = _first(
        parse_answer_full(text, frame_sizes=[_GRID] * n, convention="qwen2_vl", default_image=0).detections.xyxy
    )
    if box is None:
        return None
    if convention == "qwen2_vl":
        return [v / 1000.0 for v in box]
    if convention == "relative":
        return box
    return [v / 1000.0 if v >= 1 else v for v in box]


@dataclass
class TaskScore:
    """Scores of one task (fractions in 0–1)."""

    n: int = 0
    hits: dict[float, int] = field(default_factory=lambda: dict.fromkeys(THRESHOLDS, 0))
    iou_sum: float = 0.0
    unparsed: int = 0
    missing: int = 0

    def add(self, value: float) -> None:
        self.n += 1
        self.iou_sum += value
        for t in THRESHOLDS:
            if value >= t:
                self.hits[t] += 1

    def to_json(self) -> dict[str, Any]:
        n = max(self.n, 1)
        out: dict[str, Any] = {f"iou@{t}": self.hits[t] / n for t in THRESHOLDS}
        out["mean_iou"] = self.iou_sum / n
        out.update(n=self.n, unparsed=self.unparsed, missing=self.missing)
        return out


@dataclass
class MigBenchScore:
    """MIG-Bench scores: per task, and overall item-weighted and task-averaged."""

    tasks: dict[str, TaskScore]
    ious: list[float]  # one per item, in dataset order (0 for missing or unparsed answers)

    @property
    def missing(self) -> int:
        return sum(t.missing for t in self.tasks.values())

    @property
    def unparsed(self) -> int:
        return sum(t.unparsed for t in self.tasks.values())

    def to_json(self) -> dict[str, Any]:
        tasks = {name: t.to_json() for name, t in sorted(self.tasks.items())}
        total = TaskScore()
        for t in self.tasks.values():
            total.n += t.n
            total.iou_sum += t.iou_sum
            for th in THRESHOLDS:
                total.hits[th] += t.hits[th]
        weighted = {k: v for k, v in total.to_json().items() if k.startswith(("iou@", "mean_iou"))}
        keys = [f"iou@{t}" for t in THRESHOLDS] + ["mean_iou"]
        averaged = {k: float(np.mean([tasks[name][k] for name in tasks])) if tasks else 0.0 for k in keys}
        return {
            "tasks": tasks,
            "overall": {
                "item_weighted": weighted,
                "task_averaged": averaged,
                "n": total.n,
                "unparsed": self.unparsed,
                "missing": self.missing,
            },
        }


def score_mig_bench(
    items: Sequence[Mapping[str, Any]],
    predictions: Mapping[int, Prediction],
    *,
    convention: str = "auto",
) -> MigBenchScore:
    """Score `predictions` (by item index) against MIG-Bench `items`.

    Example:
        >>> items = [{"task": "diff", "images": ["a", "b"], "question": "?", "answer": [0.1, 0.1, 0.5, 0.5]}]
        >>> s = score_mig_bench(items, {0: Prediction(0, "<|box_start|>(100,100),(500,500)<|box_end|>")})
        >>> s.to_json()["tasks"]["diff"]["iou@0.5"], round(s.ious[0], 3)
        (1.0, 1.0)
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"--convention {convention!r} is unknown; use one of {', '.join(CONVENTIONS)}")
    tasks: dict[str, TaskScore] = {}
    ious: list[float] = []
    for i, item in enumerate(items):
        score = tasks.setdefault(str(item["task"]), TaskScore())
        pred = predictions.get(i)
        if pred is None:
            score.missing += 1
            score.add(0.0)
            ious.append(0.0)
            continue
        conv = convention
        if conv == "auto":
            sized = pred.frame_sizes is not None and pred.input_sizes is not None
            conv = "qwen2_5_vl" if pred.convention == "qwen2_5_vl" and sized else "migician"
        box = answer_box(
            pred.text, len(item["images"]), conv, frame_sizes=pred.frame_sizes, input_sizes=pred.input_sizes
        )
        if box is None:
            score.unparsed += 1
            value = 0.0
        else:
            value = iou([float(v) for v in item["answer"]], box)
        score.add(value)
        ious.append(value)
    return MigBenchScore(tasks, ious)
