"""The offline linker: joins tracklets of one object across gaps, never two objects seen together."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.tracking import Tracker
from streamvg.tracking.linker import LinkerConfig, link_tracks
from streamvg.types import Detections


def _walkers(rng: np.random.Generator, n: int, seconds: float, rate: float) -> tuple[np.ndarray, ...]:
    """Objects walking straight lines (different heights, speeds, directions), sampled at `rate`,
    each hidden for one random stretch of 1-4 s (an occlusion)."""
    rows = []
    for oid in range(n):
        h = rng.uniform(80, 200)
        w = 0.4 * h
        start = rng.uniform(0, seconds / 3)
        end = rng.uniform(2 * seconds / 3, seconds)
        p0 = np.array([rng.uniform(100, 1800), rng.uniform(150, 900)])
        v = rng.uniform(0.3, 1.0) * h * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), 0.4 * np.sin(a)])
        hide0 = rng.uniform(start + 1.0, end - 5.0) if end - start > 7.0 else None
        hide1 = None if hide0 is None else hide0 + rng.uniform(1.0, 4.0)
        for t in np.arange(0.0, seconds, 1.0 / rate):
            if not start <= t <= end or (hide0 is not None and hide0 <= t <= hide1):
                continue
            c = p0 + v * (t - start)
            rows.append((oid, t, c[0] - w / 2, c[1] - h / 2, c[0] + w / 2, c[1] + h / 2))
    a = np.array(rows)
    return a[:, 0].astype(int), a[:, 1], a[:, 2:6]


def _online(gt_id: np.ndarray, t: np.ndarray, xyxy: np.ndarray, *, max_lost_s: float) -> tuple[np.ndarray, ...]:
    """The online tracker's ids for the boxes, and the true id of each reported box."""
    trk = Tracker(max_lost_s=max_lost_s, min_confirm_hits=1)
    ids, times, boxes, truth = [], [], [], []
    for tk in np.unique(t):
        m = t == tk
        out = trk.update(Detections(xyxy[m].astype(np.float32), np.full(int(m.sum()), 0.9, np.float32)), float(tk))
        # reported rows keep input order: map back to the true ids by box equality
        src = np.flatnonzero(m)
        for k in range(len(out)):
            j = src[np.argmin(np.abs(xyxy[src] - out.xyxy[k]).sum(axis=1))]
            ids.append(int(out.track_id[k]))
            times.append(float(tk))
            boxes.append(xyxy[j])
            truth.append(int(gt_id[j]))
    return np.array(ids), np.array(times), np.array(boxes), np.array(truth)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rate=st.sampled_from([1.0, 2.0, 5.0]), n=st.integers(1, 5))
def test_linked_tracks_never_hold_two_objects_seen_together(seed: int, rate: float, n: int) -> None:
    rng = np.random.default_rng(seed)
    gt_id, t, xyxy = _walkers(rng, n, 30.0, rate)
    ids, tt, boxes, _truth = _online(gt_id, t, xyxy, max_lost_s=0.9)
    res = link_tracks(ids, tt, boxes)
    linked = res.track_id
    assert len(linked) == len(ids)
    # One linked id never covers two boxes at the same time.
    for lid in np.unique(linked[linked >= 0]):
        times = tt[linked == lid]
        assert len(np.unique(times)) == len(times)
    # Links only join tracklets whose first is over before the second starts.
    for a, b in res.links:
        assert tt[ids == a].max() < tt[ids == b].min()


def test_the_linker_joins_what_the_ground_truth_joins() -> None:
    joined = total = wrong = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        gt_id, t, xyxy = _walkers(rng, 3, 30.0, 2.0)
        ids, tt, boxes, truth = _online(gt_id, t, xyxy, max_lost_s=0.9)  # every hidden stretch breaks a track
        res = link_tracks(ids, tt, boxes, config=LinkerConfig(max_gap_s=6.0))
        for obj in np.unique(truth):
            online = set(ids[truth == obj].tolist())
            total += len(online) - 1
            joined += len(online) - len(set(res.track_id[truth == obj].tolist()))
        for lid in np.unique(res.track_id[res.track_id >= 0]):
            objs = set(truth[res.track_id == lid].tolist())
            wrong += len(objs) - 1
    assert total > 10  # the online pass did break tracks at the occlusions
    assert joined >= 0.8 * total
    assert wrong <= 0.05 * total


def test_short_false_chains_are_dropped_and_ids_keep_the_first_tracklet() -> None:
    t = np.array([0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 3.0])
    x = np.array([100.0, 150.0, 200.0, 350.0, 400.0, 450.0, 1500.0])
    xyxy = np.stack([x, np.full(7, 100.0), x + 40, np.full(7, 200.0)], axis=1)
    ids = np.array([4, 4, 4, 9, 9, 9, 7])  # 7: one stray box far away
    res = link_tracks(ids, t, xyxy, config=LinkerConfig(min_hits=2))
    assert res.track_id.tolist() == [4, 4, 4, 4, 4, 4, -1]
    assert res.id_map == {4: 4, 9: 4, 7: -1}
    assert res.links == [(4, 9)]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one row each"):
        link_tracks(np.zeros(2, int), np.zeros(3), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="max_gap_s must be positive"):
        LinkerConfig(max_gap_s=0)
    assert link_tracks(np.zeros(0, int), np.zeros(0), np.zeros((0, 4))).track_id.tolist() == []
