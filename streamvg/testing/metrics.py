"""Identity metrics for checking tracks against ground truth without extra dependencies.

`idf1` is the identity F1 of Ristani et al. (2016), the measure MOTChallenge reports as
IDF1: ground-truth and tracker identities are matched one-to-one over the whole sequence
so as to maximise the frames on which the pair overlaps (IoU ≥ `min_iou`); the matched
frames are identity true positives.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["Boxes", "idf1", "iou_matrix"]

# time (or frame key) -> {identity: (x1, y1, x2, y2)}
Boxes = Mapping[float, Mapping[int, Sequence[float]]]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`(len(a), len(b))` IoU of two sets of xyxy boxes."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def idf1(ground_truth: Boxes, hypotheses: Boxes, *, min_iou: float = 0.5) -> float:
    """Identity F1 in [0, 1] of `hypotheses` against `ground_truth`.

    Both map a time key to `{identity: xyxy}`; keys present in only one of them count as
    misses or false positives. Returns 1.0 when both are empty.
    """
    n_gt = sum(len(v) for v in ground_truth.values())
    n_hyp = sum(len(v) for v in hypotheses.values())
    if n_gt + n_hyp == 0:
        return 1.0
    overlap: dict[tuple[int, int], int] = defaultdict(int)
    for key, gt in ground_truth.items():
        hyp = hypotheses.get(key)
        if not gt or not hyp:
            continue
        gids, gboxes = list(gt.keys()), np.array([gt[g] for g in gt])
        hids, hboxes = list(hyp.keys()), np.array([hyp[h] for h in hyp])
        ious = iou_matrix(gboxes, hboxes)
        for i, j in zip(*np.nonzero(ious >= min_iou), strict=True):
            overlap[(gids[i], hids[j])] += 1
    if not overlap:
        return 0.0
    g_index = {g: i for i, g in enumerate(sorted({g for g, _ in overlap}))}
    h_index = {h: j for j, h in enumerate(sorted({h for _, h in overlap}))}
    weight = np.zeros((len(g_index), len(h_index)))
    for (g, h), c in overlap.items():
        weight[g_index[g], h_index[h]] = c
    rows, cols = linear_sum_assignment(weight, maximize=True)
    idtp = float(weight[rows, cols].sum())
    return 2.0 * idtp / (n_gt + n_hyp)
