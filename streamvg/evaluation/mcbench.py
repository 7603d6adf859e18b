"""MC-Bench scoring (multi-context grounding on image pairs), after `eval_mc_bench.py` in
XuYunqiu/MC-Bench.

The annotation file is COCO-like: `images` (with `width`, `height`, and `pair_image_id` or
`inter_img_id` naming the other image of the sample), `annotations` (`bbox` `[x, y, w, h]`
in pixels, `category_id` a target group), `categories` (`"group 1"`, `"group 2"`, …) and
`descriptions` (`images_id`: the sample's images in order, `text`: the prompt).

The protocol:

1. **Groups matched to targets.** In samples with more than one target group, the predicted
   group ids are mapped to the ground-truth groups by the permutation with the highest mean
   IoU (boxes of a group matched one to one by the Hungarian algorithm, in both images).
2. **Instance level: AP50.** COCO detection evaluation (pycocotools, `bbox`), precision at
   IoU 0.5 over all areas with 100 detections, averaged per category over recall points,
   and the categories weighted by their number of ground-truth boxes.
3. **Image level: accuracy.** An image is right when it has a prediction exactly when it
   has a target; a sample is right when all its images are; accuracy is over samples.

Differences, on purpose: the reference script re-reads its results file for each sample
while relabelling (so only the last sample's relabelling survives) and relabels in place
(group 1 → 2 then 2 → 1 undoes itself); here every sample's mapping is applied, at once.
Samples are taken from `descriptions` (any number of images) rather than consecutive image
ids. Above 8 predicted groups the permutation search gives way to one Hungarian assignment
of groups by mean IoU (8! = 40,320 permutations is the most a hostile file can cost).
Predictions without a `score` get 1.0.

Predictions are either COCO results (`[{"image_id", "category_id", "bbox", "score"}]`, as
the reference script takes) or StreamVG's JSONL of raw answers (`{"index": <position in
descriptions>, "text": …}`), parsed by `parse_answer_full`; raw answers give every box
group 1 (a grounding answer names images, not groups).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from streamvg.errors import ConfigError
from streamvg.evaluation.predictions import Prediction
from streamvg.grounding import parse_answer_full

__all__ = ["McBenchScore", "answers_to_results", "load_mc_bench", "read_coco_results", "score_mc_bench"]

MAX_PERMUTED_GROUPS = 8


@dataclass(frozen=True)
class McBenchScore:
    """AP50 (instance level) and accuracy (image level), fractions in 0–1."""

    ap50: float
    accuracy: float
    samples: int
    predictions: int
    per_category_ap50: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "ap50": self.ap50,
            "accuracy": self.accuracy,
            "samples": self.samples,
            "predictions": self.predictions,
            "per_category_ap50": self.per_category_ap50,
        }


def load_mc_bench(path: str | Path) -> dict[str, Any]:
    """The annotation file, checked and completed (`area`, `iscrowd`, `descriptions`).

    Raises:
        ConfigError: the file is missing, not JSON, or lacks `images`, `annotations` or
            `categories` (one sentence).
    """
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"MC-Bench annotation file {p} not found; give the path of mc-bench_v0.2_val.json") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"MC-Bench annotation file {p} is not readable JSON ({str(exc)[:120]})") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
        raise ConfigError(f"MC-Bench annotation file {p} needs images, annotations and categories (COCO layout)")
    try:
        images = {int(im["id"]): im for im in data["images"]}
        for ann in data["annotations"]:
            _x, _y, w, h = (float(v) for v in ann["bbox"])
            ann.setdefault("area", w * h)
            ann.setdefault("iscrowd", 0)
            if int(ann["image_id"]) not in images:
                raise ValueError(f"annotation {ann.get('id')} names image {ann['image_id']}, which is not in images")
        if "descriptions" not in data:
            data["descriptions"] = _pairs_from_images(data["images"])
        for d in data["descriptions"]:
            if any(int(i) not in images for i in d["images_id"]):
                raise ValueError(f"description {d.get('id')} names an image that is not in images")
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"MC-Bench annotation file {p} is malformed ({str(exc)[:160]})") from None
    return data


def _pairs_from_images(images: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Samples from `pair_image_id` / `inter_img_id`, else consecutive images (as the reference)."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    ids = [int(im["id"]) for im in images]
    for k, im in enumerate(images):
        a = int(im["id"])
        if a in seen:
            continue
        other = im.get("pair_image_id", im.get("inter_img_id"))
        b = int(other) if other is not None else (ids[k + 1] if k + 1 < len(ids) else None)
        if b is None or b == a:
            raise ValueError(f"image {a} has no pair")
        seen.update((a, b))
        out.append({"id": len(out), "images_id": [a, b], "text": im.get("text", "")})
    return out


def read_coco_results(path: str | Path) -> list[dict[str, Any]]:
    """COCO detection results from a JSON file (a list), each checked."""
    p = Path(path)
    try:
        data = json.loads(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"predictions file {p} is not readable JSON ({str(exc)[:120]})") from None
    if not isinstance(data, list):
        raise ConfigError(f"predictions file {p} must be a list of COCO results or a JSONL of answers")
    return data


def answers_to_results(
    data: Mapping[str, Any], answers: Mapping[int, Prediction], *, convention: str = "qwen2_vl"
) -> list[dict[str, Any]]:
    """COCO results (group 1, score from the answer or 1.0) from raw answers by sample index."""
    images = {int(im["id"]): im for im in data["images"]}
    out: list[dict[str, Any]] = []
    descriptions = data["descriptions"]
    for idx, pred in answers.items():
        if not 0 <= idx < len(descriptions):
            raise ConfigError(f"answer index {idx} is outside the {len(descriptions)} MC-Bench samples")
        ids = [int(i) for i in descriptions[idx]["images_id"]]
        sizes = pred.frame_sizes or [(int(images[i]["width"]), int(images[i]["height"])) for i in ids]
        conv = pred.convention or convention
        if conv == "qwen2_5_vl" and pred.input_sizes is None:
            raise ConfigError(
                f"answer {idx} is in the qwen2_5_vl convention but has no input_sizes; rerun with --model "
                "or give --convention qwen2_vl"
            )
        parsed = parse_answer_full(
            pred.text, frame_sizes=sizes, input_sizes=pred.input_sizes,
            convention="qwen2_5_vl" if conv == "qwen2_5_vl" else "qwen2_vl",
        )
        det = parsed.detections
        for k in range(len(det)):
            x1, y1, x2, y2 = (float(v) for v in det.xyxy[k])
            out.append({
                "image_id": ids[int(det.image_index[k])], "category_id": 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(det.score[k]),
            })
    return out


def _box_iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _matched_ious(dts: list[list[float]], gts: list[list[float]]) -> list[float]:
    if not dts or not gts:
        return []
    ious = _box_iou_xywh(np.asarray(dts, float), np.asarray(gts, float))
    r, c = linear_sum_assignment(-ious)
    return [float(ious[i, j]) for i, j in zip(r, c, strict=True)]


def _group_mapping(
    sample: Sequence[int], gt: Mapping[tuple[int, int], list[list[float]]], dt: Mapping[tuple[int, int], list[list[float]]]
) -> dict[int, int]:
    """Predicted group id → ground-truth category for one sample (see module docstring)."""
    gt_cats = sorted({c for (img, c) in gt if img in sample})
    dt_groups = sorted({g for (img, g) in dt if img in sample})
    if len(gt_cats) < 2 or not dt_groups or len(dt_groups) > len(gt_cats):
        return {}

    def mean_iou(g: int, c: int) -> float:
        vals: list[float] = []
        for img in sample:
            vals += _matched_ious(dt.get((img, g), []), gt.get((img, c), []))
        return sum(vals) / len(vals) if vals else 0.0

    if len(dt_groups) > MAX_PERMUTED_GROUPS:
        m = np.array([[mean_iou(g, c) for c in gt_cats] for g in dt_groups])
        r, c = linear_sum_assignment(-m)
        return {dt_groups[i]: gt_cats[j] for i, j in zip(r, c, strict=True)}
    best, best_score = None, -1.0
    for perm in itertools.permutations(gt_cats, len(dt_groups)):
        vals: list[float] = []
        for g, cat in zip(dt_groups, perm, strict=True):
            for img in sample:
                vals += _matched_ious(dt.get((img, g), []), gt.get((img, cat), []))
        score = sum(vals) / len(vals) if vals else 0.0
        if score > best_score:
            best, best_score = perm, score
    return dict(zip(dt_groups, best, strict=True)) if best is not None else {}


def score_mc_bench(data: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> McBenchScore:
    """AP50 and image-level accuracy of COCO `results` on the annotations `data`.

    Raises:
        ConfigError: a result names an image that is not in the annotations, or is malformed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = {int(im["id"]) for im in data["images"]}
    clean: list[dict[str, Any]] = []
    for k, r in enumerate(results):
        try:
            img = int(r["image_id"])
            bbox = [float(v) for v in r["bbox"]]
            cat = int(r["category_id"])
            score = float(r.get("score", 1.0))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"prediction {k} needs image_id, category_id and bbox [x, y, w, h]") from None
        if img not in images:
            raise ConfigError(f"prediction {k} names image {img}, which is not in the annotations; were they made for another split?")
        if len(bbox) != 4 or not all(np.isfinite(bbox)) or bbox[2] <= 0 or bbox[3] <= 0:
            continue  # an empty or broken box finds nothing (it would only confuse COCOeval)
        clean.append({"image_id": img, "category_id": cat, "bbox": bbox, "score": score})

    gt: dict[tuple[int, int], list[list[float]]] = {}
    for ann in data["annotations"]:
        gt.setdefault((int(ann["image_id"]), int(ann["category_id"])), []).append([float(v) for v in ann["bbox"]])
    dt: dict[tuple[int, int], list[list[float]]] = {}
    for r in clean:
        dt.setdefault((r["image_id"], r["category_id"]), []).append(r["bbox"])
    samples = [[int(i) for i in d["images_id"]] for d in data["descriptions"]]
    relabel: dict[tuple[int, int], int] = {}
    for sample in samples:
        for g, cat in _group_mapping(sample, gt, dt).items():
            for img in sample:
                relabel[(img, g)] = cat
    for r in clean:
        r["category_id"] = relabel.get((r["image_id"], r["category_id"]), r["category_id"])

    cat_ids = [int(c["id"]) for c in data["categories"]]
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    gt_counts = {c: sum(1 for a in data["annotations"] if int(a["category_id"]) == c) for c in cat_ids}
    total_gt = sum(gt_counts.values())
    per_cat: dict[str, float] = {}
    ap50 = 0.0
    if clean and total_gt:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco = COCO()
            coco.dataset = {k: data[k] for k in ("images", "annotations", "categories")}
            coco.createIndex()
            coco_dt = coco.loadRes([dict(r) for r in clean])
            ev = COCOeval(coco, coco_dt, "bbox")
            ev.evaluate()
            ev.accumulate()
        precision = ev.eval["precision"]  # [T, R, K, A, M]; T 0 = IoU 0.5, A 0 = all, M 2 = 100 dets
        for k, cat in enumerate(ev.params.catIds):
            p = precision[0, :, k, 0, 2]
            valid = p[p > -1]
            ap = float(np.mean(valid)) if valid.size else 0.0
            per_cat[names.get(int(cat), str(cat))] = ap
            ap50 += gt_counts.get(int(cat), 0) / total_gt * ap
    else:
        per_cat = {names[c]: 0.0 for c in cat_ids}

    has_gt = {int(a["image_id"]) for a in data["annotations"]}
    has_dt = {r["image_id"] for r in clean}
    correct = sum(all((img in has_gt) == (img in has_dt) for img in s) for s in samples)
    return McBenchScore(
        ap50=ap50, accuracy=correct / len(samples) if samples else 0.0,
        samples=len(samples), predictions=len(clean), per_category_ap50=per_cat,
    )
