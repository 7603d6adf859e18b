"""`streamvg search` with the offline tracking pass (issue 22): segments, --out, --json and
--mot carry the offline ids, live events the live ones. Real parts throughout: an encoded
video, the sampler, the replay engine answering a scripted box sequence, the trackers."""

from __future__ import annotations

import gc
import itertools
import json
import subprocess
import uuid
import weakref
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

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
from streamvg.grounding import Grounding
from streamvg.pipeline import Pipeline
from streamvg.pipeline.tracking_stage import TrackingStage
from streamvg.testing.still import StillScene, write_still_scene
from streamvg.tracking import Tracker
from streamvg.tracking.offline import track_offline
from streamvg.types import Detections, Frame, Query, Window

FPS = 2.0  # sampled (and grounded) frames per second: a grounding rate
WIDTH, HEIGHT = 1088, 192
# Two people crossing at 2 answers a second: object 0 walks right from x≈100, object 1
# appears at 0.5 s on the right and walks left; they pass at 3.5 s. Per sampled frame
# (t = i / FPS): (object, x1, y1, x2, y2), in answer order. Found by playing seeded
# random crossings through `Tracker` and `track_offline` until the live tracker swapped
# them and the offline pass did not (`test_the_script_swaps_online_and_not_offline`
# checks it still does).
SCRIPT: list[list[tuple[int, int, int, int, int]]] = [
    [(0, 68, 28, 128, 148)],
    [(0, 143, 38, 203, 158), (1, 986, 17, 1046, 137)],
    [(1, 916, 15, 976, 135), (0, 207, 38, 267, 158)],
    [(1, 843, 19, 903, 139), (0, 276, 29, 336, 149)],
    [(1, 772, 24, 832, 144), (0, 353, 31, 413, 151)],
    [(1, 700, 21, 760, 141), (0, 415, 30, 475, 150)],
    [(1, 633, 21, 693, 141), (0, 486, 32, 546, 152)],
    [(0, 560, 27, 620, 147), (1, 558, 23, 618, 143)],
    [(1, 495, 14, 555, 134), (0, 628, 36, 688, 156)],
    [(1, 422, 14, 482, 134), (0, 698, 32, 758, 152)],
    [(1, 356, 17, 416, 137), (0, 772, 30, 832, 150)],
    [(1, 278, 28, 338, 148), (0, 838, 30, 898, 150)],
    [(1, 214, 26, 274, 146), (0, 915, 41, 975, 161)],
    [(0, 981, 31, 1041, 151), (1, 146, 21, 206, 141)],
]


def _score(i: int, obj: int) -> float:
    """Varying scores, so best boxes are a real choice (all above the tracker's high_score)."""
    return round(0.6 + 0.03 * ((3 * i + 5 * obj) % 11), 3)


def _script_frames() -> list[tuple[Detections, float, np.ndarray]]:
    out = []
    for i, rows in enumerate(SCRIPT):
        xyxy = np.array([r[1:] for r in rows], np.float32).reshape(-1, 4)
        score = np.array([_score(i, r[0]) for r in rows], np.float32)
        out.append((Detections(xyxy, score, np.zeros(len(rows), np.int64)), i / FPS, np.array([r[0] for r in rows])))
    return out


def _object_at(t: float, xyxy: list[float]) -> int:
    """Which scripted object a box at media time `t` is."""
    rows = SCRIPT[round(t * FPS)]
    hits = [r[0] for r in rows if np.allclose(r[1:], xyxy, atol=0.5)]
    assert len(hits) == 1, (t, xyxy, rows)
    return hits[0]


def _objects_per_id(frames: list[tuple[Detections, float, np.ndarray]], tracked: list[Detections]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for (_, t, _), tr in zip(frames, tracked, strict=True):
        for k in range(len(tr)):
            out.setdefault(int(tr.track_id[k]), set()).add(_object_at(t, tr.xyxy[k].tolist()))
    return out


def test_the_script_swaps_online_and_not_offline() -> None:
    frames = _script_frames()
    trk = Tracker(TrackerConfig(), interval_s=1 / FPS)
    online = _objects_per_id(frames, [trk.update(d, t) for d, t, _ in frames])
    offline = _objects_per_id(frames, track_offline([(d, t) for d, t, _ in frames], TrackerConfig(),
                                                    interval_s=1 / FPS).tracked)
    assert any(len(objs) > 1 for objs in online.values()), f"the live tracker no longer swaps them: {online}"
    assert sorted(map(sorted, offline.values())) == [[0], [1]], f"the offline pass mixes them: {offline}"


@pytest.fixture(scope="module")
def crossing(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An encoded 10 fps video as long as the script and the replay answers for it."""
    root = tmp_path_factory.mktemp("crossing")
    video = root / "walk.mp4"
    n = round(len(SCRIPT) / FPS * 10)
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(n):
            img = np.full((HEIGHT, WIDTH, 3), 40, np.uint8)
            img[:, (i * 7) % WIDTH] = 220  # something moves: every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    answers = root / "answers.jsonl"
    with answers.open("w") as fh:
        for i, rows in enumerate(SCRIPT):
            boxes = [{"xyxy": list(r[1:]), "score": _score(i, r[0])} for r in rows]
            fh.write(json.dumps({"camera": "walk", "pts": i / FPS, "query": None, "boxes": boxes}) + "\n")
    return {"video": video, "answers": answers, "root": root}


def _pipeline_run(crossing: dict[str, Path], *, offline: bool) -> tuple[Any, list[Any]]:
    cfg = PipelineConfig(
        name=f"offline-{uuid.uuid4().hex[:8]}",
        sources=[SourceConfig(name="walk", uri=str(crossing["video"]))],
        sampling=SamplingConfig(fps=FPS, window_size=2, stride=2),
        queries=[QueryConfig(id="q1", text="a person")],
        engine=EngineConfig(kind="replay", replay_path=str(crossing["answers"])),
    )
    sink = EventCollector()
    pipe = Pipeline(cfg, sinks=[sink], collect_segments=True, offline_tracking=offline, control=False)
    summary = pipe.run()
    assert not pipe.processor._recorded, "the recorded frames are freed once the pass ran"
    return summary, sink.events


def test_segments_follow_the_objects_offline_and_swap_online(crossing: dict[str, Path]) -> None:
    offline, ev_off = _pipeline_run(crossing, offline=True)
    online, ev_on = _pipeline_run(crossing, offline=False)
    assert len(offline.segments) == 2
    with_image = {s.best_t for s in online.segments}  # the frames whose image the live segments kept
    for seg in offline.segments:
        objs = {_object_at(t, xyxy) for t, _, xyxy, _ in seg.boxes}
        assert len(objs) == 1, f"offline segment {seg.track_id} holds boxes of objects {objs}"
        assert seg.hits == len(seg.boxes) and seg.start_s == seg.boxes[0][0] and seg.end_s == seg.boxes[-1][0]
        # The best box: the highest-scoring one among those whose frame image was kept.
        candidates = [b for b in seg.boxes if b[0] in with_image] or seg.boxes
        assert (seg.best_t, seg.best_score) == max(((b[0], b[3]) for b in candidates), key=lambda b: b[1])
        assert (seg.best_frame is not None) == (seg.best_t in with_image)
        if seg.best_frame is not None:
            assert seg.best_frame.shape == (HEIGHT, WIDTH, 3)
    assert any(len({_object_at(t, xyxy) for t, _, xyxy, _ in seg.boxes}) > 1 for seg in online.segments), \
        "with the live ids the segments swap objects at the crossing"
    # Events published during the run keep the live ids, whichever ids the segments get.
    track_ids = lambda evs: [(e.kind, e.track_id, e.t) for e in evs if e.kind.startswith("track")]  # noqa: E731
    assert track_ids(ev_off) == track_ids(ev_on)


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    from streamvg.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


@pytest.mark.parametrize("flag", ["--offline-tracking", "--online-tracking"])
def test_out_json_and_mot_carry_the_segments_ids(
    crossing: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    out, mot, events = tmp_path / "segments.jsonl", tmp_path / "mot", tmp_path / "events.jsonl"
    r = _main(capsys, "search", str(crossing["video"]), "-q", "a person", "--engine", "replay", "--replay",
              str(crossing["answers"]), "--fps", str(FPS), "--window", "2", "--stride", "2", "--json",
              "--out", str(out), "--mot", str(mot), "--events", str(events), flag)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)["segments"]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written and len(written) == 2
    # MOT: frame,id,x,y,w,h,… with id = track_id + 1; each id's boxes are one object offline.
    per_id: dict[int, set[int]] = {}
    frames_of: dict[int, list[int]] = {}
    for line in (mot / "walk_q1.txt").read_text().splitlines():
        frame, tid, x, y, w, h = (float(v) for v in line.split(",")[:6])
        t = (frame - 1) / 10.0  # source frame number → media time (10 fps video)
        per_id.setdefault(int(tid) - 1, set()).add(_object_at(t, [x, y, x + w, y + h]))
        frames_of.setdefault(int(tid) - 1, []).append(int(frame))
    assert sorted(per_id) == sorted(s["track_id"] for s in written)
    for s in written:
        assert s["hits"] == len(frames_of[s["track_id"]])
        assert min(frames_of[s["track_id"]]) == round(s["start_s"] * 10) + 1
    mixed = any(len(objs) > 1 for objs in per_id.values())
    assert mixed == (flag == "--online-tracking"), per_id
    # The events file is the live run's, whichever ids the results get.
    live = {json.loads(line)["track_id"] for line in events.read_text().splitlines()
            if json.loads(line)["kind"].startswith("track")}
    assert live == {0, 1}


def test_search_help_teaches_the_offline_flag(capsys: pytest.CaptureFixture[str]) -> None:
    r = _main(capsys, "search", "--help")
    text = " ".join(r.stdout.split())
    assert "--offline-tracking" in text and "--online-tracking" in text
    assert "live" in text and "--mot" in text


def test_recorded_frames_keep_no_images_but_the_best_frames() -> None:
    """Memory bound: images reach the stage with every frame, but only the live segments'
    best frames stay alive (the recording holds boxes, times and numbers only)."""
    cfg = PipelineConfig(name="mem", sources=[SourceConfig(name="walk", uri="walk.mp4")],
                         sampling=SamplingConfig(fps=FPS, window_size=2, stride=2),
                         queries=[QueryConfig(id="q1", text="a person")])
    stage = TrackingStage(cfg, publish=lambda e: None, model_name=lambda: "replay",
                          collect_segments=True, offline_tracking=True)
    query = Query(id="q1", text="a person")
    alive: list[weakref.ref[np.ndarray]] = []
    frames = _script_frames()
    for start in range(0, len(frames), 2):
        chunk = frames[start:start + 2]
        win_frames = []
        for _d, t, _ in chunk:
            img = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            alive.append(weakref.ref(img))
            win_frames.append(Frame(camera="walk", index=round(t * 10), pts=t, image=img))
        win = Window(frames=win_frames, id=f"w{start}")
        dets = Detections.concat([Detections(d.xyxy, d.score, np.full(len(d), k, np.int64))
                                  for k, (d, _, _) in enumerate(chunk)])
        stage.process(win, query, Grounding(win.id, query.id, dets, "", None, "replay"), 1.0)
        del win, win_frames, img
    gc.collect()
    live_segments = stage.segments()
    assert len(stage._recorded[("walk", "q1")]) == len(frames)
    kept = sum(r() is not None for r in alive)
    assert 0 < kept <= len(live_segments)
    stage.finish_all()
    gc.collect()
    offline_segments = stage.segments()
    assert not stage._recorded
    assert sum(r() is not None for r in alive) <= len(offline_segments) == 2
    assert all(s.best_frame is not None for s in offline_segments)
    # Cross-camera identities are keyed by live ids: each offline segment names the live
    # track most of its boxes had (the two live tracks each hold one object most of the time).
    assert sorted(s.live_track_id for s in offline_segments) == [0, 1]  # type: ignore[type-var]


@pytest.fixture(scope="module")
def still(tmp_path_factory: pytest.TempPathFactory) -> StillScene:
    return write_still_scene(tmp_path_factory.mktemp("still"), duration_s=20.0, fps=10.0, activity=((6.0, 9.0),))


def test_carried_over_frames_keep_offline_segments_continuous(still: StillScene) -> None:
    """With gating, still stretches longer than max_lost_s are carried over: the offline
    pass sees them as the repeated last answer, so the one object stays one segment."""
    cfg = PipelineConfig(
        name=f"offline-gating-{uuid.uuid4().hex[:8]}",
        sources=[SourceConfig(name=still.video.stem, uri=str(still.video))],
        sampling=SamplingConfig(fps=FPS, window_size=2, stride=2),
        queries=[QueryConfig(id="q", text="the red square")],
        engine=EngineConfig(kind="replay", replay_path=str(still.records_path)),
        tracker=TrackerConfig(max_lost_s=2.0),
        gating=GatingConfig(enabled=True, max_unchanged_s=30.0),
    )
    sink = EventCollector()
    summary = Pipeline(cfg, sinks=[sink], collect_segments=True, offline_tracking=True, control=False).run()
    assert summary.windows_unchanged > 0
    grounded = sorted(e.t for e in sink.events if e.kind == "grounding" and not e.carried_over and e.t is not None)
    assert any(b - a > 2.0 for a, b in itertools.pairwise(grounded)), "no still stretch to bridge"
    last_t = max(e.t for e in sink.events if e.kind == "grounding" and e.t is not None)
    assert len(summary.segments) == 1
    seg = summary.segments[0]
    assert seg.start_s <= 0.5 + 1e-6 and seg.end_s == pytest.approx(last_t)
    assert seg.hits == len(seg.boxes) < round(last_t * FPS) + 1  # carried-over frames are no new sightings


def _stage_run(frames: list[tuple[Detections, float]], *, size: tuple[int, int] = (640, 480),
               camera: str = "cam") -> list[Any]:
    """Feed one-frame windows through a TrackingStage with the offline pass; its segments."""
    cfg = PipelineConfig(name="stage", sources=[SourceConfig(name=camera, uri=f"{camera}.mp4")],
                         sampling=SamplingConfig(fps=FPS, window_size=1, stride=1),
                         queries=[QueryConfig(id="q1", text="a person")])
    stage = TrackingStage(cfg, publish=lambda e: None, model_name=lambda: "replay",
                          collect_segments=True, offline_tracking=True)
    query = Query(id="q1", text="a person")
    img = np.zeros((size[1], size[0], 3), np.uint8)
    for i, (d, t) in enumerate(frames):
        win = Window(frames=[Frame(camera=camera, index=i, pts=t, image=img)], id=f"w{i}")
        stage.process(win, query, Grounding(win.id, query.id, Detections(d.xyxy, d.score), "", None, "replay"), 1.0)
    stage.finish_all()
    return stage.segments()


@pytest.mark.parametrize("seed", [22, 33])
def test_offline_segments_in_view_at_once_never_name_the_same_live_track(seed: int) -> None:
    # In these scenes the live tracker swaps ids so that two offline tracks, in view at the
    # same time, each had one live track for most of their boxes: naming it for both would
    # give two objects seen at once in one camera one cross-camera identity.
    from test_offline_tracking import scene

    frames, _ = scene(seed, n=5)
    segs = _stage_run(frames)
    named = [s for s in segs if s.live_track_id is not None]
    assert named, "the offline segments name live tracks"
    for a, b in itertools.combinations(named, 2):
        if a.start_s <= b.end_s and b.start_s <= a.end_s:
            assert a.live_track_id != b.live_track_id, (a, b)
