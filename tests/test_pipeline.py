"""The pipeline runtime and `streamvg search` / `demo` on real encoded video, replay engine
fed from ground truth, and the real tiny model."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from streamvg.config import (
    EngineConfig,
    PipelineConfig,
    QueryConfig,
    RedisSinkConfig,
    SamplingConfig,
    SinksConfig,
    SourceConfig,
    load_pipeline,
)
from streamvg.demo import EventCollector, ground_truth_tracks, tracked_boxes
from streamvg.errors import TrackingError
from streamvg.grounding import Grounding
from streamvg.pipeline import Pipeline, TrackingStage, WindowQueue, send_query_command
from streamvg.testing.live import LiveStreamServer
from streamvg.testing.metrics import idf1
from streamvg.testing.servers import wait_until
from streamvg.testing.synthetic import replay_records, write_scene
from streamvg.types import Detections, Frame, Query, Window

REPO = Path(__file__).resolve().parents[1]
FPS = 5.0


def _cli(*args: str, timeout: float = 180, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamvg", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_scene(tmp_path_factory.mktemp("pipe") / "videos", cameras=2, width=320, height=192, duration_s=10.0, seed=3)


def _label(scene: Any) -> str:
    labels = sorted({o["label"] for c in scene.ground_truth["cameras"].values() for f in c["frames"] for o in f["objects"]})
    return labels[0]


def _sampled_times(frames: list[dict[str, Any]], fps: float) -> list[float]:
    """PTS of the frame at or just after each k/fps (what exact sampling returns)."""
    pts = [float(f["pts"]) for f in frames]
    out, k = [], 0
    for p in pts:
        while p >= k / fps - 1e-9:
            if not out or out[-1] != p:
                out.append(p)
            k += 1
    return out


def _appearances(scene: Any, camera: str, label: str, *, merge_gap_s: float) -> list[tuple[int, float, float]]:
    """(object id, first t, last t) runs of a labelled object being visible at sampled times."""
    frames = scene.ground_truth["cameras"][camera]["frames"]
    times = set(_sampled_times(frames, FPS))
    runs: dict[int, list[list[float]]] = {}
    for f in frames:
        t = float(f["pts"])
        if t not in times:
            continue
        for o in f["objects"]:
            if o["label"] != label or o["visible"] < 0.5:
                continue
            rs = runs.setdefault(int(o["id"]), [])
            if rs and t - rs[-1][1] <= merge_gap_s:
                rs[-1][1] = t
            else:
                rs.append([t, t])
    return [(oid, a, b) for oid, rs in runs.items() for a, b in rs]


def test_search_replay_finds_every_appearance(scene: Any, tmp_path: Path) -> None:
    label = _label(scene)
    text = f"the {label}"
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(scene.ground_truth, query=text, labels=[label])))
    folder = Path(next(iter(scene.cameras.values()))).parent
    thumbs = tmp_path / "thumbs"
    out = tmp_path / "segments.jsonl"
    r = _cli("search", str(folder), "--query", text, "--engine", "replay", "--replay", str(answers),
             "--fps", str(FPS), "--thumbnails", str(thumbs), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    segments = result["segments"]
    assert not result["interrupted"] and result["windows_grounded"] > 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == segments
    period = 1.0 / FPS
    for cam in scene.cameras:
        expected = _appearances(scene, cam, label, merge_gap_s=3.0)  # the tracker bridges gaps < max_lost_s
        assert expected, f"scene has no {label} in {cam}"
        mine = [s for s in segments if Path(s["video"]).stem == cam]
        for oid, start, end in expected:
            hits = [s for s in mine if abs(s["start_s"] - start) <= period + 1e-6 and abs(s["end_s"] - end) <= period + 1e-6]
            assert hits, f"{cam}: object {oid} seen {start:.2f}-{end:.2f}s has no segment in {mine}"
        assert len(mine) == len(expected), f"{cam}: {len(mine)} segments for {len(expected)} appearances"
    for s in segments:
        assert s["thumbnail"] and Path(s["thumbnail"]).is_file()
        x1, y1, x2, y2 = s["best_xyxy"]
        assert x2 > x1 and y2 > y1 and s["best_score"] == pytest.approx(0.9, abs=1e-3)


def test_search_table_and_bad_paths(scene: Any, tmp_path: Path) -> None:
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(scene.ground_truth)))
    video = str(next(iter(scene.cameras.values())))
    r = _cli("search", video, "-q", "anything", "--engine", "replay", "--replay", str(answers), "--fps", "2")
    assert r.returncode == 0, r.stderr
    assert "segment(s) in 1 video(s)" in r.stdout
    r = _cli("search", str(tmp_path / "missing.mp4"), "-q", "x", "--engine", "replay", "--replay", str(answers))
    assert r.returncode == 2 and "missing.mp4: no such file or folder" in r.stderr and "Traceback" not in r.stderr
    r = _cli("search", video, "-q", "x")
    assert r.returncode == 2 and "--model is required" in r.stderr
    # A folder with a good video and a broken one: the good one is searched, the broken one
    # is named once, in one sentence.
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.mp4").write_bytes(Path(video).read_bytes())
    (folder / "broken.mp4").write_text("not a video")
    r = _cli("search", str(folder), "-q", "anything", "--engine", "replay", "--replay", str(answers), "--fps", "2",
             "--json", env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 1, r.stderr  # finished with failures: an unreadable input
    result = json.loads(r.stdout)
    assert result["windows_grounded"] > 0
    assert [(f["camera"], f["kind"]) for f in result["failures"]] == [("broken", "unreadable")]
    assert r.stderr.count("broken.mp4 is not a video file StreamVG can read") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_search_with_tiny_model_runs_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    sc = write_scene(tmp_path / "v", cameras=1, width=160, height=96, duration_s=3.0, seed=1)
    video = str(sc.cameras["cam0"])
    r = _cli("search", video, "-q", "the red circle", "--engine", "gemvg", "--model", str(tiny_models["qwen2_5_vl"]),
             "--fps", "1", "--window", "2", "--stride", "1", "--json", timeout=300)
    out = json.loads(r.stdout)
    # Random weights: answers with no readable boxes for most windows make it exit 1 (README, exit codes).
    assert r.returncode == out["exit_code"] == (1 if 2 * out["unparseable_answers"] > out["windows_grounded"] else 0), r.stderr
    assert out["windows_grounded"] == 2  # 3 sampled frames, windows of 2 by 1
    assert isinstance(out["segments"], list)


def test_pipeline_python_api_multi_camera_idf1(scene: Any, tmp_path: Path) -> None:
    label = _label(scene)
    recs = replay_records(scene.ground_truth, query="q", labels=[label])
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = PipelineConfig(
        name=f"t-{uuid.uuid4().hex[:6]}",
        sources=[SourceConfig(name=c, uri=str(p)) for c, p in scene.cameras.items()],
        sampling=SamplingConfig(fps=FPS, window_size=4, stride=1),
        queries=[QueryConfig(id="q", text=f"the {label}")],
        engine=EngineConfig(kind="replay", replay_path=str(answers), batch_size=3),
    )
    collector = EventCollector()
    summary = Pipeline(cfg, sinks=[collector]).run()
    assert not summary.interrupted
    kinds = {e.kind for e in collector.events}
    assert {"grounding", "track_start", "track_end"} <= kinds
    for cam in scene.cameras:
        g_times = [e.t for e in collector.events if e.kind == "grounding" and e.camera == cam]
        # stride 1 overlaps windows 3 frames deep; every frame is grounded exactly once
        assert len(g_times) == len(set(g_times)) == len(_sampled_times(scene.ground_truth["cameras"][cam]["frames"], FPS))
        truth = ground_truth_tracks(scene.ground_truth, cam, [label], {round(t, 4) for t in g_times if t is not None})
        assert idf1(truth, tracked_boxes(collector.events, cam, "q")) >= 0.9
        starts = [e.track_id for e in collector.events if e.camera == cam and e.kind == "track_start"]
        ends = [e.track_id for e in collector.events if e.camera == cam and e.kind == "track_end"]
        assert sorted(starts) == sorted(ends)  # every track ends at the end of the file


def _frame(cam: str, i: int) -> Frame:
    return Frame(cam, i, i / 10, np.zeros((4, 4, 3), np.uint8))


def test_window_queue_freshest_for_live_and_backpressure_for_files() -> None:
    import threading

    stop = threading.Event()
    q = WindowQueue(capacity=2)
    w = [Window((_frame("a", i),)) for i in range(3)]
    assert q.put(w[0], live=True, stop=stop) is None
    assert q.put(w[1], live=True, stop=stop) is None
    assert q.put(w[2], live=True, stop=stop) is w[0]  # the stalest of the same camera goes
    assert [x.id for x in q.get_batch(5, wait_s=0, timeout=1)] == [w[1].id, w[2].id]
    q.put(w[0], live=False, stop=stop)
    q.put(w[1], live=False, stop=stop)
    done = threading.Event()

    def blocked_put() -> None:
        q.put(w[2], live=False, stop=stop)
        done.set()

    t = threading.Thread(target=blocked_put)
    t.start()
    assert not done.wait(0.3)  # full: a file camera waits instead of dropping
    assert len(q.get_batch(1, wait_s=0, timeout=1)) == 1
    assert done.wait(5)
    t.join()


def test_standing_queries_added_and_removed_while_running(live_clip: Any, tmp_path: Path) -> None:
    """Queries change through the Redis control stream while a live camera runs."""
    name = f"ctl-{uuid.uuid4().hex[:8]}"
    url = "redis://127.0.0.1:6379/0"
    with LiveStreamServer(live_clip.cameras["cam0"], loop=True) as server:
        cfg = PipelineConfig(
            name=name,
            sources=[SourceConfig(name="cam", uri=server.url)],
            sampling=SamplingConfig(fps=5.0, window_size=2, stride=2),
            queries=[QueryConfig(id="a", text="thing a")],
            engine=EngineConfig(kind="replay", replay_path=str(_empty_replay(tmp_path))),
            sinks=SinksConfig(redis=RedisSinkConfig(url=url, spool_dir=str(tmp_path / "spool"))),
        )
        collector = EventCollector()
        pipe = Pipeline(cfg, sinks=[collector]).start()
        try:
            def count(qid: str) -> int:
                return sum(1 for e in list(collector.events) if e.kind == "grounding" and e.query_id == qid)

            wait_until(lambda: count("a") >= 2, timeout=20, what="groundings for query a")
            send_query_command(url, name, "add", query=Query("b", "thing b"))
            wait_until(lambda: count("b") >= 2, timeout=20, what="groundings for the added query b")
            send_query_command(url, name, "remove", query_id="a")
            wait_until(lambda: all(q.id != "a" for q in pipe.queries), timeout=20, what="query a removed")
            a_then, b_then = count("a"), count("b")
            wait_until(lambda: count("b") >= b_then + 6, timeout=20, what="more groundings for b")
            # at most the batch that was in flight when the removal landed
            assert count("a") <= a_then + cfg.engine.batch_size * cfg.sampling.window_size
        finally:
            pipe.stop()
    assert pipe.cameras["cam"].frames_in > 0


def _empty_replay(tmp_path: Path) -> Path:
    p = tmp_path / "empty.jsonl"
    p.write_text(json.dumps({"camera": "nobody", "pts": 0.0, "query": None, "boxes": []}) + "\n")
    return p


@pytest.mark.parametrize("name", ["search.yaml", "monitor-rtsp.yaml", "demo.yaml"])
def test_ready_pipeline_files_validate(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAM_PASSWORD", "pw")
    cfg = load_pipeline(REPO / "pipelines" / name)
    assert cfg.sources and cfg.queries
    assert "pw@" not in json.dumps(cfg.masked())
    raw = yaml.safe_load((REPO / "pipelines" / name).read_text())
    assert raw["name"] == cfg.name


def test_demo_runs_and_scores_itself(tmp_path: Path) -> None:
    r = _cli("demo", "--out", str(tmp_path / "demo"), "--cameras", "2", "--duration-s", "8", "--json",
             "--redis-url", "redis://127.0.0.1:1/0")  # nothing answers there: JSONL fallback
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["events_at"].endswith("events.jsonl")
    lines = (tmp_path / "demo" / "events.jsonl").read_text().splitlines()
    assert len(lines) == out["events_published"] > 0
    assert all(row["idf1"] >= 0.9 for row in out["tracks"]), out["tracks"]


def _stage_run(stage: Any, frames: list[Frame], query: Query, start: int, stop: int) -> None:
    """Feed windows of 2 frames with one box per frame moving right, from window `start` to `stop`."""
    for w in range(start, stop):
        win = Window(tuple(frames[2 * w : 2 * w + 2]))
        xs = np.array([[40.0 + 30 * (2 * w + k), 200, 140.0 + 30 * (2 * w + k), 400] for k in range(2)], np.float32)
        dets = Detections(xs, np.full(2, 0.9, np.float32), np.arange(2))
        stage.process(win, query, Grounding(win.id, query.id, dets, "", None, "replay"), 12.0)


def _stage_track_events(size: tuple[int, int], answers: list[list[float]]) -> list[tuple[str, int]]:
    """(kind, track id) of the track events a stage publishes for one box (or none) per frame
    at 1 frame/s, frames of `size` (width, height)."""
    cfg = PipelineConfig(name="exit", sources=[SourceConfig(name="door", uri="a.mp4")], queries=[])
    published: list[Any] = []
    stage = TrackingStage(cfg, publish=published.append, model_name=lambda: "replay")
    image = np.zeros((size[1], size[0], 3), np.uint8)
    query = Query("person", "the person")
    for i, xyxy in enumerate(answers):
        win = Window((Frame("door", i, float(i), image),))
        dets = Detections(np.array(xyxy, np.float32).reshape(-1, 4), np.full(len(xyxy) // 4, 0.9, np.float32))
        stage.process(win, query, Grounding(win.id, query.id, dets, "", None, "replay"), 12.0)
    return [(e.kind, int(e.track_id)) for e in published if e.kind.startswith("track")]


def _person(cx: float, cy: float = 240.0) -> list[float]:
    return [cx - 24, cy - 60, cx + 24, cy + 60]


def test_tracking_stage_ends_tracks_that_left_each_frame() -> None:
    """The stage gives the tracker each frame's (width, height): a person who walked out of
    the 640x480 picture ends there, and someone entering on the left two seconds later gets
    a new id; the same answers on 1280x720 frames keep waiting for the first person. A person
    hidden near the right edge of the 640x480 frame (inside it, outside a 480 px width) keeps
    the id, so the width is not read as the height."""
    walk_out = [_person(340 + 80 * k) for k in range(4)] + [[], [], _person(40, 300)]
    events = _stage_track_events((640, 480), walk_out)
    assert ("track_end", 0) in events and events[-1] == ("track_start", 1)
    assert _stage_track_events((1280, 720), walk_out)[-1] == ("track_update", 0)

    hidden = [_person(300 + 60 * k) for k in range(4)] + [[], _person(300 + 60 * 5)]
    events = _stage_track_events((640, 480), hidden)
    assert "track_end" not in [kind for kind, _ in events] and {tid for _, tid in events} == {0}


def test_camera_hand_over_state_is_small_pickle_free_and_continues_the_tracks() -> None:
    """What a scale-out worker saves to Redis for a camera: a few KB of arrays + JSON (no
    frames, no pickle) from which another stage goes on with the same track ids."""
    cfg = PipelineConfig(name="handover", sources=[SourceConfig(name="door", uri="a.mp4")], queries=[])
    image = np.zeros((720, 1280, 3), np.uint8)  # a real-sized frame: it must not travel
    frames = [Frame("door", i, i / FPS, image, wall_time=1_764_000_000.0 + i / FPS) for i in range(20)]
    query = Query("vest", "the vest")
    published: list[Any] = [[], []]
    first = TrackingStage(cfg, publish=published[0].append, model_name=lambda: "replay")
    _stage_run(first, frames, query, 0, 5)
    data = first.export_camera("door")
    assert len(data) < 16_000, len(data)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:  # loads without pickle
        assert json.loads(archive["header"].tobytes())["format"] == "streamvg.trackstate/v1"

    second = TrackingStage(cfg, publish=published[1].append, model_name=lambda: "replay")
    second.import_camera("door", data)
    mark = len(published[0])
    _stage_run(first, frames, query, 5, 10)
    _stage_run(second, frames, query, 5, 10)
    first.finish_all()
    second.finish_all()
    tail_a = [(e.kind, e.track_id, e.t, e.frame_index, e.wall_time) for e in published[0][mark:]]
    tail_b = [(e.kind, e.track_id, e.t, e.frame_index, e.wall_time) for e in published[1]]
    assert tail_a == tail_b
    assert {e.track_id for e in published[1] if e.kind.startswith("track")} == {0}
    assert tail_b[-1][0] == "track_end"

    for bad in (b"not a state", pickle.dumps({("door", "vest"): "x"}), data[: len(data) // 2]):
        with pytest.raises(TrackingError, match="saved tracker state of camera 'door' is unreadable"):
            TrackingStage(cfg, publish=lambda e: None, model_name=lambda: "m").import_camera("door", bad)
