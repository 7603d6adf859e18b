"""Change gating on real decoded video: still scenes (temporal noise, slow brightness drift,
x264 compression) interrupted by activity at known times, and `tests/media` clips made still
by repeating a frame with noise. The pipeline runs for real (decoder, sampler, windows, gate,
replay engine fed the scene's exact boxes, trackers, events)."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.cli import main
from streamvg.config import (
    EngineConfig,
    GatingConfig,
    PipelineConfig,
    QueryConfig,
    SamplingConfig,
    SourceConfig,
    TrackerConfig,
)
from streamvg.demo import EventCollector
from streamvg.events import Event, event_json_schema
from streamvg.gating import ChangeGate, changed_fraction, signature
from streamvg.pipeline import Pipeline
from streamvg.testing.still import StillScene, write_still_clip, write_still_scene
from streamvg.tracking import Tracker
from streamvg.types import Detections, Frame, Window

MEDIA = Path(__file__).resolve().parent / "media"
FPS = 2.0



@pytest.fixture(scope="module")
def still(tmp_path_factory: pytest.TempPathFactory) -> StillScene:
    return write_still_scene(tmp_path_factory.mktemp("still"), duration_s=36.0, fps=10.0)


def run(scene: StillScene, *, gating: bool, window: int = 2, stride: int = 2, max_unchanged_s: float = 30.0,
        max_lost_s: float = 3.0) -> tuple[Any, list[Event]]:
    cam = scene.video.stem
    cfg = PipelineConfig(
        name=f"gating-{uuid.uuid4().hex[:8]}",
        sources=[SourceConfig(name=cam, uri=str(scene.video))],
        sampling=SamplingConfig(fps=FPS, window_size=window, stride=stride),
        queries=[QueryConfig(id="q", text="the red square")],
        engine=EngineConfig(kind="replay", replay_path=str(scene.records_path)),
        tracker=TrackerConfig(max_lost_s=max_lost_s),
        gating=GatingConfig(enabled=gating, max_unchanged_s=max_unchanged_s),
    )
    sink = EventCollector()
    summary = Pipeline(cfg, sinks=[sink], collect_segments=True, control=False).run()
    return summary, sink.events


def _truth(scene: StillScene, t: float) -> dict[str, Any]:
    return min(scene.frames, key=lambda f: abs(f["pts"] - t))


def _windows(events: list[Event], size: int) -> list[list[Event]]:
    g = sorted((e for e in events if e.kind == "grounding"), key=lambda e: e.t or 0.0)
    return [g[i : i + size] for i in range(0, len(g), size)]


def test_still_scene_skips_still_windows_grounds_every_activity_and_finds_the_same_segments(still: StillScene) -> None:
    on, ev_on = run(still, gating=True)
    off, ev_off = run(still, gating=False)
    assert off.windows_unchanged == 0 and not any(e.carried_over for e in ev_off)
    assert on.windows_grounded + on.windows_unchanged == off.windows_grounded
    assert on.cameras["still"].windows_unchanged == on.windows_unchanged
    moving = still_windows = skipped = 0
    prev_box: list[float] | None = None
    for win in _windows(ev_on, 2):
        truths = [_truth(still, e.t or 0.0) for e in win]
        carried = {bool(e.carried_over) for e in win}
        assert len(carried) == 1, "a window is grounded or carried over as a whole"
        if any(t["moving"] for t in truths):
            moving += 1
            assert carried == {False}, f"window at {win[0].t}s shows activity but was not grounded"
        elif prev_box is not None and all(t["box"] == prev_box for t in truths):
            still_windows += 1
            skipped += carried == {True}
        prev_box = truths[-1]["box"]
    assert moving >= 6 and still_windows >= 20
    assert skipped >= 0.8 * still_windows, f"only {skipped} of {still_windows} still windows skipped"
    # A carried-over event repeats the last grounded answer, at the new frame's time.
    last: dict[str, Any] = {}
    for e in sorted((e for e in ev_on if e.kind == "grounding"), key=lambda e: e.t or 0.0):
        if e.carried_over:
            assert [b["xyxy"] for b in e.boxes] == last["xyxy"] and e.frame_index is not None
        else:
            last["xyxy"] = [b["xyxy"] for b in e.boxes]
    # Same segments as without gating (the hits differ: carried-over frames are no new evidence).
    key = lambda s: (s.query_id, s.track_id, round(s.start_s, 3), round(s.end_s, 3))  # noqa: E731
    assert [key(s) for s in on.segments] == [key(s) for s in off.segments] and on.segments
    for a, b in zip(on.segments, off.segments, strict=True):
        np.testing.assert_allclose(a.best_xyxy, b.best_xyxy, atol=1.0)


def test_tracks_keep_their_ids_across_still_stretches_longer_than_max_lost_s(still: StillScene) -> None:
    summary, events = run(still, gating=True, max_lost_s=2.0)
    grounded = sorted(e.t for e in events if e.kind == "grounding" and not e.carried_over and e.t is not None)
    gaps = [(a, b) for a, b in itertools.pairwise(grounded) if b - a > 2.0]
    assert any(b - a > 8.0 for a, b in gaps), f"no still stretch longer than max_lost_s without grounding: {gaps}"
    ends = [e for e in events if e.kind == "track_end"]
    last_t = max(e.t for e in events if e.kind == "grounding" and e.t is not None)
    assert all(abs((e.t or 0.0) - last_t) < 1e-6 for e in ends), f"a track ended inside a still stretch: {ends}"
    # One object, always visible: one track from its confirmation to the end of the video.
    assert len(summary.segments) == 1
    seg = summary.segments[0]
    assert seg.start_s <= 0.5 + 1e-6 and seg.end_s == pytest.approx(last_t)


def test_a_window_is_grounded_at_least_every_max_unchanged_s(still: StillScene) -> None:
    summary, events = run(still, gating=True, window=4, stride=2, max_unchanged_s=4.0)
    grounded = sorted(e.t for e in events if e.kind == "grounding" and not e.carried_over and e.t is not None)
    span = 4 / FPS  # a window's newest frame is at most this past its reference
    assert max(b - a for a, b in itertools.pairwise(grounded)) <= 4.0 + span
    assert summary.windows_unchanged > 0


@pytest.mark.parametrize("clip", ["carphone.mp4", "cup.mp4"])
def test_real_clips_made_still_skip_the_still_and_ground_the_playing(clip: str, tmp_path: Path) -> None:
    scene = write_still_clip(MEDIA / clip, tmp_path, duration_s=11.0, activity=((4.0, 6.5),))
    summary, events = run(scene, gating=True)
    still_windows = skipped = 0
    for win in _windows(events, 2):
        truths = [_truth(scene, e.t or 0.0) for e in win]
        carried = all(e.carried_over for e in win)
        if any(t["moving"] for t in truths) or scene.active(win[0].t or 0.0, win[-1].t or 0.0):
            assert not carried, f"{clip}: window at {win[0].t}s plays the clip but was carried over"
        elif (win[0].t or 0.0) > 0.0:
            still_windows += 1
            skipped += carried
    assert still_windows >= 5 and skipped >= 0.8 * still_windows, (skipped, still_windows)
    assert summary.windows_unchanged == skipped


def _decoded(path: Path, every: int) -> list[Frame]:
    with av.open(str(path)) as c:
        return [Frame(camera="c", index=i, pts=float(f.time), image=f.to_ndarray(format="rgb24"))
                for i, f in enumerate(c.decode(video=0)) if i % every == 0]


def test_a_query_added_while_the_scene_is_still_is_grounded_at_once(still: StillScene) -> None:
    frames = [f for f in _decoded(still.video, 5) if 13.0 <= f.pts <= 22.0]  # a still stretch
    gate = ChangeGate(GatingConfig(enabled=True, max_unchanged_s=60.0))
    win = [Window((f,)) for f in frames]
    assert gate.check(win[0], ["a"]).reason == "first"
    assert [gate.check(w, ["a"]).ground for w in win[1:4]] == [False] * 3
    assert gate.check(win[4], ["a", "b"]).reason == "new_query"
    assert not gate.check(win[5], ["a", "b"]).ground and not gate.check(win[6], ["b"]).ground
    gate.forget_query("b")  # removed, then added again: grounded again at once
    assert gate.check(win[7], ["a", "b"]).reason == "new_query"
    gate.forget("c")  # grounding failed: look again
    assert gate.check(win[8], ["a", "b"]).reason == "first"


@settings(max_examples=25, deadline=None)
@given(
    noise=st.floats(0.0, 6.0), drift=st.floats(0.85, 1.1), offset=st.floats(-10.0, 10.0),
    side=st.integers(24, 60), dx=st.integers(-80, 80), seed=st.integers(0, 2**16),
)
def test_noise_and_lighting_never_count_a_moved_object_always_does(
    noise: float, drift: float, offset: float, side: int, dx: int, seed: int
) -> None:
    """Sensor noise (σ ≤ 6 gray levels) and global lighting changes (gain 0.85-1.1, offset
    ±10, nothing saturating) are not change; an object of ≥ 24 px (in a 640x360 frame,
    ≥ 50 gray levels from the background) moved off its place is."""
    rng = np.random.default_rng(seed)
    import cv2

    bg = cv2.resize(rng.integers(30, 170, (12, 20, 3), dtype=np.uint8), (640, 360), interpolation=cv2.INTER_CUBIC)
    ref = bg.copy()
    ref[150 : 150 + side, 300 : 300 + side] = (220, 220, 220)
    cur = np.clip(ref.astype(np.float32) * drift + offset + rng.normal(0, noise, ref.shape), 0, 255).astype(np.uint8)
    c = GatingConfig()
    assert changed_fraction(signature(ref, c.width), signature(cur, c.width), c.pixel_threshold) <= c.min_changed_fraction
    if abs(dx) >= side:
        moved = bg.copy()
        moved[150 : 150 + side, 300 + dx : 300 + dx + side] = (220, 220, 220)
        moved = np.clip(moved.astype(np.float32) + rng.normal(0, noise, ref.shape), 0, 255).astype(np.uint8)
        assert changed_fraction(signature(ref, c.width), signature(moved, c.width), c.pixel_threshold) > c.min_changed_fraction


def test_tracker_hold_keeps_tracks_alive_and_boxes_and_lets_lost_ones_end() -> None:
    trk = Tracker(max_lost_s=1.0, min_confirm_hits=2)
    a = Detections(np.array([[10, 10, 50, 50]], np.float32), np.array([0.9], np.float32))
    b = Detections(np.array([[200, 10, 240, 50]], np.float32), np.array([0.9], np.float32))
    trk.update(Detections.concat([a, b]), 0.0)
    trk.update(Detections.concat([a, b]), 0.5)
    trk.update(a, 1.0)  # b missed: lost from here
    assert ("lost", 1) in [(e.kind, e.track_id) for e in trk.pop_events()]
    for k in range(1, 21):  # 10 s of a still scene, ten times max_lost_s
        held = trk.hold(1.0 + 0.5 * k)
        assert held.track_id.tolist() == [0] and held.xyxy[0].tolist() == [10, 10, 50, 50]
    kinds = [(e.kind, e.track_id) for e in trk.pop_events()]
    assert kinds == [("ended", 1)], kinds  # the lost one ended; the held one did not
    out = trk.update(Detections(np.array([[12, 11, 52, 51]], np.float32), np.array([0.9], np.float32)), 11.5)
    assert out.track_id.tolist() == [0]  # same id after the still stretch
    assert trk.tracks[0].velocity.tolist() == pytest.approx([0.0, 0.0], abs=5.0)


def test_carried_over_is_an_optional_documented_field_of_the_event_schema() -> None:
    d = Detections(np.array([[1, 2, 30, 40]], np.float32), np.array([0.8], np.float32))
    e = Event.grounding(pipeline="p", camera="c", query_id="q", query="x", t=1.0, frame_index=2, frame_size=(64, 48),
                        detections=d, model="m", carried_over=True)
    back = Event.from_json(e.to_json())
    assert back.carried_over is True and back == e
    plain = Event.grounding(pipeline="p", camera="c", query_id="q", query="x", t=1.0, frame_index=2, frame_size=(64, 48),
                            detections=d, model="m")
    assert plain.carried_over is None and plain.event_id == e.event_id  # one frame, one id
    old = json.loads(plain.to_json())
    old.pop("carried_over")  # an event written before the field existed still reads
    assert Event.from_dict(old).carried_over is None
    prop = event_json_schema()["properties"]["carried_over"]
    assert "changed" in prop["description"]


def test_search_json_reports_unchanged_windows_and_the_gating_flag(still: StillScene, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["search", str(still.video), "-q", "the red square", "--engine", "replay", "--replay", str(still.records_path),
            "--fps", "1", "--window", "2", "--stride", "2", "--json"]
    results = {}
    for flag in ("--gating", "--no-gating"):
        assert main([*base, flag]) == 0
        results[flag] = json.loads(capsys.readouterr().out)
    on, off = results["--gating"], results["--no-gating"]
    assert on["windows_unchanged"] > 0 and off["windows_unchanged"] == 0
    assert on["windows_grounded"] + on["windows_unchanged"] == off["windows_grounded"]
    assert on["model_work_by_camera"]["still"]["windows_unchanged"] == on["windows_unchanged"]
    strip = lambda segs: [{k: v for k, v in s.items() if k != "hits"} for s in segs]  # noqa: E731
    assert strip(on["segments"]) == strip(off["segments"])


def test_model_work_is_counted_per_camera_in_the_summary_and_prometheus(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """The real `gemvg` engine (tiny Qwen2.5-VL) behind the gate, two standing queries (so
    each grounded window shares its visual prefix): the summary, the cameras and the
    Prometheus registry agree on the work done, and unchanged windows cost none."""
    from prometheus_client import generate_latest

    from streamvg.testing.servers import free_port

    scene = write_still_scene(tmp_path, name="hall", duration_s=12.0, fps=5.0, activity=((5.0, 7.0),))
    cfg = PipelineConfig(
        name=f"work-{uuid.uuid4().hex[:8]}",
        sources=[SourceConfig(name="hall", uri=str(scene.video))],
        sampling=SamplingConfig(fps=1.0, window_size=2, stride=2),
        queries=[QueryConfig(id="a", text="the red square"), QueryConfig(id="b", text="a person")],
        engine=EngineConfig(kind="gemvg", model=str(tiny_models["qwen2_5_vl"]), device="cpu", max_pixels=112 * 112,
                            max_new_tokens=4, batch_size=4),
    )
    assert cfg.gating.active(cfg.engine.kind)  # 'auto' gates model engines
    pipe = Pipeline(cfg, sinks=[EventCollector()], control=False, metrics_port=free_port())
    summary = pipe.run()
    cam = summary.cameras["hall"]
    assert summary.windows_unchanged >= 2 and summary.windows_grounded >= 2
    assert summary.windows_grounded + summary.windows_unchanged == 6
    assert summary.work["images_encoded"] == 2 * summary.windows_grounded  # one encoding per grounded frame
    assert summary.work["images_cached"] == 2 * summary.windows_grounded  # the second query's frames
    assert summary.work["prefill_tokens"] > 0 and summary.work["generated_tokens"] > 0
    for key, total in summary.work.items():
        assert getattr(cam, key) == total
    assert pipe.metrics is not None
    text = generate_latest(pipe.metrics.registry).decode()
    assert f'streamvg_windows_unchanged_total{{camera="hall"}} {float(summary.windows_unchanged)}' in text
    assert f'streamvg_prefill_tokens_total{{camera="hall"}} {float(summary.work["prefill_tokens"])}' in text
