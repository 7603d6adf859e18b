"""The synthetic video writer: its ground truth must match what a real decoder reads back."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from streamvg.testing.synthetic import CameraSpec, ObjectSpec, replay_records, write_scene


def _decode(path: Path) -> tuple[list[float], list[np.ndarray]]:
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
        return [float(f.pts * f.time_base) for f in frames], [f.to_ndarray(format="rgb24") for f in frames]


def _check_boxes(gt_frames: list[dict[str, Any]], images: list[np.ndarray], step: int = 3) -> int:
    """Each visible object's colour fills its box as its shape and visibility say, and does
    not appear outside it. Returns how many boxes were checked."""
    checked = 0
    for fr, img in list(zip(gt_frames, images, strict=True))[::step]:
        for o in fr["objects"]:
            x1, y1, x2, y2 = (int(v) for v in o["xyxy"])
            area = (x2 - x1) * (y2 - y1)
            if area < 100 or o["visible"] < 0.5:
                continue
            close = np.abs(img.astype(np.int32) - np.asarray(o["color"])).sum(-1) < 90
            fill = (np.pi / 4 if o["label"].endswith("circle") else 1.0) * o["visible"]
            inside = close[y1:y2, x1:x2].mean()
            assert inside >= 0.75 * fill, (fr["index"], o, inside, fill)
            grown = close[max(0, y1 - 2) : y2 + 2, max(0, x1 - 2) : x2 + 2].sum()
            assert (close.sum() - grown) <= 0.01 * area, (fr["index"], o["label"], "colour outside its box")
            checked += 1
    return checked


@pytest.mark.parametrize("name", ["scene_cfr", "scene_vfr"])
def test_ground_truth_matches_decoded_video(name: str, request: pytest.FixtureRequest) -> None:
    scene = request.getfixturevalue(name)
    cam = scene.ground_truth["cameras"]["cam0"]
    pts, images = _decode(scene.cameras["cam0"])
    # PTS in the ground truth are exactly the container's presentation times.
    assert [f["pts"] for f in cam["frames"]] == pytest.approx(pts, abs=1e-9)
    assert [f["index"] for f in cam["frames"]] == list(range(len(pts)))
    assert (cam["width"], cam["height"]) == images[0].shape[1::-1]
    assert _check_boxes(cam["frames"], images) > 40


def test_cfr_vfr_and_bframes_are_really_there(scene_cfr: Any, scene_vfr: Any) -> None:
    for scene, vfr in ((scene_cfr, False), (scene_vfr, True)):
        with av.open(str(scene.cameras["cam0"])) as c:
            s = c.streams.video[0]
            packets = [p for p in c.demux(s) if p.size]
            keys = [float(p.pts * s.time_base) for p in packets if p.is_keyframe]
        # B-frames: decode order differs from presentation order.
        decode_order = [p.pts for p in packets]
        assert decode_order != sorted(decode_order)
        # GOP 2 s: keyframes at 0, 2, 4 s.
        assert keys == pytest.approx([0.0, 2.0, 4.0], abs=0.2 if vfr else 1e-9)
        gaps = np.diff(sorted(decode_order))
        assert (len(set(gaps.tolist())) > 1) == vfr


def test_multi_camera_views_share_object_ids(scene_multi: Any) -> None:
    gt = scene_multi.ground_truth
    assert sorted(gt["cameras"]) == ["cam0", "cam1", "cam2"]
    ids = [{o["id"] for f in gt["cameras"][c]["frames"] for o in f["objects"]} for c in sorted(gt["cameras"])]
    assert ids[0] & ids[1] & ids[2], "the cameras see no common object"
    # cam2 is zoomed in (scale 1.2): the same fully visible object is drawn larger.
    def size(cam: str, oid: int, k: int) -> float | None:
        for o in gt["cameras"][cam]["frames"][k]["objects"]:
            if o["id"] == oid and o["visible"] > 0.99:
                return float(o["xyxy"][2] - o["xyxy"][0])
        return None

    ratios = [
        s2 / s0 for k in range(0, 100, 5) for oid in ids[0] & ids[2]
        if (s0 := size("cam0", oid, k)) and (s2 := size("cam2", oid, k)) and s0 > 20
    ]
    assert ratios and np.median(ratios) == pytest.approx(1.2, abs=0.08)
    for cam, path in scene_multi.cameras.items():
        _pts, images = _decode(path)
        assert _check_boxes(gt["cameras"][cam]["frames"], images, step=7) > 10


def test_objects_enter_and_leave(scene_cfr: Any) -> None:
    frames = scene_cfr.ground_truth["cameras"]["cam0"]["frames"]
    present = [{o["id"] for o in f["objects"]} for f in frames]
    assert 2 not in present[0] and any(2 in p for p in present), "object 2 should enter later"
    assert 3 in present[0] and 3 not in present[-1], "object 3 should leave"
    assert any(o["visible"] < 0.9 for f in frames for o in f["objects"]), "no occlusion happened"


def test_explicit_cameras_objects_start_times_and_file(tmp_path: Path) -> None:
    obj = ObjectSpec(7, "red square", (230, 30, 30), "square", 20.0, x=10.0, y=10.0, vx=40.0)
    cams = [CameraSpec("left"), CameraSpec("late", offset=(5.0, 0.0), start_s=0.5)]
    scene = write_scene(tmp_path, cameras=cams, objects=[obj], width=96, height=64, fps=10.0,
                        duration_s=1.0, bframes=0, occluder=False)
    on_disk = json.loads(scene.ground_truth_path.read_text())
    assert on_disk == scene.ground_truth
    left, late = (on_disk["cameras"][c]["frames"] for c in ("left", "late"))
    assert on_disk["cameras"]["late"]["start_s"] == 0.5
    # Scene time of late's frame k is 0.5 + k/10, so it equals left's frame k + 5, shifted by 5 px.
    assert late[0]["objects"][0]["xyxy"] == [left[5]["objects"][0]["xyxy"][0] - 5, 10.0,
                                             left[5]["objects"][0]["xyxy"][2] - 5, 30.0]
    assert left[0]["objects"][0] == {"id": 7, "label": "red square", "color": [230, 30, 30],
                                     "xyxy": [10.0, 10.0, 30.0, 30.0], "visible": 1.0}
    with av.open(str(scene.cameras["left"])) as c:
        assert c.streams.video[0].time_base == Fraction(1, 90000)


def test_same_seed_same_scene(tmp_path: Path) -> None:
    a = write_scene(tmp_path / "a", width=128, height=96, duration_s=1.0, seed=11)
    b = write_scene(tmp_path / "b", width=128, height=96, duration_s=1.0, seed=11)
    strip = lambda gt: {c: v["frames"] for c, v in gt["cameras"].items()}  # noqa: E731
    assert strip(a.ground_truth) == strip(b.ground_truth)


def test_replay_records(scene_cfr: Any) -> None:
    gt = scene_cfr.ground_truth
    n_frames = len(gt["cameras"]["cam0"]["frames"])
    recs = replay_records(gt, query="q1", labels=["red circle"], score=0.8)
    assert len(recs) == n_frames
    assert {r["camera"] for r in recs} == {"cam0"} and {r["query"] for r in recs} == {"q1"}
    boxes = [b for r in recs for b in r["boxes"]]
    assert boxes and {b["label"] for b in boxes} == {"red circle"} and {b["score"] for b in boxes} == {0.8}
    # Hidden objects are not "seen": fewer boxes with a strict visibility floor.
    strict = sum(len(r["boxes"]) for r in replay_records(gt, min_visible=0.99))
    loose = sum(len(r["boxes"]) for r in replay_records(gt, min_visible=0.0))
    assert strict < loose
    assert recs[3]["pts"] == gt["cameras"]["cam0"]["frames"][3]["pts"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_scene(tmp_path, width=101, height=64)
    with pytest.raises(ValueError, match="positive"):
        write_scene(tmp_path, fps=0)
