"""`search --clips/--report/--mot` and `streamvg annotate` on a generated scene: clips decoded
by ffprobe and PyAV with pixel checks at the segments' boxes, the report rendered in real
headless Chromium at phone and desktop widths, annotated frames checked at ground-truth
boxes, and the MOT export scored by motmetrics against the scene's ground truth."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.demo import ground_truth_tracks, tracked_boxes
from streamvg.events import Event
from streamvg.reports import clip_name
from streamvg.reports.draw import BoxTrack, line_px, track_colour
from streamvg.testing.chromium import Chromium, find_chromium
from streamvg.testing.metrics import idf1
from streamvg.testing.synthetic import write_scene

FPS = 5.0
PAD_S = 1.0  # clips' default context before/after a segment


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command line in-process (what `python -m streamvg` runs, without its start-up)."""
    from streamvg.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def _noisy_answers(gt: dict[str, Any], label: str, other: str, query: str, seed: int) -> list[dict[str, Any]]:
    """An imperfect "model": the wanted object's exact box, missing on a fifth of the frames,
    and another object wrongly answered on a quarter of them (so tracks switch and IDF1 is
    below 1), with random scores."""
    rng = random.Random(seed)
    out = []
    for cam, info in gt["cameras"].items():
        for fr in info["frames"]:
            boxes = []
            for o in fr["objects"]:
                if o["visible"] < 0.5:
                    continue
                if (o["label"] == label and rng.random() > 0.2) or (o["label"] == other and rng.random() < 0.25):
                    boxes.append({"xyxy": list(o["xyxy"]), "score": round(rng.uniform(0.5, 1.0), 3)})
            out.append({"camera": cam, "pts": fr["pts"], "query": query, "boxes": boxes})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `streamvg search` of a two-camera scene, two queries, every output asked for."""
    root = tmp_path_factory.mktemp("reports")
    scene = write_scene(root / "videos", cameras=2, width=320, height=192, duration_s=6.0, seed=3)
    labels = sorted({o["label"] for c in scene.ground_truth["cameras"].values() for f in c["frames"] for o in f["objects"]})
    queries = {"q1": f"the {labels[0]}", "q2": f"the {labels[1]}"}
    answers = root / "answers.jsonl"
    recs = _noisy_answers(scene.ground_truth, labels[0], labels[1], queries["q1"], 1)
    recs += _noisy_answers(scene.ground_truth, labels[1], labels[2], queries["q2"], 2)
    answers.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = {k: root / k for k in ("clips", "mot")}
    report, events, segs = root / "out" / "report.html", root / "events.jsonl", root / "segments.jsonl"
    from streamvg.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):  # in-process: no start-up
        code = main(["search", str(root / "videos"), "-q", queries["q1"], "-q", queries["q2"], "--engine", "replay",
                     "--replay", str(answers), "--fps", str(FPS), "--clips", str(out["clips"]), "--report", str(report),
                     "--mot", str(out["mot"]), "--events", str(events), "--out", str(segs), "--json"])
    assert code == 0, stderr.getvalue()
    segments = json.loads(stdout.getvalue())["segments"]
    assert len({s["query_id"] for s in segments}) == 2 and len(segments) >= 4
    return {"scene": scene, "labels": labels, "queries": queries, "segments": segments, "report": report,
            "events": events, **out}


def _decode(path: Path) -> Iterator[tuple[float, np.ndarray]]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for f in c.decode(s):
            yield float(f.pts * s.time_base), f.to_ndarray(format="rgb24")


def _bands(xyxy: list[float], shape: tuple[int, ...]) -> list[tuple[slice, slice]]:
    """The four edge bands of a drawn box (inset by a pixel: H.264 blurs the outer rim)."""
    h, w = shape[:2]
    LINE_PX = line_px(h)
    x1, y1, x2, y2 = (round(v) for v in xyxy)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    mid = LINE_PX // 2
    return [
        (slice(y1 + mid, y1 + mid + 1), slice(x1 + LINE_PX, x2 - LINE_PX)),
        (slice(y2 - 1 - mid, y2 - mid), slice(x1 + LINE_PX, x2 - LINE_PX)),
        (slice(y1 + LINE_PX, y2 - LINE_PX), slice(x1 + mid, x1 + mid + 1)),
        (slice(y1 + LINE_PX, y2 - LINE_PX), slice(x2 - 1 - mid, x2 - mid)),
    ]


def _box_drawn(img: np.ndarray, xyxy: list[float], colour: tuple[int, int, int], *, tol: float = 75.0) -> bool:
    """Every edge band of `xyxy` is, on average, within `tol` per channel of `colour` (4:2:0
    chroma lets what is under a line bleed into it by up to ~60)."""
    for ys, xs in _bands(xyxy, img.shape):
        band = img[ys, xs].reshape(-1, 3).astype(np.float32)
        if band.size == 0 or np.abs(band.mean(axis=0) - np.asarray(colour, np.float32)).max() > tol:
            return False
    return True


def _near(a: list[float], b: list[float]) -> bool:
    """Whether box `b`, with room for its label (above it, up to 130 px wide), comes within
    a few pixels of `a`."""
    right = max(b[2], b[0] + 130)
    return not (right + 4 < a[0] or a[2] + 4 < b[0] or b[3] + 4 < a[1] or a[3] + 4 < b[1] - 24)


def _source_frames(run: dict[str, Any], camera: str) -> list[float]:
    return [float(f["pts"]) for f in run["scene"].ground_truth["cameras"][camera]["frames"]]


def test_clips_decode_cover_their_segment_and_draw_its_box(run: dict[str, Any]) -> None:
    clips: Path = run["clips"]
    written = sorted(p.name for p in clips.glob("*.mp4"))
    names = [clip_name(_Seg(s)) for s in run["segments"]]
    assert sorted(names) == written  # one clip per segment, nothing else
    # Names sort by video, then time.
    order = sorted(run["segments"], key=lambda s: (s["camera"], s["start_s"], s["query_id"], s["track_id"]))
    assert [clip_name(_Seg(s)) for s in order] == written
    for s in run["segments"]:
        path = clips / clip_name(_Seg(s))
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=codec_name,nb_frames:format=duration",
             "-of", "json", str(path)], capture_output=True, text=True, timeout=60,
        )
        assert probe.returncode == 0 and not probe.stderr, probe.stderr
        info = json.loads(probe.stdout)
        assert info["streams"][0]["codec_name"] == "h264"
        duration = float(info["format"]["duration"])
        assert duration >= s["end_s"] - s["start_s"], (s, duration)
        pts = _source_frames(run, s["camera"])
        t_first = min(t for t in pts if t >= max(0.0, s["start_s"] - PAD_S) - 1e-6)
        t_last = max(t for t in pts if t <= s["end_s"] + PAD_S + 1e-6)
        assert duration == pytest.approx(t_last - t_first + 1 / 25, abs=0.03)  # context on both sides, clamped
        frames = dict(_decode(path))
        assert len(frames) == int(info["streams"][0]["nb_frames"]) == round((t_last - t_first) * 25) + 1
        # The best frame shows the best box in the track's colour, at the box.
        best = min(frames, key=lambda t: abs(t - (s["best_t"] - t_first)))
        assert abs(best - (s["best_t"] - t_first)) < 1e-3
        colour = track_colour(s["camera"], s["query_id"], s["track_id"])
        assert _box_drawn(frames[best], s["best_xyxy"], colour), s
        # ... and only there: shifted away from the box, no such box is drawn.
        shifted = [v + d for v, d in zip(s["best_xyxy"], (9, 9, 9, 9), strict=True)]
        assert not _box_drawn(frames[best], shifted, colour), s
        # Before the segment (its context), no box of this track.
        if s["start_s"] - PAD_S > 0.2:
            assert not _box_drawn(frames[min(frames)], s["best_xyxy"], colour)


class _Seg:
    """A segment's JSON as the attributes `clip_name` reads."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.camera, self.start_s, self.query_id, self.track_id = d["camera"], d["start_s"], d["query_id"], d["track_id"]


@pytest.mark.skipif(find_chromium() is None, reason="Debian's chromium package is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_on_phone_and_desktop(run: dict[str, Any], tmp_path: Path) -> None:
    with Chromium() as browser:
        for width, height, mobile in ((390, 844, True), (1280, 900, False)):
            _check_report(browser, run, width, height, mobile, tmp_path)


def _check_report(browser: Chromium, run: dict[str, Any], width: int, height: int, mobile: bool, tmp_path: Path) -> None:
    report: Path = run["report"]
    html = report.read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # no network, no code
    with browser.page(width=width, height=height, mobile=mobile) as page:
        page.goto(report.resolve().as_uri())
        cards = page.evaluate("[...document.querySelectorAll('article.card')].map(c => [c.closest('section').dataset.query, +c.dataset.segment])")
        per_query = {q: sum(1 for s in run["segments"] if s["query_id"] == q) for q in run["queries"]}
        assert {q: sum(1 for c in cards if c[0] == q) for q in run["queries"]} == per_query
        assert sorted(c[1] for c in cards) == list(range(len(run["segments"])))
        images = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])")
        assert len(images) == len(run["segments"])
        assert all(ok and w > 0 and h > 0 and shown > 0 for ok, w, h, shown in images), images
        bars = page.evaluate("[...document.querySelectorAll('.timeline')].map(t => [t.dataset.video, t.querySelectorAll('.bar').length])")
        assert {v: n for v, n in bars} == {c: sum(1 for s in run["segments"] if s["camera"] == c) for c in run["scene"].cameras}
        links = page.evaluate("[...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))")
        assert len(links) == len(run["segments"]) and all((report.parent / h).is_file() for h in links)
        # Nothing is wider than the screen: no horizontal scrolling, no element past the right edge.
        overflow = page.evaluate(
            "(() => { const w = document.documentElement.clientWidth;"
            " const bad = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > w + 0.5)"
            "  .map(e => e.tagName + '.' + e.className);"
            " return [document.documentElement.scrollWidth, w, bad]; })()"
        )
        assert overflow[0] <= overflow[1] == width and not overflow[2], overflow
        png = page.screenshot(full_page=True)
        (tmp_path / f"report-{width}.png").write_bytes(png)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == width
        assert not page.errors, page.errors


def test_annotate_draws_events_at_ground_truth_boxes(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cam = "cam0"
    video = run["scene"].cameras[cam]
    out = tmp_path / "annotated.mp4"
    r = _main(capsys, "annotate", str(video), "--events", str(run["events"]), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["camera"] == cam and res["tracks"] > 0
    gt = run["scene"].ground_truth["cameras"][cam]
    frames = dict(_decode(out))
    assert sorted(round(t, 4) for t in frames) == [round(f["pts"], 4) for f in gt["frames"]]  # every frame, its own time
    events = [Event.from_json(line) for line in run["events"].read_text().splitlines()]
    tracked = [e for e in events if e.camera == cam and e.kind in ("track_start", "track_update") and e.detail != "lost"]
    checked = 0
    for ev in tracked:
        others = [e.boxes[0]["xyxy"] for e in tracked if e.t == ev.t and e is not ev]
        if any(_near(ev.boxes[0]["xyxy"], o) for o in others):
            continue  # another track's box or label is drawn over this one here
        assert ev.t is not None and ev.frame_index is not None
        box = ev.boxes[0]["xyxy"]
        # The ground-truth object this track is following at this frame.
        truth = [o["xyxy"] for o in gt["frames"][ev.frame_index]["objects"]
                 if max(abs(a - b) for a, b in zip(o["xyxy"], box, strict=True)) < 0.01]
        assert len(truth) == 1, (ev, truth)
        img = frames[min(frames, key=lambda t: abs(t - float(ev.t or 0)))]
        colour = track_colour(cam, ev.query_id, ev.track_id)
        assert _box_drawn(img, truth[0], colour), (ev.t, ev.query_id, ev.track_id, truth[0])
        checked += 1
    assert checked >= 20
    # Between two sampled frames the box is interpolated: check the frame halfway.
    samples: dict[tuple[str, int], list[tuple[float, list[float], bool]]] = {}
    for e in tracked:
        clean = not any(_near(e.boxes[0]["xyxy"], o.boxes[0]["xyxy"]) for o in tracked
                        if (o.query_id, o.track_id) != (e.query_id, e.track_id) and abs(float(o.t or 0) - float(e.t or 0)) < 0.5)
        samples.setdefault((str(e.query_id), int(e.track_id or 0)), []).append((float(e.t or 0), e.boxes[0]["xyxy"], clean))
    interpolated = 0
    for (qid, tid), pts in samples.items():
        for (t0, b0, clean0), (t1, b1, clean1) in itertools.pairwise(pts):
            mids = sorted(t for t in frames if t0 + 1e-3 < t < t1 - 1e-3)
            if not mids or t1 - t0 > 2.0 or not (clean0 and clean1):
                continue
            tm = mids[len(mids) // 2]
            box = BoxTrack([t0, t1], [b0, b1]).box_at(tm)
            assert box is not None and _box_drawn(frames[tm], box, track_colour(cam, qid, tid)), (qid, tid, tm)
            interpolated += 1
    assert interpolated >= 10


def test_annotate_bad_input_is_one_sentence(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    video = run["scene"].cameras["cam0"]
    r = _main(capsys, "annotate", str(video), "--events", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "a.mp4"))
    assert r.returncode == 2 and "nope.jsonl: no such events file" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "lobby.mp4"
    other.write_bytes(Path(video).read_bytes())
    r = _main(capsys, "annotate", str(other), "--events", str(run["events"]), "--out", str(tmp_path / "a.mp4"))
    assert r.returncode == 2 and "say which one lobby.mp4 shows with --camera" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "track_start"}\n{not json\n{"kind": "grounding"}\n')
    r = _main(capsys, "annotate", str(video), "--events", str(bad), "--out", str(tmp_path / "a.mp4"))
    assert r.returncode == 2 and "bad.jsonl:2 is not a JSON event" in r.stderr, r.stderr
    r = _main(capsys, "annotate", str(tmp_path / "gone.mp4"), "--events", str(run["events"]), "--camera", "cam0",
             "--out", str(tmp_path / "a.mp4"))
    assert r.returncode == 2 and "gone.mp4: no such video file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_mot_export_scores_the_same_idf1_in_motmetrics(run: dict[str, Any], tmp_path: Path) -> None:
    if not hasattr(np, "asfarray"):  # motmetrics 1.4 still calls np.asfarray, removed in NumPy 2
        np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)  # type: ignore[attr-defined]
    import motmetrics as mm

    events = [Event.from_json(line) for line in run["events"].read_text().splitlines()]
    files = sorted(p.name for p in run["mot"].glob("*.txt"))
    assert files == sorted(f"{c}_{q}.txt" for c in run["scene"].cameras for q in run["queries"])
    scores = []
    for cam in run["scene"].cameras:
        gt = run["scene"].ground_truth["cameras"][cam]
        for qid, label in (("q1", run["labels"][0]), ("q2", run["labels"][1])):
            sampled = sorted({e.frame_index for e in events if e.kind == "grounding" and e.camera == cam
                              and e.query_id == qid and e.frame_index is not None})
            # The scene's ground truth at the grounded frames, as a MOTChallenge gt.txt.
            gt_txt = tmp_path / f"{cam}-{qid}-gt.txt"
            with gt_txt.open("w") as fh:
                for i in sampled:
                    for o in gt["frames"][i]["objects"]:
                        if o["label"] == label and o["visible"] >= 0.5:
                            x1, y1, x2, y2 = o["xyxy"]
                            fh.write(f"{i + 1},{o['id'] + 1},{x1},{y1},{x2 - x1},{y2 - y1},1,-1,-1,-1\n")
            truth = mm.io.loadtxt(str(gt_txt), fmt="mot15-2D")
            hyp = mm.io.loadtxt(str(run["mot"] / f"{cam}_{qid}.txt"), fmt="mot15-2D")
            assert set(hyp.index.get_level_values(0)) <= {i + 1 for i in sampled}  # MOTChallenge frame numbers
            acc = mm.utils.compare_to_groundtruth(truth, hyp, "iou", distth=0.5)
            theirs = float(mm.metrics.create().compute(acc, metrics=["idf1"], name="x")["idf1"].iloc[0])
            times = {round(gt["frames"][i]["pts"], 4) for i in sampled}
            ours = idf1(ground_truth_tracks(run["scene"].ground_truth, cam, [label], times),
                        tracked_boxes(events, cam, qid))
            assert theirs == pytest.approx(ours, abs=1e-9), (cam, qid)
            scores.append(ours)
    assert min(scores) > 0.2 and max(scores) < 1.0  # imperfect answers: a score that could differ


def test_a_missing_video_costs_only_its_own_clips(run: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from streamvg.reports import write_clips

    kept = tmp_path / "kept.mp4"
    kept.write_bytes(Path(run["scene"].cameras["cam0"]).read_bytes())
    segs = [
        SimpleNamespace(**{**s, "video": str(kept if s["camera"] == "cam0" else tmp_path / "gone.mp4"), "boxes": []})
        for s in run["segments"]
    ]
    with caplog.at_level(logging.WARNING):
        paths = write_clips(segs, tmp_path / "clips", pad_s=0.0)
    assert [p is not None for p in paths] == [s.camera == "cam0" for s in segs]
    assert all(p.is_file() for p in paths if p is not None)
    assert sum("gone.mp4: no such video file" in r.getMessage() for r in caplog.records) == 1  # once per video


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4)),
                min_size=1, max_size=8, unique_by=lambda x: round(x[0], 2)), st.floats(-5, 105))
def test_boxtrack_is_exact_at_samples_and_between_its_neighbours_elsewhere(
    samples: list[tuple[float, list[float]]], t: float,
) -> None:
    tr = BoxTrack([s[0] for s in samples], [s[1] for s in samples], max_gap_s=1e9, tolerance_s=1e-6)
    for ts, box in samples:
        assert tr.box_at(ts) == pytest.approx(box)
    box = tr.box_at(t)
    times = sorted(s[0] for s in samples)
    assert (box is None) == (t < times[0] - 1e-6 or t > times[-1] + 1e-6)
    if box is not None:
        before = max((s for s in samples if s[0] <= t + 1e-6), key=lambda s: s[0])
        after = min((s for s in samples if s[0] >= t - 1e-6), key=lambda s: s[0])
        for v, a, b in zip(box, before[1], after[1], strict=True):
            assert min(a, b) - 1e-6 <= v <= max(a, b) + 1e-6
