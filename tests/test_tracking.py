"""The time-aware tracker: ids across crossings, gaps and irregular times; lifecycle events; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streamvg.config import TrackerConfig
from streamvg.errors import StreamVGError, TrackingError
from streamvg.tracking import BoxKalman, Tracker, TrackerInputError
from streamvg.tracking.kalman import xyxy_to_cxcywh
from streamvg.types import Detections


def boxes(*xyxy: tuple[float, float, float, float], score: float = 0.9) -> Detections:
    arr = np.array(xyxy, dtype=np.float32).reshape(-1, 4)
    return Detections(arr, np.full(len(arr), score, np.float32))


def person(cx: float, cy: float, h: float = 120.0) -> tuple[float, float, float, float]:
    w = 0.4 * h
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def ids_by_x(out: Detections) -> dict[int, float]:
    """track id -> box centre x."""
    cx = (out.xyxy[:, 0] + out.xyxy[:, 2]) / 2
    return dict(zip(out.track_id.tolist(), cx.tolist(), strict=True))


def test_crossing_objects_keep_ids_at_low_rate() -> None:
    # Two people walk towards each other at 60 px/s (1.25 box widths/s), sampled at 1 Hz
    # with a jittered clock; they cross between t=4 and t=6 (their boxes overlap then).
    trk = Tracker()
    rng = np.random.default_rng(0)
    times = np.cumsum(rng.uniform(0.8, 1.2, 12))
    first: dict[int, str] = {}
    for t in times:
        a = person(100 + 60 * t, 200)
        b = person(600 - 60 * t, 215)
        out = trk.update(boxes(a, b), float(t))
        for tid, cx in ids_by_x(out).items():
            who = "a" if abs(cx - (a[0] + a[2]) / 2) < abs(cx - (b[0] + b[2]) / 2) else "b"
            assert first.setdefault(tid, who) == who, f"id {tid} switched to {who} at t={t:.2f}"
    assert sorted(first.values()) == ["a", "b"]
    assert len(first) == 2


def test_boxes_that_no_longer_overlap_keep_their_id() -> None:
    # 1.7 updates/s: each step moves the box by 1.5 widths, so consecutive boxes never overlap.
    trk = Tracker()
    seen = set()
    for k in range(10):
        t = k / 1.7
        out = trk.update(boxes(person(50 + 72 * k, 240)), t)
        seen.update(out.track_id.tolist())
    assert seen == {0}


def test_missing_for_less_than_max_lost_keeps_id_and_longer_ends() -> None:
    trk = Tracker(max_lost_s=2.0)
    for t in (0.0, 0.5, 1.0):
        trk.update(boxes(person(100 + 50 * t, 200)), t)
    (tid,) = {tr.track_id for tr in trk.tracks}
    trk.pop_events()
    trk.update(Detections.empty(), 1.5)
    assert [e.kind for e in trk.pop_events()] == ["lost"]
    out = trk.update(boxes(person(100 + 50 * 2.8, 200)), 2.8)  # 1.8 s unseen < 2.0 s
    assert out.track_id.tolist() == [tid]
    assert [e.kind for e in trk.pop_events()] == ["updated"]
    trk.update(Detections.empty(), 4.0)
    trk.update(Detections.empty(), 4.9)  # 2.1 s unseen > 2.0 s
    events = trk.pop_events()
    assert [e.kind for e in events] == ["lost", "ended"]
    assert events[-1].t == pytest.approx(2.8)  # ended carries the last time seen
    assert trk.tracks == []
    # The object returns after its track ended: a new id.
    trk.update(boxes(person(300, 200)), 5.0)
    out = trk.update(boxes(person(310, 200)), 5.5)
    assert out.track_id.tolist() == [tid + 1]


def test_lifecycle_events_and_confirmation() -> None:
    trk = Tracker(min_confirm_hits=3, confirm_s=0.0)  # always 3 hits, whatever the rate
    outs = [trk.update(boxes(person(100 + 10 * k, 100)), 0.2 * k) for k in range(4)]
    assert [len(o) for o in outs] == [0, 0, 1, 1]
    events = trk.pop_events()
    assert [e.kind for e in events] == ["started", "updated"]
    assert events[0].t == pytest.approx(0.4) and events[0].track_id == 0
    assert events[0].xyxy.shape == (4,) and events[0].score == pytest.approx(0.9)
    (track,) = trk.tracks
    assert track.state == "tracked" and track.hits == 4 and track.first_t == 0.0
    assert track.velocity[0] > 0  # moving right
    trk.finish(0.8)
    assert [e.kind for e in trk.pop_events()] == ["ended"]
    assert trk.tracks == []


def test_min_confirm_hits_one_reports_at_once() -> None:
    trk = Tracker(min_confirm_hits=1)
    out = trk.update(boxes(person(100, 100), person(400, 100)), 0.0)
    assert out.track_id.tolist() == [0, 1]
    assert [e.kind for e in trk.pop_events()] == ["started", "started"]


def test_tentative_track_from_a_single_false_box_never_reports() -> None:
    trk = Tracker(confirm_s=0.0)
    trk.update(boxes(person(100, 100)), 0.0)
    out = trk.update(boxes(person(500, 300)), 0.5)  # far away: not the same object
    assert len(out) == 0 and trk.pop_events() == []


@pytest.mark.parametrize(("rate", "hits"), [(25.0, 2), (12.0, 2), (9.0, 1), (5.0, 1), (1.0, 1)])
def test_confirmation_is_in_seconds_at_grounding_rates(rate: float, hits: int) -> None:
    # At 25 updates/s a stray box must repeat before it is a track; at grounding rates
    # waiting for a second box would hide every real object for a whole interval.
    trk = Tracker()  # min_confirm_hits=2, confirm_s=0.1
    trk.update(boxes(person(900, 300)), 0.0)  # someone else, so the interval is known
    trk.update(boxes(person(900, 300)), 1.0 / rate)
    trk.pop_events()
    out = trk.update(boxes(person(900, 300), person(100, 100)), 2.0 / rate)
    assert (100.0 in ids_by_x(out).values()) == (hits == 1)
    out = trk.update(boxes(person(900, 300), person(100, 100)), 3.0 / rate)
    assert 100.0 in ids_by_x(out).values()


def test_low_score_boxes_extend_but_never_start_tracks() -> None:
    trk = Tracker(high_score=0.6, low_score=0.2)
    assert len(trk.update(boxes(person(100, 100), score=0.4), 0.0)) == 0
    assert len(trk.update(boxes(person(105, 100), score=0.4), 0.1)) == 0
    assert trk.tracks == []
    trk.update(boxes(person(100, 100)), 1.0)
    trk.update(boxes(person(110, 100)), 1.2)
    out = trk.update(boxes(person(120, 100), score=0.3), 1.4)  # weak box, existing track
    assert out.track_id.tolist() == [0] and out.score.tolist() == pytest.approx([0.3])
    assert len(trk.update(boxes(person(130, 100), score=0.1), 1.6)) == 0  # below low_score


def test_empty_updates_and_output_columns() -> None:
    trk = Tracker()
    out = trk.update(Detections.empty(), 0.0)
    assert len(out) == 0 and out.xyxy.shape == (0, 4)
    d = Detections(
        np.array([[10, 10, 50, 110], [300, 10, 340, 110], [600, 0, 610, 5]], np.float32),
        np.array([0.9, 0.8, 0.05], np.float32), image_index=np.array([2, 2, 2]),
    )
    trk.update(d, 0.5)
    shifted = Detections(d.xyxy + np.float32(5), d.score, d.image_index)
    out = trk.update(shifted, 0.7)
    # Input order kept, pixel boxes and other columns untouched, the unscored box left out.
    assert out.track_id.tolist() == [0, 1]
    np.testing.assert_array_equal(out.xyxy, shifted.xyxy[:2])
    assert out.image_index.tolist() == [2, 2]
    trk.pop_events()
    out = trk.update(Detections.empty(), 0.8)
    assert len(out) == 0 and out.track_id.dtype == np.int64
    assert sorted((e.kind, e.track_id) for e in trk.pop_events()) == [("lost", 0), ("lost", 1)]
    assert [tr.state for tr in trk.tracks] == ["lost", "lost"]


def test_update_window_feeds_frames_in_time_order() -> None:
    trk = Tracker()
    # Frames listed out of time order: image 0 is the latest.
    times = [1.0, 0.0, 0.5]
    xs = {0: 200.0, 1: 100.0, 2: 150.0}
    d = Detections.concat([
        Detections(np.array([person(xs[k], 100)], np.float32), np.array([0.9]), np.array([k])) for k in (0, 1, 2)
    ])
    out = trk.update_window(d, times)
    assert out.image_index.tolist() == [2, 0]  # frames at 0.5 s and 1.0 s (confirmed at the 2nd)
    assert set(out.track_id.tolist()) == {0}
    assert trk.t == 1.0
    with pytest.raises(TrackerInputError, match="image_index must lie in"):
        trk.update_window(d, [2.0, 2.5])


def test_irregular_times_and_duplicate_time() -> None:
    trk = Tracker()
    times = [0.0, 0.04, 0.9, 0.95, 2.6, 2.6, 2.65, 4.0]
    seen = set()
    for t in times:
        seen.update(trk.update(boxes(person(100 + 40 * t, 150)), t).track_id.tolist())
    assert seen == {0}


@pytest.mark.parametrize(
    ("xyxy", "match"),
    [
        ([[0, 0, np.nan, 10]], "not finite"),
        ([[0, 0, np.inf, 10]], "not finite"),
        ([[10, 0, 5, 10]], "x2 < x1"),
        ([[0, 10, 5, 0]], "y2 < y1"),
    ],
)
def test_bad_boxes_are_rejected_clearly(xyxy: list[list[float]], match: str) -> None:
    trk = Tracker()
    with pytest.raises(TrackerInputError, match=match):
        trk.update(Detections(np.array(xyxy, np.float32)), 0.0)
    assert trk.t is None  # nothing changed


def test_bad_times_and_types_are_rejected_clearly() -> None:
    trk = Tracker()
    trk.update(boxes(person(100, 100)), 2.0)
    with pytest.raises(TrackerInputError, match=r"went back from 2\.000s to 1\.000s"):
        trk.update(boxes(person(100, 100)), 1.0)
    with pytest.raises(TrackerInputError, match="finite"):
        trk.update(boxes(person(100, 100)), float("nan"))
    with pytest.raises(TrackerInputError, match=r"must be streamvg\.types\.Detections, got ndarray"):
        trk.update(np.zeros((1, 4)), 3.0)  # type: ignore[arg-type]
    with pytest.raises(TrackerInputError, match="spans several frames"):
        trk.update(Detections(np.zeros((2, 4)), image_index=np.array([0, 1])), 3.0)


def test_config_checks_name_the_argument_and_value() -> None:
    with pytest.raises(ValidationError, match=r"low_score must be at most high_score \(= 0.3\); the value given is 0.6"):
        TrackerConfig(low_score=0.6, high_score=0.3)
    with pytest.raises(ValidationError, match="max_lost_s"):
        Tracker(max_lost_s=-1)
    assert Tracker(TrackerConfig(max_lost_s=7), min_confirm_hits=1).config.max_lost_s == 7


def test_ids_are_per_instance_and_reset_restarts_them() -> None:
    a, b = Tracker(min_confirm_hits=1), Tracker(min_confirm_hits=1)
    a.update(boxes(person(100, 100), person(400, 100)), 0.0)
    assert b.update(boxes(person(100, 100)), 0.0).track_id.tolist() == [0]
    a.reset()
    assert a.t is None and a.tracks == [] and a.pop_events() == []
    assert a.update(boxes(person(100, 100)), 0.0).track_id.tolist() == [0]


def test_state_round_trip_continues_exactly_like_the_original() -> None:
    # Scale-out workers hand a camera's trackers over as plain arrays + JSON (no pickle).
    trk = Tracker(max_lost_s=3.0, frame_size=(800, 600))
    for k in range(4):  # a confirmed track, a tentative one, a pending event
        trk.update(boxes(person(100 + 50 * k, 100), *([person(600, 300)] if k == 3 else [])), 0.5 * k)
    meta, arrays = trk.state()
    # Every per-track array the tracker keeps travels (a new one must be added to the state).
    kept = {k.lstrip("_") for k, v in vars(trk).items() if isinstance(v, np.ndarray)}
    assert kept == set(arrays) - {"event_xyxy"}
    assert json.loads(json.dumps(meta)) == meta
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
    copy = Tracker.from_state(meta, {k: a.copy() for k, a in arrays.items()})
    assert copy.config == trk.config and copy.t == trk.t and copy.frame_size == (800, 600)
    assert [(e.kind, e.track_id) for e in copy.pop_events()] == [(e.kind, e.track_id) for e in trk.pop_events()]
    rng = np.random.default_rng(3)
    ended = []
    for k in range(4, 14):  # same inputs afterwards -> same outputs and events
        dets = boxes(person(100 + 50 * k + rng.normal(0, 3), 100), person(600 + 20 * k, 300 + 5 * k), score=0.8)
        if k == 7:
            dets = Detections.empty()
        if k >= 10:  # the second object walks out on the right: it ends by the frame size the copy kept
            dets = dets[:1]
        a, b = trk.update(dets, 0.5 * k), copy.update(dets, 0.5 * k)
        assert a.track_id.tolist() == b.track_id.tolist() and np.array_equal(a.xyxy, b.xyxy)
        events = [(e.kind, e.track_id, e.t) for e in trk.pop_events()]
        assert events == [(e.kind, e.track_id, e.t) for e in copy.pop_events()]
        ended += [tid for kind, tid, _ in events if kind == "ended"]
    assert ended == [1]
    assert {tr.track_id for tr in copy.tracks} == {0}


def test_states_without_a_frame_size_still_load() -> None:
    """States saved before the frame size was kept load as "size unknown"; a bad size is
    rejected like any other malformed state."""
    trk = Tracker(frame_size=(640, 480))
    trk.update(boxes(person(100, 100)), 0.0)
    meta, arrays = trk.state()
    assert meta["frame_size"] == [640.0, 480.0]
    old = {k: v for k, v in meta.items() if k != "frame_size"}
    assert Tracker.from_state(old, arrays).frame_size is None
    with pytest.raises(TrackingError, match=r"saved tracker state is incomplete or malformed.*frame_size"):
        Tracker.from_state({**meta, "frame_size": [640, -480]}, arrays)


def test_malformed_state_is_rejected_clearly() -> None:
    trk = Tracker()
    trk.update(boxes(person(100, 100)), 0.0)
    meta, arrays = trk.state()
    with pytest.raises(TrackingError, match="saved tracker state is incomplete or malformed"):
        Tracker.from_state(meta, {k: a for k, a in arrays.items() if k != "cov"})
    with pytest.raises(TrackingError, match="mean has shape"):
        Tracker.from_state(meta, {**arrays, "mean": arrays["mean"][:, :4]})
    with pytest.raises(TrackingError, match="unknown event kind"):
        Tracker.from_state({**meta, "events": [["teleported", 0, 0.0, 0.9]]}, arrays)


def test_kalman_prediction_is_bounded_over_long_gaps() -> None:
    kf = BoxKalman(measurement_noise=0.05, velocity_change=1.0, initial_speed=1.5, velocity_memory_s=2.0)
    mean, cov = kf.initiate(xyxy_to_cxcywh(np.array([[0, 0, 40, 100]])))
    mean[:, 4] = 100.0  # 100 px/s to the right
    short, _ = kf.predict(mean, cov, 0.04)
    long_, cov_long = kf.predict(mean, cov, 60.0)
    assert short[0, 0] == pytest.approx(20 + 100 * 0.04, rel=0.02)
    assert long_[0, 0] < 20 + 100 * 2.0 + 1e-6  # at most speed x velocity_memory_s
    # Uncertainty grows with time, so the gate widens after a gap.
    _, cov_short = kf.predict(mean, cov, 0.5)
    assert cov_long[0, 0, 0] > cov_short[0, 0, 0] > cov[0, 0, 0]


def test_kalman_closed_form_matches_the_dense_equations() -> None:
    # The filter keeps only the 2x2 blocks of the 8x8 covariance; check it against the
    # textbook matrices: P' = F P Fᵀ + Q, K = P Hᵀ (H P Hᵀ + R)⁻¹, P'' = (I − K H) P.
    mn, vc, speed, tau = 0.08, 1.0, 1.5, 2.0
    kf = BoxKalman(measurement_noise=mn, velocity_change=vc, initial_speed=speed, velocity_memory_s=tau)
    mean, cov = kf.initiate(xyxy_to_cxcywh(np.array([[0, 0, 40, 100], [300, 50, 460, 110]])))
    dense_mean, dense = mean.copy(), BoxKalman.dense_cov(cov)
    h = np.hstack([np.eye(4), np.zeros((4, 4))])
    rng = np.random.default_rng(3)
    for dt in (0.3, 1.7, 0.04):
        decay = np.exp(-dt / tau)
        f = np.eye(8)
        f[range(4), range(4, 8)] = tau * (1 - decay)
        f[range(4, 8), range(4, 8)] = decay
        w, hh = dense_mean[:, 2], dense_mean[:, 3]
        q = vc**2 * np.stack([w * hh, w * hh, (0.2 * w) ** 2, (0.2 * hh) ** 2], axis=1)
        block = np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]])
        qmat = np.stack([np.kron(block, np.diag(qi)) for qi in q])
        dense_mean = dense_mean @ f.T
        dense = f @ dense @ f.T + qmat
        mean, cov = kf.predict(mean, cov, dt)
        np.testing.assert_allclose(mean, dense_mean, rtol=1e-12)
        np.testing.assert_allclose(BoxKalman.dense_cov(cov), dense, rtol=1e-12, atol=1e-9)

        z = dense_mean[:, :4] + rng.normal(0, 5, (2, 4))
        wh = dense_mean[:, 2:4]
        r = np.stack([np.diag((mn * np.concatenate([wi, wi])) ** 2) for wi in wh])
        s = h @ dense @ h.T + r
        k = dense @ h.T @ np.linalg.inv(s)
        dense_mean = dense_mean + np.einsum("nij,nj->ni", k, z - dense_mean[:, :4])
        dense = (np.eye(8) - k @ h) @ dense
        pred, s_diag, spread = kf.innovation(mean, cov)
        np.testing.assert_allclose(s_diag, np.diagonal(s, axis1=1, axis2=2), rtol=1e-12)
        np.testing.assert_allclose(spread, np.linalg.slogdet(s)[1] - np.linalg.slogdet(r)[1], rtol=1e-9)
        np.testing.assert_allclose(
            kf.mahalanobis(pred, s_diag, z[::-1]),
            np.einsum("nmi,nij,nmj->nm", z[None, ::-1] - pred[:, None], np.linalg.inv(s), z[None, ::-1] - pred[:, None]),
            rtol=1e-12,
        )
        mean, cov = kf.update(mean, cov, z)
        np.testing.assert_allclose(mean, dense_mean, rtol=1e-12)
        np.testing.assert_allclose(BoxKalman.dense_cov(cov), dense, rtol=1e-9, atol=1e-9)


def test_tracking_error_is_the_shared_error_class() -> None:
    assert TrackerInputError is TrackingError
    assert issubclass(TrackingError, StreamVGError) and issubclass(TrackingError, ValueError)
    with pytest.raises(TrackingError, match="went back"):
        trk = Tracker()
        trk.update(Detections.empty(), 1.0)
        trk.update(Detections.empty(), 0.5)


@pytest.mark.parametrize("frame_size", [None, (320, 192)])
def test_object_bouncing_off_the_frame_edge_keeps_its_id(frame_size: tuple[int, int] | None) -> None:
    """Boxes clipped by the bottom edge shrink, then the object turns back: the motion
    prediction overshoots, and overlap with where it was last seen re-finds it. Knowing the
    frame changes nothing: the track is matched at every update, so it never counts as gone
    however far past the edge its prediction runs."""
    boxes = [
        (1.8, [283, 131, 317, 165]), (2.0, [291, 143, 320, 177]), (2.2, [295, 156, 320, 190]),
        (2.4, [287, 168, 320, 192]), (2.6, [279, 174, 313, 192]), (2.8, [272, 162, 305, 192]),
        (3.0, [264, 150, 298, 184]), (3.2, [256, 137, 290, 171]),
    ]
    tracker = Tracker(frame_size=frame_size)
    ids = []
    for t, b in boxes:
        out = tracker.update(Detections(xyxy=np.array([b], dtype=np.float32), score=np.array([0.9])), t)
        ids.extend(out.track_id.tolist())
    assert len(ids) == len(boxes) - 1  # all but the first (confirmation) are reported
    assert set(ids) == {ids[0]}


@pytest.mark.parametrize("dropped", [(), (33,), (33, 34), (34,)])
def test_fast_object_turning_back_at_25_fps_keeps_its_id(dropped: tuple[int, ...]) -> None:
    """A person at 6 widths/s reverses at once (frame 30), and a box or two are missed just
    after: the motion model, sure of the old velocity, predicts it ever further off, so the
    track must be re-found by overlap and its velocity learned again, not left for a new id."""
    trk = Tracker()
    ids: set[int] = set()
    for k in range(60):
        if k in dropped:
            trk.update(Detections.empty(), k / 25)
            continue
        x = 100 + 12 * min(k, 30) - 12 * max(k - 30, 0)
        ids.update(trk.update(boxes(person(x, 200)), k / 25).track_id.tolist())
    assert ids == {0}


# --- max_lost_s is a hard limit (issue 17) ---------------------------------------------


def _one_box(x: float, y: float = 100.0) -> Detections:
    return Detections(np.array([[x, y, x + 40, y + 80]], np.float32), np.array([0.9], np.float32))


def test_a_box_after_a_long_gap_never_takes_the_old_id() -> None:
    # The case from the issue: a box every 0.2 s for 2 s, then one box 400 px away 60 s later.
    trk = Tracker(max_lost_s=3.0)
    for k in range(11):
        trk.update(_one_box(100 + 5 * k), t=0.2 * k)
    old = {e.track_id for e in trk.pop_events() if e.kind == "started"}
    assert len(old) == 1
    out = trk.update(_one_box(500), t=62.0)
    events = trk.pop_events()
    ended = [e for e in events if e.kind == "ended"]
    assert [e.track_id for e in ended] == list(old)
    assert ended[0].t == pytest.approx(2.0)  # the time it was last seen, not the gap's end
    assert not set(out.track_id.tolist()) & old


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([1.0, 2.0, 5.0, 25.0]),
    max_lost_s=st.floats(0.5, 10.0),
    gap_factor=st.floats(0.05, 20.0),
    shift=st.floats(0.0, 600.0),
)
def test_max_lost_s_decides_whether_a_track_comes_back(rate: float, max_lost_s: float, gap_factor: float, shift: float) -> None:
    """Whatever the rate and the place of the next box: after a gap longer than
    `max_lost_s` the old id is never returned; within it, a box where the object was
    re-finds the same id."""
    dt = 1.0 / rate
    max_lost_s = max(max_lost_s, 1.5 * dt)  # a limit shorter than the frame interval ends every track
    trk = Tracker(max_lost_s=max_lost_s, min_confirm_hits=2)
    t = 0.0
    for _ in range(6):
        trk.update(_one_box(100.0), t=t)
        t += dt
    last_seen = t - dt
    ids = {e.track_id for e in trk.pop_events() if e.kind == "started"}
    assert len(ids) == 1
    gap = max_lost_s * gap_factor
    if abs(gap - max_lost_s) < 1e-6:
        return  # the boundary itself is either side, by rounding
    out = trk.update(_one_box(100.0 + (shift if gap > max_lost_s else 0.0)), t=last_seen + gap)
    got = set(out.track_id.tolist())
    if gap > max_lost_s:
        assert not got & ids
        assert [e.track_id for e in trk.pop_events() if e.kind == "ended"] == list(ids)
    else:
        assert got == ids


@pytest.mark.parametrize(("rate", "missed", "same_id"), [
    (25.0, 14, True),    # 0.56 s unseen at 25/s: fewer misses in a row than max_missed_updates
    (25.0, 16, False),   # 0.64 s: 16 misses in a row show it is gone, though under max_lost_s
    (2.0, 4, True),      # 2 s at 2/s: four missed answers are not evidence; max_lost_s decides
])
def test_many_misses_in_a_row_end_a_track_at_high_rates_only(rate: float, missed: int, same_id: bool) -> None:
    trk = Tracker(interval_s=1 / rate)
    t = 0.0
    for _ in range(5):
        trk.update(boxes(person(200, 200)), t)
        t += 1 / rate
    trk.pop_events()
    for _ in range(missed):
        trk.update(Detections.empty(), t)
        t += 1 / rate
    out = trk.update(boxes(person(200, 200)), t)
    kinds = [e.kind for e in trk.pop_events()]
    if same_id:
        assert out.track_id.tolist() == [0] and "ended" not in kinds
    else:
        assert "ended" in kinds and out.track_id.tolist() in ([], [1])  # a new (maybe tentative) track
    assert TrackerConfig().max_missed_updates == 15


# --- a lost track that has left the frame ends (issue 22) ------------------------------


def _walk_out_right(trk: Tracker) -> None:
    """At 1 update/s, a person walks right at 80 px/s (1.7 widths/s) from x=340 and leaves a
    640 px wide frame: seen at t=0..3 (last at x=580), gone at t=4 and t=5."""
    for k in range(4):
        trk.update(boxes(person(340 + 80 * k, 240)), float(k))
    assert trk.update(Detections.empty(), 4.0).track_id.tolist() == []


def test_a_lost_track_that_left_the_frame_ends_and_an_entering_box_gets_a_new_id() -> None:
    trk = Tracker(frame_size=(640, 480))
    _walk_out_right(trk)
    trk.update(Detections.empty(), 5.0)
    events = trk.pop_events()
    assert [e.kind for e in events] == ["started", "updated", "updated", "lost", "ended"]
    assert events[-1].track_id == 0 and events[-1].t == pytest.approx(3.0)  # when it was last seen
    assert trk.tracks == []
    # Someone enters on the left two seconds after the first person was last seen.
    out = trk.update(boxes(person(40, 300)), 6.0)
    assert out.track_id.tolist() == [1]
    assert [(e.kind, e.track_id) for e in trk.pop_events()] == [("started", 1)]

    # Why: without the frame size the lost track's gate has grown over the whole frame by
    # then, and the newcomer takes the old id.
    blind = Tracker()
    _walk_out_right(blind)
    blind.update(Detections.empty(), 5.0)
    assert blind.update(boxes(person(40, 300)), 6.0).track_id.tolist() == [0]


def test_a_track_lost_inside_the_frame_keeps_its_id() -> None:
    """An occlusion in the middle of the picture: the prediction stays in the frame, so the
    track waits (up to max_lost_s) and the person coming out from behind keeps the id."""
    trk = Tracker(frame_size=(640, 480))
    for k in range(4):
        trk.update(boxes(person(100 + 80 * k, 240)), float(k))
    for t in (4.0, 5.0):  # hidden behind something at x≈420-500
        trk.update(Detections.empty(), t)
    assert [tr.state for tr in trk.tracks] == ["lost"]
    out = trk.update(boxes(person(100 + 80 * 6, 240)), 6.0)
    assert out.track_id.tolist() == [0]
    assert "ended" not in [e.kind for e in trk.pop_events()]


def test_a_track_matched_at_the_edge_stays_whatever_its_prediction() -> None:
    """Only unseen tracks end: a person standing at the right edge, their box half outside,
    with a prediction past the edge, is matched again at the next update."""
    trk = Tracker(frame_size=(640, 480))
    for k in range(8):
        out = trk.update(boxes(person(min(500 + 40 * k, 645), 240)), 0.5 * k)
    assert out.track_id.tolist() == [0]
    assert "ended" not in [e.kind for e in trk.pop_events()]


def test_the_frame_size_can_change_mid_stream() -> None:
    """The last size given counts (a stream restarted at another resolution): the same
    lost track waits in a 1280 px wide frame and ends once told the frame is 640 px wide."""
    trk = Tracker(frame_size=(1280, 720))
    _walk_out_right(trk)
    trk.update(Detections.empty(), 5.0)
    assert trk.update(boxes(person(340 + 80 * 6, 240)), 6.0).track_id.tolist() == [0]

    trk = Tracker(frame_size=(1280, 720))
    _walk_out_right(trk)
    trk.update(Detections.empty(), 5.0, frame_size=(640, 480))
    assert trk.frame_size == (640, 480)
    assert [e.kind for e in trk.pop_events()][-1] == "ended"

    trk = Tracker()  # unknown at first, then given with a window
    _walk_out_right(trk)
    trk.update_window(Detections.empty(), [5.0], frame_size=(640, 480))
    assert trk.frame_size == (640, 480) and trk.tracks == []
    trk.update(Detections.empty(), 6.0)  # None keeps the stored size
    assert trk.frame_size == (640, 480)


@pytest.mark.parametrize("bad", [(0, 480), (640, -1), (640.0, float("nan")), (float("inf"), 480), (640,),
                                 (640, 480, 3), "640x480", "64", (True, 480), 640])
def test_bad_frame_sizes_are_rejected_clearly(bad: object) -> None:
    match = r"frame_size must be \(width, height\) in positive pixels"
    with pytest.raises(TrackingError, match=match):
        Tracker(frame_size=bad)  # type: ignore[arg-type]
    trk = Tracker(frame_size=(640, 480))
    with pytest.raises(TrackingError, match=match):
        trk.update(Detections.empty(), 0.0, frame_size=bad)  # type: ignore[arg-type]
    with pytest.raises(TrackingError, match=match):
        trk.update_window(Detections.empty(), [0.0], frame_size=bad)  # type: ignore[arg-type]
    assert trk.frame_size == (640, 480) and trk.t is None  # a rejected call changes nothing


def _visible(c: np.ndarray, w: float, h: float, size: tuple[int, int]) -> float:
    """Fraction of a box (centre `c`, size w x h) inside the frame."""
    ix = max(0.0, min(c[0] + w / 2, size[0]) - max(c[0] - w / 2, 0.0))
    iy = max(0.0, min(c[1] + h / 2, size[1]) - max(c[1] - h / 2, 0.0))
    return ix * iy / (w * h)


@settings(max_examples=60, deadline=None)
@given(
    rate=st.sampled_from([1.0, 1.7, 2.0, 5.0, 12.5, 25.0]),
    speed=st.floats(1.0, 5.0),  # box widths per second
    angle=st.floats(0.0, 2 * np.pi),
    start=st.tuples(st.floats(0.2, 0.8), st.floats(0.25, 0.75)),
    wait_s=st.floats(0.0, 2.9),
    inward=st.floats(0.0, 0.5),
)
def test_an_object_walking_out_never_hands_its_id_to_one_entering_elsewhere(
    rate: float, speed: float, angle: float, start: tuple[float, float], wait_s: float, inward: float
) -> None:
    """A person walks straight out of the frame in any direction at any rate and speed, seen
    (unclipped, like MOTChallenge boxes) while at least a quarter of them is in view; up to
    2.9 s later (max_lost_s is 3) someone enters on the far half of the frame. The newcomer
    never gets the old id, and the old track ends before max_lost_s."""
    size, h = (640, 480), 120.0
    w, dt = 0.4 * h, 1.0 / rate
    trk = Tracker(frame_size=size)
    v = speed * w * np.array([np.cos(angle), np.sin(angle)])
    p = np.array([start[0] * size[0], start[1] * size[1]])
    t, n, old = 0.0, 0, set()
    while _visible(p, w, h, size) >= 0.25:
        old |= set(trk.update(boxes(person(p[0], p[1], h)), t).track_id.tolist())
        t, p, n = t + dt, p + v * dt, n + 1
    if n < 4:
        return  # too short a walk to learn where it heads
    last_seen = t - dt
    while t < last_seen + wait_s:
        trk.update(Detections.empty(), t)
        t += dt
    far = np.clip(np.array(size) - p, [w / 2, h / 2], [size[0] - w / 2, size[1] - h / 2])  # mirrored through the centre
    far += inward * (np.array(size) / 2 - far)
    new = set()
    for _ in range(3):
        new |= set(trk.update(boxes(person(far[0], far[1], h)), t).track_id.tolist())
        t += dt
    assert old and not new & old
    while t < last_seen + 2.9:
        trk.update(Detections.empty(), t)
        t += dt
    assert old <= {e.track_id for e in trk.pop_events() if e.kind == "ended"}


_BOX = st.tuples(st.floats(-200, 800), st.floats(-200, 600), st.floats(1, 300), st.floats(1, 300), st.floats(0.05, 1.0))
_FRAME = st.tuples(st.lists(_BOX, max_size=5), st.sampled_from([0.0, 0.04, 0.5, 2.0, 5.0]),
                   st.sampled_from([None, (640, 480), (320, 240)]))


def _frames(drawn: list[tuple[list[tuple[float, ...]], float, tuple[int, int] | None]]
            ) -> list[tuple[Detections, float, tuple[int, int] | None]]:
    out, t = [], 0.0
    for rows, dt, size in drawn:
        t += dt
        xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h, _ in rows], float).reshape(-1, 4)
        out.append((Detections(xyxy, np.array([r[4] for r in rows], float)), t, size))
    return out


def _seen(trk: Tracker, d: Detections, t: float, size: tuple[int, int] | None) -> tuple[object, ...]:
    r = trk.update(d, t, frame_size=size)
    return (r.xyxy.tolist(), r.score.tolist(), r.track_id.tolist(),
            [(e.kind, e.track_id, e.t, e.xyxy.tolist(), e.score) for e in trk.pop_events()])


@settings(max_examples=60, deadline=None)
@given(drawn=st.lists(_FRAME, min_size=1, max_size=20), cut=st.integers(0, 20),
       size=st.sampled_from([None, (640, 480)]), max_missed=st.integers(1, 4))
def test_a_saved_state_and_a_clone_go_on_exactly_like_the_original(
    drawn: list[tuple[list[tuple[float, ...]], float, tuple[int, int] | None]], cut: int,
    size: tuple[int, int] | None, max_missed: int,
) -> None:
    # Tracks end by misses, by time and by leaving the frame; sizes change on the way.
    frames = _frames(drawn)
    trk = Tracker(frame_size=size, interval_s=0.5, max_missed_updates=max_missed)
    for d, t, s in frames[:cut]:
        trk.update(d, t, frame_size=s)
    meta, arrays = trk.state()
    saved = Tracker.from_state(json.loads(json.dumps(meta)), {k: a.copy() for k, a in arrays.items()})
    clone = trk._clone()
    after_clone = [_seen(clone, d, t, s) for d, t, s in frames[cut:]]
    meta2, arrays2 = trk.state()  # the clone's updates left the original alone
    assert meta2 == meta and all(np.array_equal(arrays[k], arrays2[k]) for k in arrays)
    assert [_seen(trk, d, t, s) for d, t, s in frames[cut:]] == after_clone
    assert [_seen(saved, d, t, s) for d, t, s in frames[cut:]] == after_clone


def test_states_saved_before_max_missed_updates_load_with_the_default() -> None:
    trk = Tracker(interval_s=0.04)
    for k in range(20):  # one track confirmed, then missed 18 updates in a row (0.72 s < max_lost_s)
        trk.update(boxes(person(100, 100)) if k < 2 else Detections.empty(), 0.04 * k)
    meta, arrays = trk.state()
    config = {k: v for k, v in meta["config"].items() if k != "max_missed_updates"}
    old = {k: v for k, v in meta.items() if k != "frame_size"} | {"config": config}
    loaded = Tracker.from_state(old, arrays)
    assert loaded.config.max_missed_updates == 15 and loaded.frame_size is None
    loaded.update(Detections.empty(), 0.8)
    assert [(e.kind, e.track_id) for e in loaded.pop_events() if e.kind == "ended"] == [("ended", 0)]


def test_max_missed_updates_ends_confirmed_tracks_only() -> None:
    # A tentative track may miss one update (a dropped answer) whatever max_missed_updates is.
    for max_missed in (15, 1):
        trk = Tracker(interval_s=0.04, max_missed_updates=max_missed)
        trk.update(boxes(person(100, 100)), 0.0)
        trk.update(Detections.empty(), 0.04)
        assert trk.update(boxes(person(100, 100)), 0.08).track_id.tolist() == [0], max_missed


def test_a_saved_state_keeps_the_expected_interval_through_a_reset() -> None:
    """`interval_s` (the sampler's 1/fps) travels with the state: a handed-over tracker
    that is reset (a new video on the camera) confirms at its first update as the original
    would, instead of waiting for min_confirm_hits."""
    trk = Tracker(interval_s=0.5)
    trk.update(boxes(person(100, 100)), 0.0)
    copy = Tracker.from_state(*trk.state())
    for t in (trk, copy):
        t.reset()
        assert t.update(boxes(person(300, 200)), 10.0).track_id.tolist() == [0]  # 1 hit at 2 updates/s
    old_meta, arrays = trk.state()
    del old_meta["interval_s"]  # a state saved before it travelled
    assert Tracker.from_state(old_meta, arrays).update(Detections.empty(), 11.0).track_id.tolist() == []
