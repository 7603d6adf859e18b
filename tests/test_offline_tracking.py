"""The offline pass (`streamvg.tracking.offline`): deferred pairings on scenes with crossings
and gaps, at a grounding rate (2 answers a second), against the online tracker."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.errors import TrackingError
from streamvg.tracking import Tracker
from streamvg.tracking.offline import OfflineConfig, track_offline
from streamvg.types import Detections

FPS = 2.0


def scene(seed: int, *, n: int = 4, seconds: float = 8.0, jitter: float = 0.03, drop: float = 0.1
          ) -> tuple[list[tuple[Detections, float]], list[np.ndarray]]:
    """People-sized boxes walking left or right along a few rows of a 640×480 frame, so they
    pass each other, entering and leaving at random times; boxes jittered, some dropped.
    Returns the frames and, per frame, the true object of each box."""
    rng = np.random.default_rng(seed)
    objs = []
    for _ in range(n):
        h = rng.uniform(120, 200)
        objs.append((rng.uniform(100, 540), rng.uniform(150, 330), 0.4 * h, h,
                     rng.choice([-1, 1]) * rng.uniform(0.4, 1.0) * h,
                     rng.uniform(0, seconds / 2), rng.uniform(seconds / 2, seconds)))
    frames, truth = [], []
    for t in np.arange(0, seconds, 1 / FPS):
        boxes, ids = [], []
        for k, (x0, y, w, h, v, t0, t1) in enumerate(objs):
            if not t0 <= t <= t1 or rng.random() < drop:
                continue
            cx = x0 + v * (t - t0)
            boxes.append(np.array([cx - w / 2, y - h / 2, cx + w / 2, y + h / 2])
                         + rng.normal(0, jitter, 4) * np.array([w, h, w, h]))
            ids.append(k)
        frames.append((Detections(np.array(boxes, float).reshape(-1, 4), rng.uniform(0.6, 1.0, len(ids))), float(t)))
        truth.append(np.array(ids, int))
    return frames, truth


def labelled(frames: list[tuple[Detections, float]], truth: list[np.ndarray], tracked: list[Detections]) -> np.ndarray:
    """`(rows, 3)`: (true object, track id, update index) of every reported box."""
    rows = []
    for u, ((d, _), g, r) in enumerate(zip(frames, truth, tracked, strict=True)):
        for i in range(len(r)):
            j = int(np.abs(d.xyxy - r.xyxy[i]).sum(axis=1).argmin())  # rows come back unchanged
            assert np.array_equal(d.xyxy[j], r.xyxy[i])
            rows.append((int(g[j]), int(r.track_id[i]), u))
    return np.array(rows, int).reshape(-1, 3)


def purity(rows: np.ndarray) -> float:
    """The smaller of: the share of each object's boxes under its main id, and the share
    of each id's boxes on its main object (1.0: ids follow objects exactly)."""
    if len(rows) == 0:
        return 1.0

    def share(a: int, b: int) -> float:
        return sum(np.unique(rows[rows[:, a] == v, b], return_counts=True)[1].max() for v in np.unique(rows[:, a])) / len(rows)

    return min(share(0, 1), share(1, 0))


def online(frames: list[tuple[Detections, float]]) -> list[Detections]:
    trk = Tracker(interval_s=1 / FPS)
    return [trk.update(d, t) for d, t in frames]


def test_deferred_pairing_keeps_ids_on_their_objects_where_the_online_tracker_swaps() -> None:
    # Seed 5: a new object appears beside another; online pairs them wrongly, offline not.
    frames, truth = scene(5)
    assert purity(labelled(frames, truth, online(frames))) < 1.0
    res = track_offline(frames, interval_s=1 / FPS)
    assert purity(labelled(frames, truth, res.tracked)) == 1.0
    assert res.changed >= 1


def test_over_many_scenes_the_offline_pass_is_closer_to_the_truth_than_the_online_tracker() -> None:
    on, off, better, worse = [], [], 0, 0
    for seed in range(40):
        frames, truth = scene(seed)
        p_on = purity(labelled(frames, truth, online(frames)))
        p_off = purity(labelled(frames, truth, track_offline(frames, interval_s=1 / FPS).tracked))
        on.append(p_on)
        off.append(p_off)
        better += p_off > p_on
        worse += p_off < p_on
    assert np.mean(off) > np.mean(on)
    assert better > 2 * worse


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), drop=st.sampled_from([0.0, 0.2]))
def test_no_id_is_ever_on_two_boxes_of_one_frame_and_every_box_reported_once(seed: int, n: int, drop: float) -> None:
    frames, _ = scene(seed, n=n, drop=drop)
    res = track_offline(frames, interval_s=1 / FPS)
    assert len(res.tracked) == len(frames)
    for (d, _), r in zip(frames, res.tracked, strict=True):
        assert len(np.unique(r.track_id)) == len(r)  # two objects seen together never share an id
        assert (r.track_id >= 0).all() and len(r) <= len(d)
    # Events tell the same story as the boxes: each id starts once and ends once.
    kinds: dict[int, list[str]] = {}
    for e in res.events:
        kinds.setdefault(e.track_id, []).append(e.kind)
    ids = {int(i) for r in res.tracked for i in r.track_id.tolist()}
    assert set(kinds) == ids
    for k in kinds.values():
        assert k[0] == "started" and k[-1] == "ended" and k.count("started") == 1 and k.count("ended") == 1
    assert set(res.first_seen) == ids


def test_an_object_unseen_for_a_while_keeps_its_id_and_a_newcomer_after_max_lost_gets_a_new_one() -> None:
    box = lambda x: Detections(np.array([[x, 100.0, x + 60, 250.0]]), np.array([0.9]))  # noqa: E731
    # Walks right at 60 px/s, unseen from 2 s to 3.5 s (occluded), seen again where it would be.
    frames = [(box(100 + 60 * t) if not 2.0 <= t < 3.5 else Detections.empty(), t) for t in np.arange(0, 6, 0.5)]
    ids = {int(i) for r in track_offline(frames, interval_s=0.5).tracked for i in r.track_id.tolist()}
    assert ids == {0}
    # Gone for longer than max_lost_s: a box afterwards is a new object.
    frames = [(box(100.0), 0.0), (box(100.0), 0.5), (box(100.0), 5.0)]
    res = track_offline(frames, interval_s=0.5)
    assert [r.track_id.tolist() for r in res.tracked] == [[0], [0], [1]]


def test_without_alternatives_it_is_the_online_tracker() -> None:
    for seed in range(5):
        frames, _ = scene(seed)
        res = track_offline(frames, offline=OfflineConfig(max_alternatives=0), interval_s=1 / FPS)
        for a, b in zip(online(frames), res.tracked, strict=True):
            assert a.track_id.tolist() == b.track_id.tolist() and np.array_equal(a.xyxy, b.xyxy)
        assert res.changed == 0


def test_bad_input_is_one_clear_error() -> None:
    good = Detections(np.array([[0.0, 0, 10, 10]]), np.array([0.9]))
    with pytest.raises(TrackingError, match="went back"):
        track_offline([(good, 1.0), (good, 0.5)])
    with pytest.raises(ValueError, match="horizon"):
        OfflineConfig(horizon=-1)
    assert track_offline([]).tracked == []


def _crowd(n: int, frames: int, seed: int = 0) -> list[tuple[Detections, float]]:
    """`n` nearly identical boxes per frame (a dense crowd, or a model repeating one box):
    every pair of tracks is a plausible swap."""
    rng = np.random.default_rng(seed)
    return [(Detections(np.tile([100.0, 100.0, 150.0, 200.0], (n, 1)) + rng.normal(0, 0.5, (n, 4)),
                        np.full(n, 0.9)), k / FPS) for k in range(frames)]


def test_a_crowd_of_boxes_costs_memory_quadratic_in_its_size_not_cubic() -> None:
    # 300 tracks have ~45,000 candidate swaps; only max_alternatives (12) may become pairings.
    import tracemalloc

    from streamvg.tracking.offline import _alternatives

    n = 300
    frames = _crowd(n, 3)
    trk = Tracker(interval_s=1 / FPS)
    for d, t in frames[:2]:
        trk.update(d, t)
    tracemalloc.start()
    try:
        alts = _alternatives(trk, frames[2][0], frames[2][1], None, OfflineConfig())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(alts) == 1 + OfflineConfig().max_alternatives
    assert peak < 40 * n * n * 8  # a few (tracks × boxes) float matrices


def test_tracker_updates_per_frame_are_bounded_by_the_offline_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    update = Tracker._update

    def counted(self: Tracker, *args: object, **kwargs: object) -> Detections:
        calls[0] += 1
        return update(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Tracker, "_update", counted)
    cfg = OfflineConfig(horizon=3, max_alternatives=5)
    frames = _crowd(120, 8)
    track_offline(frames, interval_s=1 / FPS, offline=cfg)
    # per frame: each alternative and the online choice played over the horizon, then the kept one
    assert calls[0] <= len(frames) * ((1 + cfg.max_alternatives) * (1 + cfg.horizon) + 1)
