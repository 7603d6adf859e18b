"""`streamvg eval`: MIG-Bench and MC-Bench scoring from raw answers, and `--model` runs.

MIG-Bench: the 60-item sample (tests/data/migbench, MIT, from Migician) with answers made
up here in the forms real models write; the expected scores are computed independently in
this file from the boxes that were written into the answers. MC-Bench: hand-made annotation
sets whose AP50 is known by construction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.cli import main
from streamvg.evaluation import read_predictions, score_mc_bench, score_mig_bench
from streamvg.evaluation.migbench import answer_box, load_mig_bench
from streamvg.evaluation.predictions import Prediction

MIG_SAMPLE = Path(__file__).resolve().parent / "data" / "migbench" / "MIG_sample.json"


def _iou(a: list[float], b: list[float]) -> float:
    """An independent IoU (areas from widths and heights, no shared code with the scorer)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _write_answer(rel: list[float], form: str, image: int) -> tuple[str, list[float] | None]:
    """An answer in `form` for the relative box `rel`; returns (text, the relative box it encodes)."""
    g = [round(v * 1000) for v in rel]
    g = [min(max(v, 0), 1000) for v in g]
    as_grid = [v / 1000 for v in g]
    if form == "qwen2_tokens":
        return f"<|object_ref_start|>it<|object_ref_end|><|box_start|>({g[0]},{g[1]}),({g[2]},{g[3]})<|box_end|>", as_grid
    if form == "migbench_prose":
        return f"The object is in Image-{image} at [{g[0]}, {g[1]}, {g[2]}, {g[3]}].", as_grid
    if form == "json":
        return f'```json\n[{{"bbox_2d": [{g[0]}, {g[1]}, {g[2]}, {g[3]}], "label": "it", "image": {image}}}]\n```', as_grid
    if form == "relative":
        r = [round(v, 3) for v in rel]
        # The benchmark's rule reads 1 and more as the 0-1000 grid, so a relative 1.0 is 0.001.
        return f"[{r[0]}, {r[1]}, {r[2]}, {r[3]}]", [v / 1000 if v >= 1 else v for v in r]
    if form == "image_prefix":
        return f"Image {image}: <|box_start|>({g[0]},{g[1]}),({g[2]},{g[3]})<|box_end|>", as_grid
    if form == "garbage":
        return "I am not sure what you mean.", None
    raise AssertionError(form)


FORMS = ["qwen2_tokens", "migbench_prose", "json", "relative", "image_prefix", "garbage"]


def _made_up(items: list[dict[str, Any]], seed: int) -> tuple[list[dict[str, Any]], list[float], list[bool]]:
    """Answers with shifted GT boxes in rotating forms; returns lines, expected IoU, parsed flags."""
    rng = np.random.default_rng(seed)
    lines, expected, parsed = [], [], []
    for i, it in enumerate(items):
        gt = [float(v) for v in it["answer"]]
        w, h = gt[2] - gt[0], gt[3] - gt[1]
        dx, dy = rng.uniform(-0.6, 0.6) * w, rng.uniform(-0.6, 0.6) * h
        pred = [gt[0] + dx, gt[1] + dy, gt[2] + dx, gt[3] + dy]
        pred = [min(max(v, 0.0), 1.0) for v in pred]
        if pred[2] - pred[0] < 0.01 or pred[3] - pred[1] < 0.01:
            pred = gt
        form = FORMS[(i + seed) % len(FORMS)]
        text, enc = _write_answer(pred, form, image=1 + i % len(it["images"]))
        lines.append({"index": i, "text": text})
        expected.append(0.0 if enc is None else _iou(gt, enc))
        parsed.append(enc is not None)
    return lines, expected, parsed


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mig_bench_scores_equal_an_independent_computation(tmp_path: Path, capsys: pytest.CaptureFixture[str], seed: int) -> None:
    items = load_mig_bench(MIG_SAMPLE)
    lines, expected, parsed = _made_up(items, seed)
    pred = tmp_path / "pred.jsonl"
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, out, err = _run_cli(["eval", "mig-bench", str(MIG_SAMPLE), "--predictions", str(pred), "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    by_task: dict[str, list[float]] = {}
    for it, v in zip(items, expected, strict=True):
        by_task.setdefault(it["task"], []).append(v)
    assert set(got["tasks"]) == set(by_task)
    for task, vals in by_task.items():
        t = got["tasks"][task]
        assert t["n"] == len(vals)
        for th in (0.3, 0.5, 0.7):
            assert t[f"iou@{th}"] == pytest.approx(sum(v >= th for v in vals) / len(vals))
        assert t["mean_iou"] == pytest.approx(float(np.mean(vals)), abs=1e-5)
    everything = [v for vals in by_task.values() for v in vals]
    overall = got["overall"]
    assert overall["item_weighted"]["mean_iou"] == pytest.approx(float(np.mean(everything)), abs=1e-5)
    assert overall["task_averaged"]["iou@0.5"] == pytest.approx(
        float(np.mean([np.mean([v >= 0.5 for v in vals]) for vals in by_task.values()]))
    )
    assert overall["unparsed"] == parsed.count(False) > 0
    assert overall["missing"] == 0 and got["failures"] == [] and got["missing_items"] == []


@settings(max_examples=80, deadline=None)
@given(
    box=st.tuples(st.integers(0, 990), st.integers(0, 990), st.integers(1, 500), st.integers(1, 500)),
    form=st.sampled_from(["qwen2_tokens", "migbench_prose", "json", "image_prefix"]),
    n_images=st.integers(1, 6),
    data=st.data(),
)
def test_the_first_box_is_read_in_every_form(box: tuple[int, int, int, int], form: str, n_images: int, data: st.DataObject) -> None:
    x, y, w, h = box
    rel = [x / 1000, y / 1000, min(x + w, 1000) / 1000, min(y + h, 1000) / 1000]
    image = data.draw(st.integers(1, n_images))
    text, enc = _write_answer(rel, form, image)
    got = answer_box(text + " Also [1, 2, 3, 4] in Image-1.", n_images)  # a second box never wins
    assert got is not None and enc is not None
    assert got == pytest.approx(enc, abs=1e-6)


def test_qwen2_5_vl_answers_in_model_input_pixels(tmp_path: Path) -> None:
    items = [{"task": "t", "images": ["a", "b"], "question": "?", "answer": [0.25, 0.5, 0.5, 1.0]}]
    # The model saw image 2 (800x400) resized to 448x224: the GT box is x 112..224, y 112..224 there.
    text = '[{"bbox_2d": [112, 112, 224, 224], "image": 2}]'
    pred = Prediction(0, text, frame_sizes=[(640, 480), (800, 400)], input_sizes=[(448, 336), (448, 224)], convention="qwen2_5_vl")
    score = score_mig_bench(items, {0: pred})
    assert score.ious[0] == pytest.approx(1.0, abs=1e-4)
    # The same numbers read on the 0-1000 grid are far off.
    assert score_mig_bench(items, {0: pred}, convention="migician").ious[0] < 0.1


def test_missing_answers_exit_1_and_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"index": 3, "text": "[1, 2, 3, 4]"}) + "\n" + '{"index": 4, "te')  # torn last line
    code, out, err = _run_cli(["eval", "mig-bench", str(MIG_SAMPLE), "-p", str(pred), "--json"], capsys)
    assert code == 1
    got = json.loads(out)
    assert got["overall"]["missing"] == 59 and len(got["missing_items"]) == 59 and 3 not in got["missing_items"]
    assert "incomplete" in err and "no answer" in err


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"index": 0, "text": "x"}\nnot json\n{"index": 1, "text": "y"}\n', "line 2 is not JSON"),
        ('{"index": 999, "text": "x"}\n', "outside the dataset"),
        ('{"text": "x"}\n', 'needs "index" and "text"'),
        ('{"index": "zero", "text": "x"}\n', "must be an integer"),
    ],
)
def test_bad_predictions_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, needle: str) -> None:
    pred = tmp_path / "pred.jsonl"
    pred.write_text(content)
    code, _out, err = _run_cli(["eval", "mig-bench", str(MIG_SAMPLE), "-p", str(pred)], capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_data_file_and_convention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred = tmp_path / "pred.jsonl"
    pred.write_text("")
    bad = tmp_path / "data.json"
    bad.write_bytes(b"\xff\xfe garbage")
    assert _run_cli(["eval", "mig-bench", str(bad), "-p", str(pred)], capsys)[0] == 2
    code, _out, err = _run_cli(["eval", "mig-bench", str(MIG_SAMPLE), "-p", str(pred), "--convention", "pixels"], capsys)
    assert code == 2 and "--convention 'pixels' is unknown" in err


# --- MC-Bench ---------------------------------------------------------------------------


def _mc_data(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Annotations from samples: each {"gt": [[img (0/1), group, x, y, w, h], ...]}, images 100x100."""
    images, annotations, descriptions = [], [], []
    for s, sample in enumerate(samples):
        ids = [2 * s + 1, 2 * s + 2]
        for k, i in enumerate(ids):
            images.append({"id": i, "file_name": f"s{s}_{k}.png", "width": 100, "height": 100, "pair_image_id": ids[1 - k]})
        for img, group, x, y, w, h in sample["gt"]:
            annotations.append({"id": len(annotations) + 1, "image_id": ids[img], "category_id": group,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        descriptions.append({"id": s, "images_id": ids, "text": f"sample {s}", "positive_sample": True})
    return {"images": images, "annotations": annotations, "descriptions": descriptions,
            "categories": [{"id": 1, "name": "group 1"}, {"id": 2, "name": "group 2"}]}


def _res(sample: int, img: int, group: int, box: list[float], score: float | None = 0.9) -> dict[str, Any]:
    r: dict[str, Any] = {"image_id": 2 * sample + 1 + img, "category_id": group, "bbox": box}
    if score is not None:
        r["score"] = score
    return r


HALF = 51 / 101  # COCO's 101-point precision: 1 up to recall 0.5, then 0


@pytest.mark.parametrize(
    ("name", "samples", "results", "ap50", "accuracy"),
    [
        ("perfect", [{"gt": [[0, 1, 10, 10, 30, 30], [1, 1, 50, 50, 20, 20]]}],
         [_res(0, 0, 1, [10, 10, 30, 30]), _res(0, 1, 1, [50, 50, 20, 20])], 1.0, 1.0),
        ("half right", [{"gt": [[0, 1, 10, 10, 30, 30], [1, 1, 50, 50, 20, 20]]}],
         [_res(0, 0, 1, [10, 10, 30, 30])], HALF, 0.0),
        ("wrong image", [{"gt": [[0, 1, 10, 10, 30, 30]]}],
         [_res(0, 1, 1, [10, 10, 30, 30])], 0.0, 0.0),
        ("no score", [{"gt": [[0, 1, 10, 10, 30, 30], [1, 1, 50, 50, 20, 20]]}],
         [_res(0, 0, 1, [10, 10, 30, 30], None), _res(0, 1, 1, [50, 50, 20, 20], None)], 1.0, 1.0),
        ("negative image left empty", [{"gt": [[0, 1, 10, 10, 30, 30]]}],
         [_res(0, 0, 1, [10, 10, 30, 30])], 1.0, 1.0),
        ("groups swapped by the model", [{"gt": [[0, 1, 10, 10, 30, 30], [1, 2, 50, 50, 20, 20]]}],
         [_res(0, 0, 2, [10, 10, 30, 30]), _res(0, 1, 1, [50, 50, 20, 20])], 1.0, 1.0),
        ("half the samples right", [{"gt": [[0, 1, 10, 10, 30, 30]]}, {"gt": [[1, 1, 40, 40, 30, 30]]}],
         [_res(0, 0, 1, [10, 10, 30, 30]), _res(1, 0, 1, [40, 40, 30, 30])], HALF, 0.5),
    ],
)
def test_mc_bench_ap50_known_by_construction(name: str, samples: list[dict[str, Any]], results: list[dict[str, Any]],
                                             ap50: float, accuracy: float) -> None:
    score = score_mc_bench(_mc_data(samples), results)
    assert score.ap50 == pytest.approx(ap50, abs=1e-6), name
    assert score.accuracy == pytest.approx(accuracy), name


def test_mc_bench_raw_answers_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _mc_data([{"gt": [[0, 1, 10, 10, 30, 30], [1, 1, 50, 50, 20, 20]]}, {"gt": [[1, 1, 20, 20, 40, 40]]}])
    ann = tmp_path / "mc.json"
    ann.write_text(json.dumps(data))
    pred = tmp_path / "answers.jsonl"
    pred.write_text(
        json.dumps({"index": 0, "text": "Image 1: <|box_start|>(100,100),(400,400)<|box_end|> "
                                        "Image 2: <|box_start|>(500,500),(700,700)<|box_end|>"}) + "\n"
        + json.dumps({"index": 1, "text": "Image 2: <|box_start|>(200,200),(600,600)<|box_end|>"}) + "\n"
    )
    code, out, err = _run_cli(["eval", "mc-bench", str(ann), "-p", str(pred), "--json"], capsys)
    assert code == 0, err
    got = json.loads(out)
    assert got["ap50"] == pytest.approx(1.0) and got["accuracy"] == pytest.approx(1.0)
    assert got["samples"] == 2 and got["predictions"] == 3
    # COCO results are scored as they are; one naming an unknown image is one sentence.
    res = tmp_path / "res.json"
    res.write_text(json.dumps([_res(0, 0, 1, [10, 10, 30, 30]), {"image_id": 77, "category_id": 1, "bbox": [1, 1, 2, 2]}]))
    code, _out, err = _run_cli(["eval", "mc-bench", str(ann), "-p", str(res)], capsys)
    assert code == 2 and "image 77" in err


def test_mc_bench_hostile_group_count_is_bounded() -> None:
    # 12 predicted groups against 12 targets: 12! permutations would never finish.
    gt = [[0, g, 5 * g, 5 * g, 4, 4] for g in range(1, 13)]
    data = _mc_data([{"gt": gt}])
    data["categories"] = [{"id": g, "name": f"group {g}"} for g in range(1, 13)]
    results = [_res(0, 0, 13 - g, [5 * g, 5 * g, 4, 4]) for g in range(1, 13)]
    score = score_mc_bench(data, results)
    assert score.ap50 == pytest.approx(1.0)


# --- --model runs -----------------------------------------------------------------------


def _mig_images(tmp_path: Path, n_items: int) -> tuple[Path, Path]:
    import cv2

    root = tmp_path / "dataset"
    items = []
    rng = np.random.default_rng(0)
    for i in range(n_items):
        paths = []
        for k in range(2):
            rel = f"./MIG-Bench/images/t/{i}_{k}.png"
            p = root / rel[2:]
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), rng.integers(0, 255, (48 + 8 * k, 64, 3), dtype=np.uint8))
            paths.append(rel)
        items.append({"task": ["diff", "region"][i % 2], "images": paths,
                      "question": "Find the object in the second image. ", "answer": [0.1, 0.1, 0.5, 0.5]})
    data = tmp_path / "mig.json"
    data.write_text(json.dumps(items))
    return data, root


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_model_runs_end_to_end_and_resumes(tmp_path: Path, tiny_models: dict[str, Path], family: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data, root = _mig_images(tmp_path, 5)
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"index": 1, "text": "answered before"}) + "\n")
    args = ["eval", "mig-bench", str(data), "-p", str(pred), "--model", str(tiny_models[family]), "--images", str(root),
            "--device", "cpu", "--batch-size", "2", "--max-new-tokens", "12", "--json"]
    code, out, err = _run_cli(args, capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert sorted(x["index"] for x in lines) == [0, 1, 2, 3, 4]  # item 1 was not asked again
    assert next(x for x in lines if x["index"] == 1)["text"] == "answered before"
    asked = [x for x in lines if x["index"] != 1]
    expected_conv = "qwen2_5_vl" if family == "qwen2_5_vl" else "qwen2_vl"
    assert all(x["convention"] == expected_conv and len(x["frame_sizes"]) == 2 for x in asked)
    assert all(x["input_sizes"] and all(w % 14 == 0 and h % 14 == 0 for w, h in x["input_sizes"]) for x in asked)
    assert json.loads(out)["overall"]["n"] == 5
    # A second run asks nothing and scores the same.
    code2, out2, err2 = _run_cli(args, capsys)
    assert code2 == 0 and "5 item(s) already answered" in err2
    assert json.loads(out2)["tasks"] == json.loads(out)["tasks"]
    assert len(pred.read_text().splitlines()) == 5


def test_model_run_interrupted_keeps_answers_and_resumes(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    data, root = _mig_images(tmp_path, 24)
    pred = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "streamvg", "eval", "mig-bench", str(data), "-p", str(pred),
           "--model", str(tiny_models["qwen2_vl"]), "--images", str(root), "--device", "cpu",
           "--batch-size", "1", "--max-new-tokens", "24"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        import time

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if pred.exists() and len(pred.read_text().splitlines()) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert b"Traceback" not in err
    first = read_predictions(pred, n_items=24)
    assert 2 <= len(first) < 24
    before = {i: p.text for i, p in first.items()}
    done = subprocess.run([*cmd, "--max-new-tokens", "4", "--batch-size", "8", "--json"], capture_output=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = read_predictions(pred, n_items=24)
    assert sorted(after) == list(range(24))
    assert all(after[i].text == t for i, t in before.items())  # answered items were not asked again
    assert len(pred.read_text().splitlines()) == 24
