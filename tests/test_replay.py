"""ReplayEngine: stored groundings keyed by camera + media time, matched per frame of a window."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamvg.errors import ConfigError
from streamvg.grounding import GroundingEngine
from streamvg.grounding.replay import ReplayEngine
from streamvg.types import Frame, Query, Window

IMG = np.zeros((144, 176, 3), np.uint8)


def frame(camera: str, index: int, pts: float) -> Frame:
    return Frame(camera=camera, index=index, pts=pts, image=IMG)


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("# groundings\n" + "\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


@pytest.fixture()
def replay_file(tmp_path: Path) -> Path:
    return write(tmp_path / "g.jsonl", [
        {"camera": "door", "pts": 0.0, "query": None, "boxes": [{"xyxy": [1, 2, 30, 40], "score": 0.9, "label": "man"}]},
        {"camera": "door", "pts": 0.5, "query": None, "boxes": [{"xyxy": [5, 6, 50, 60], "score": 0.4}]},
        {"camera": "door", "pts": 0.5, "query": "vest", "boxes": [{"xyxy": [7, 8, 70, 80], "score": 0.8}]},
        {"camera": "door", "pts": 1.0, "query": "other", "boxes": [{"xyxy": [9, 9, 90, 90], "score": 0.8}]},
        {"camera": "yard", "pts": 0.51, "query": None, "boxes": [{"xyxy": [10, 10, 20, 20]}, {"xyxy": [30, 30, 40, 40], "score": 0.2}]},
    ])


def test_boxes_follow_camera_time_and_query(replay_file: Path) -> None:
    engine = ReplayEngine(replay_file, tolerance_s=0.02)
    assert isinstance(engine, GroundingEngine) and engine.name == "replay:g.jsonl" and len(engine) == 5
    w_time = Window((frame("door", 0, 0.0), frame("door", 12, 0.49), frame("door", 25, 1.0), frame("door", 30, 1.3)))
    w_cams = Window((frame("door", 12, 0.5), frame("yard", 12, 0.5)))
    vest = Query(id="vest", text="the man in the yellow vest")
    g_time, g_cams = engine.ground([w_time, w_cams], vest)
    assert g_time.window_id == w_time.id and g_time.parse_ok and g_time.model == "replay:g.jsonl"
    # frame 0 -> null record; frame 1 (0.49) -> the query-specific record wins over null; frame 2: 'other' only; frame 3: none
    assert g_time.detections.image_index.tolist() == [0, 1]
    assert g_time.detections.xyxy.tolist() == [[1, 2, 30, 40], [7, 8, 70, 80]]
    assert g_cams.detections.image_index.tolist() == [0, 1, 1]
    assert g_cams.detections.score.tolist() == pytest.approx([0.8, 1.0, 0.2])
    # By query text too, and min_score filters.
    (g,) = engine.ground([w_cams], Query(id="x", text="other", min_score=0.5))
    assert g.detections.xyxy.tolist() == [[10, 10, 20, 20]]  # door's 0.4 and yard's 0.2 dropped
    # Outside the tolerance nothing matches.
    (g,) = ReplayEngine(replay_file, tolerance_s=0.001).ground([Window((frame("yard", 1, 0.5),))], vest)
    assert len(g.detections) == 0 and g.parse_ok
    assert engine.stats.windows == 3


def test_ground_many_mixes_queries(replay_file: Path) -> None:
    engine = ReplayEngine(replay_file)
    w = Window((frame("door", 1, 1.0),))
    a, b = engine.ground_many([(w, Query(id="vest", text="v")), (w, Query(id="other", text="o"))])
    assert len(a.detections) == 0 and b.detections.xyxy.tolist() == [[9, 9, 90, 90]]


def test_records_from_memory_match_the_file_format() -> None:
    engine = ReplayEngine([{"camera": "c", "pts": 2.0, "query": None, "boxes": [{"xyxy": [0, 0, 5, 5], "score": 0.5}]}])
    (g,) = engine.ground([Window((frame("c", 0, 2.01),))], Query(id="q", text="t"))
    assert g.detections.score.tolist() == [0.5] and engine.name == "replay"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("{not json", "g.jsonl:2: not valid JSON"),
        ('{"pts": 1, "boxes": []}', "'camera' must be a non-empty string"),
        ('{"camera": "a", "pts": "x", "boxes": []}', "'pts' must be a number"),
        ('{"camera": "a", "pts": 1, "boxes": [{"xyxy": [1, 2, 3]}]}', "boxes[0].xyxy must be four finite numbers"),
        ('{"camera": "a", "pts": 1, "boxes": [{"xyxy": [9, 2, 3, 4]}]}', "x2 < x1"),
        ('{"camera": "a", "pts": 1, "boxes": [{"xyxy": [1, 2, 3, 4], "score": 3}]}', "score must be a number in [0, 1]"),
        ('{"camera": "a", "pts": 1, "query": 5, "boxes": []}', "'query' must be a string or null"),
    ],
)
def test_bad_records_name_the_file_and_line(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text('{"camera": "a", "pts": 0, "boxes": []}\n' + line + "\n")
    with pytest.raises(ConfigError) as info:
        ReplayEngine(path)
    assert words in str(info.value) and str(path) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_missing_file_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"replay file .* not found"):
        ReplayEngine(tmp_path / "nope.jsonl")


def test_synthetic_ground_truth_records_replay() -> None:
    from streamvg.testing.synthetic import replay_records

    gt = {"cameras": {"cam0": {"video": "cam0.mp4", "width": 176, "height": 144, "start_s": 0.0, "frames": [
        {"index": 0, "pts": 0.0, "objects": [{"id": 1, "label": "red circle", "color": [255, 0, 0], "xyxy": [10, 20, 40, 50], "visible": 1.0}]},
        {"index": 1, "pts": 0.04, "objects": [{"id": 1, "label": "red circle", "color": [255, 0, 0], "xyxy": [12, 20, 42, 50], "visible": 1.0},
                                              {"id": 2, "label": "blue square", "color": [0, 0, 255], "xyxy": [60, 60, 90, 90], "visible": 1.0}]},
    ]}}}
    engine = ReplayEngine(replay_records(gt, query="red", labels=["red circle"]))
    (g,) = engine.ground([Window((frame("cam0", 0, 0.0), frame("cam0", 1, 0.04)))], Query(id="red", text="the red circle"))
    assert g.detections.xyxy.tolist() == [[10, 20, 40, 50], [12, 20, 42, 50]] and g.detections.image_index.tolist() == [0, 1]
