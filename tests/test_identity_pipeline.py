"""Cross-camera identity through the real pipeline: a synthetic world seen by 3 cameras
(different offsets, zooms and start times; objects entering and leaving), answers generated
from the ground truth for both request kinds with 10 % wrong answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from streamvg.cli import main
from streamvg.config import (
    EngineConfig,
    IdentityConfig,
    PipelineConfig,
    QueryConfig,
    SamplingConfig,
    SourceConfig,
    TrackerConfig,
)
from streamvg.demo import EventCollector
from streamvg.errors import ConfigError
from streamvg.events import event_json_schema
from streamvg.pipeline import Pipeline
from streamvg.testing.synthetic import (
    GroundTruthEngine,
    Scene,
    cross_camera_objects,
    cross_camera_specs,
    identity_scores,
    replay_records,
    write_scene,
)

W, H, DURATION_S = 320, 192, 20.0


@pytest.fixture(scope="module", params=[0, 2])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scene:
    seed = int(request.param)
    return write_scene(
        tmp_path_factory.mktemp(f"world{seed}"), cameras=cross_camera_specs(W, H, start_s=(0.0, 1.0, 2.0)),
        width=W, height=H, fps=5.0, duration_s=DURATION_S, seed=seed, bframes=0,
        objects=cross_camera_objects(W, H, DURATION_S + 2.0, seed=seed),
    )


@pytest.fixture(scope="module")
def open_world(tmp_path_factory: pytest.TempPathFactory) -> Scene:
    """The same kind of world without the grey pillar: the pillar stands in the world, so it
    hides an object from every camera at once, a gap in time that no cross-camera evidence
    can bridge (re-identification over time is another matter)."""
    return write_scene(
        tmp_path_factory.mktemp("open_world"), cameras=cross_camera_specs(W, H, start_s=(0.0, 1.0, 2.0)),
        width=W, height=H, fps=5.0, duration_s=DURATION_S, seed=0, bframes=0, occluder=False,
        objects=cross_camera_objects(W, H, DURATION_S + 2.0, seed=0),
    )


def config(scene: Scene, queries: list[QueryConfig], **identity: Any) -> PipelineConfig:
    cams = scene.ground_truth["cameras"]
    return PipelineConfig(
        name="xcam",
        sources=[SourceConfig(name=c, uri=str(p), start_s=cams[c]["start_s"]) for c, p in scene.cameras.items()],
        sampling=SamplingConfig(fps=5.0, window_size=1, stride=1, multi_camera=True),
        queries=queries, engine=EngineConfig(kind="replay", replay_path="unused.jsonl"),
        # One in ten answers is wrong by construction: a track must be seen twice before it
        # is reported (at 5 fps the default confirm_s would report every stray box).
        tracker=TrackerConfig(confirm_s=0.0),
        identity=IdentityConfig(**identity),
    )


def run(scene: Scene, cfg: PipelineConfig, wrong_rate: float) -> tuple[Pipeline, GroundTruthEngine, list[Any]]:
    engine = GroundTruthEngine(scene.ground_truth, wrong_rate=wrong_rate, seed=7)
    sink = EventCollector()
    pipe = Pipeline(cfg, engine=engine, sinks=[sink], control=False)
    pipe.run()
    return pipe, engine, sink.events


def test_correspondence_requests_give_one_identity_per_object_despite_wrong_answers(world: Scene) -> None:
    pipe, engine, events = run(world, config(world, [QueryConfig(id="shapes", text="every shape")]), 0.1)
    assert engine.requests["correspondence"] > 0 and engine.wrong_answers > 0
    assert pipe.identity is not None
    final = identity_scores(world.ground_truth, events, gid_of=pipe.identity.global_id)
    assert final["idf1"] >= 0.9, final
    assert final["merged"] == [], final
    # The same wrong answers without the linker (every camera track its own identity): far lower.
    alone = identity_scores(world.ground_truth, events, gid_of=lambda q, c, t: hash((c, t)))
    assert alone["idf1"] < 0.6
    # Online ids (what events carried when published) are close behind the final ones.
    online = identity_scores(world.ground_truth, events)
    assert online["idf1"] >= 0.75, online
    # Every track event and its box carry global_id; per-camera track ids are untouched.
    tracks = [e for e in events if e.kind.startswith("track_")]
    assert tracks and all(e.global_id is not None and e.boxes[0]["global_id"] == e.global_id for e in tracks)
    assert pipe.identity.stats.requests == engine.requests["correspondence"]


def test_one_referent_queries_link_without_extra_model_calls(world: Scene) -> None:
    labels = sorted({o.label for o in world.objects})
    queries = [QueryConfig(id=f"q{i}", text=f"the {lab}") for i, lab in enumerate(labels)]
    pipe, engine, events = run(world, config(world, queries, one_referent=["*"]), 0.1)
    assert engine.requests["correspondence"] == 0
    assert pipe.identity is not None
    final = identity_scores(world.ground_truth, events, gid_of=pipe.identity.global_id)
    assert final["idf1"] >= 0.9, final
    assert final["merged"] == [], final


def test_identity_needs_multi_camera_windows(world: Scene) -> None:
    cfg = config(world, [QueryConfig(id="q", text="every shape")])
    cfg = cfg.model_copy(update={"sampling": SamplingConfig(fps=5.0)})
    with pytest.raises(ConfigError, match="multi_camera"):
        Pipeline(cfg, engine=GroundTruthEngine(world.ground_truth), sinks=[], control=False)


def test_the_event_schema_documents_global_id() -> None:
    schema = event_json_schema()
    assert "global_id" in schema["properties"]
    assert "global_id" in json.dumps(schema["$defs"]["Box"])


def test_search_cross_camera_lists_one_global_track_per_object(
    open_world: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    world = open_world
    gt = world.ground_truth
    labels = sorted({o.label for o in world.objects})
    replay = tmp_path / "answers.jsonl"
    with replay.open("w") as fh:
        for lab in labels:
            for rec in replay_records(gt, query=f"the {lab}", labels=[lab]):
                fh.write(json.dumps(rec) + "\n")
    cams = sorted(gt["cameras"])
    args = ["search", *[gt["cameras"][c]["video"] for c in cams],
            *[a for lab in labels for a in ("-q", f"the {lab}")], "--engine", "replay", "--replay", str(replay),
            "--fps", "5", "--cross-camera", "--one-referent", "--json",
            *[a for c in cams for a in ("--start", f"{c}={gt['cameras'][c]['start_s']}")]]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    tracks = result["global_tracks"]
    assert sorted(g["query"] for g in tracks) == sorted(f"the {lab}" for lab in labels)  # one per object
    for g in tracks:
        obj = next(o for o in world.objects if f"the {o.label}" == g["query"])
        seen = {}
        for c in cams:
            ts = [f["pts"] for f in gt["cameras"][c]["frames"]
                  if any(o["id"] == obj.id and o["visible"] >= 0.5 for o in f["objects"])]
            if len(ts) >= 5:
                seen[c] = (min(ts), max(ts))
        assert set(g["cameras"]) == set(seen), g
        for c, (a, b) in seen.items():  # per-camera times within a second of the truth
            assert abs(g["cameras"][c]["start_s"] - a) <= 1.0 and abs(g["cameras"][c]["end_s"] - b) <= 1.0, (c, g)
        assert g["summary"].startswith("seen on ")
    assert all("global_id" in s for s in result["segments"])


def test_search_cross_camera_refuses_bad_starts(capsys: pytest.CaptureFixture[str]) -> None:
    media = Path(__file__).resolve().parent / "media"
    base = ["search", str(media / "cup.mp4"), str(media / "carphone.mp4"), "-q", "x",
            "--engine", "replay", "--replay", "nothing.jsonl", "--cross-camera"]
    for extra, said in ((["--start", "camX=1"], "no camera 'camX'"), (["--start", "cup=soon"], "not a number of seconds"),
                        (["--start", "0", "--start", "1", "--start", "2"], "more start times than files")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
    assert main(["search", str(media / "cup.mp4"), "-q", "x", "--engine", "replay", "--replay", "n.jsonl", "--start", "1"]) == 2
    assert "go with --cross-camera" in capsys.readouterr().err
