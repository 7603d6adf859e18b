"""Tracking quality and speed at 25, 5 and 1.7 updates per second: StreamVG vs ByteTrack.

Ground truth: TUD-Campus and TUD-Stadtmitte (MOTChallenge `gt.txt`, shipped in the
`motmetrics` wheel, 640x480 at 25 fps). From it, noisy detections are made with a fixed seed:
each box edge jittered by `--jitter` of the box's width/height (one standard deviation),
`--drop` of the boxes dropped, and `--fp` false positives per true box (random places,
sizes drawn from the sequence's boxes). True boxes score U(0.5, 1), false ones U(0.1, 0.8).

The same detections, sampled every 1st, 5th and 15th frame (25, 5, 1.7 fps), are fed to

- StreamVG's `Tracker` (defaults) with `t` = media seconds and the sequence's frame size
  (online, as `monitor` runs it),
- the offline pass of `streamvg search` ("offline": the same tracker with each ambiguous
  pairing deferred until the next updates are seen, `streamvg.tracking.offline.track_offline`),
  and
- the reference, Roboflow `trackers` `ByteTrackTracker` (defaults, `frame_rate` set to the
  sampled rate and the media time passed as `timestamp`, its time-aware mode),

scored with motmetrics (MOTA, IDF1; IoU ≥ 0.5), averaged over `--seeds` seeds and both
sequences; "oracle" scores the noisy detections with their true ids (the ceiling),
"oracle_no_fp" the same without the false boxes; `of_ceiling` gives each as a fraction of
"oracle". Speed is
updates per second of `update()` alone on the same inputs (each in its own format, built
before the clock starts), best of `--repeat` passes.

    pip install --no-deps trackers     # reference; it declares opencv-python (non-headless)
    python benchmarks/tracking.py                       # the acceptance figures
    python benchmarks/tracking.py --heldout             # other noise levels, strides, synthetic scenes

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if not hasattr(np, "asfarray"):  # motmetrics 1.4 still calls np.asfarray, removed in NumPy 2
    np.asfarray = lambda a, dtype=np.float64: np.asarray(a, dtype=dtype)  # type: ignore[attr-defined]

import motmetrics as mm  # noqa: E402

from streamvg.config import TrackerConfig  # noqa: E402
from streamvg.tracking import Tracker  # noqa: E402
from streamvg.tracking.offline import OfflineConfig, track_offline  # noqa: E402
from streamvg.types import Detections  # noqa: E402

FPS = 25.0
# frame number -> (ids (n,), xyxy (n, 4))
Sequence_ = dict[int, tuple[np.ndarray, np.ndarray]]


def load_mot(path: Path) -> Sequence_:
    """MOTChallenge `gt.txt` (frame, id, x, y, w, h, ...) → per-frame ids and xyxy boxes."""
    rows = np.loadtxt(path, delimiter=",", ndmin=2)
    out: Sequence_ = {}
    for f in np.unique(rows[:, 0]).astype(int):
        r = rows[rows[:, 0] == f]
        xyxy = np.concatenate([r[:, 2:4], r[:, 2:4] + r[:, 4:6]], axis=1)
        out[int(f)] = (r[:, 1].astype(int), xyxy)
    return out


def synthetic(seed: int, *, n_objects: int = 14, seconds: float = 16.0, size: tuple[int, int] = (1280, 720),
              speed: float = 1.2) -> Sequence_:
    """People-like boxes walking with smooth random velocity changes, crossing each other.

    Box heights 60–260 px (aspect 0.4), speeds around `speed` box heights per second with
    turns, objects entering and leaving at random times; 25 fps.
    """
    rng = np.random.default_rng(10_000 + seed)
    w_img, h_img = size
    n_frames = int(seconds * FPS)
    out: Sequence_ = {f: (np.zeros(0, int), np.zeros((0, 4))) for f in range(1, n_frames + 1)}
    for oid in range(1, n_objects + 1):
        h = rng.uniform(60, 260)
        w = 0.4 * h
        start = int(rng.integers(1, n_frames // 2))
        length = int(rng.integers(int(2 * FPS), n_frames - start + 1))
        pos = np.array([rng.uniform(w, w_img - w), rng.uniform(h / 2, h_img - h / 2)])
        ang = rng.uniform(0, 2 * np.pi)
        vel = speed * h * rng.uniform(0.3, 1.3) * np.array([np.cos(ang), 0.3 * np.sin(ang)])
        for f in range(start, min(start + length, n_frames + 1)):
            vel += rng.normal(0, 0.6 * h, 2) / FPS  # velocity random walk, box heights/s per s
            pos += vel / FPS
            for ax, lim in ((0, w_img), (1, h_img)):  # bounce off the image border
                if not 0 <= pos[ax] <= lim:
                    vel[ax] = -vel[ax]
                    pos[ax] = np.clip(pos[ax], 0, lim)
            ids, boxes = out[f]
            box = np.array([[pos[0] - w / 2, pos[1] - h / 2, pos[0] + w / 2, pos[1] + h / 2]])
            out[f] = (np.append(ids, oid), np.concatenate([boxes, box]))
    return out


def noisy(gt: Sequence_, seed: int, *, jitter: float, drop: float, fp: float,
          size: tuple[int, int]) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per frame: (true id or -1 for a false box, xyxy, score), at the full frame rate."""
    rng = np.random.default_rng(seed)
    all_wh = np.concatenate([b[:, 2:] - b[:, :2] for _, b in gt.values() if len(b)])
    out = {}
    for f in sorted(gt):
        ids, boxes = gt[f]
        keep = rng.random(len(ids)) >= drop
        ids, boxes = ids[keep], boxes[keep]
        wh = boxes[:, 2:] - boxes[:, :2]
        boxes = boxes + rng.normal(0, jitter, boxes.shape) * np.concatenate([wh, wh], axis=1)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = rng.uniform(0.5, 1.0, len(ids))
        n_fp = rng.poisson(fp * len(gt[f][0]))
        fwh = all_wh[rng.integers(0, len(all_wh), n_fp)]
        fxy = rng.uniform(0, 1, (n_fp, 2)) * np.maximum(np.array(size) - fwh, 1)
        out[f] = (
            np.concatenate([ids, np.full(n_fp, -1)]),
            np.concatenate([boxes, np.concatenate([fxy, fxy + fwh], axis=1)]),
            np.concatenate([scores, rng.uniform(0.1, 0.8, n_fp)]),
        )
    return out


def score(gt: Sequence_, hyp: dict[int, tuple[np.ndarray, np.ndarray]], frames: list[int]) -> tuple[float, float]:
    """MOTA and IDF1 (IoU ≥ 0.5) over the sampled frames."""
    acc = mm.MOTAccumulator(auto_id=True)
    for f in frames:
        gids, gboxes = gt.get(f, (np.zeros(0, int), np.zeros((0, 4))))
        hids, hboxes = hyp.get(f, (np.zeros(0, int), np.zeros((0, 4))))
        to_xywh = lambda b: np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)  # noqa: E731
        dist = mm.distances.iou_matrix(to_xywh(gboxes), to_xywh(hboxes), max_iou=0.5)
        acc.update(gids.tolist(), hids.tolist(), dist)
    m = mm.metrics.create().compute(acc, metrics=["mota", "idf1"], name="x")
    return float(m["mota"].iloc[0]), float(m["idf1"].iloc[0])


TRACKER_KW: dict[str, Any] = {}  # --tracker: settings to try instead of the defaults
OFFLINE_KW: dict[str, Any] = {}  # --offline: the offline pass's settings to try


Size = tuple[int, int]  # (width, height) of the sequence's frames, pixels
Runner = Callable[[list[Any], list[float], Size], tuple[list[tuple[np.ndarray, np.ndarray]], float]]


def _tracker(times: list[float], size: Size) -> Tracker:
    # interval_s: the sampler's 1/fps; frame_size: what the tracking stage passes from each frame.
    return Tracker(interval_s=times[1] - times[0] if len(times) > 1 else None, frame_size=size, **TRACKER_KW)


def run_streamvg(inputs: list[Any], times: list[float], size: Size) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    trk = _tracker(times, size)
    out, t0 = [], time.perf_counter()
    for d, t in zip(inputs, times, strict=True):
        r = trk.update(d, t)
        out.append((r.track_id, r.xyxy))
    return out, time.perf_counter() - t0


def run_offline(inputs: list[Any], times: list[float], size: Size) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """The offline pass of `streamvg search`: the tracker with each ambiguous decision
    deferred until the next updates have been seen (`streamvg.tracking.offline`)."""
    t0 = time.perf_counter()
    res = track_offline(list(zip(inputs, times, strict=True)), TrackerConfig(**TRACKER_KW),
                        offline=OfflineConfig(**OFFLINE_KW),
                        interval_s=times[1] - times[0] if len(times) > 1 else None, frame_sizes=[size] * len(times))
    elapsed = time.perf_counter() - t0
    return [(r.track_id, r.xyxy) for r in res.tracked], elapsed


def make_run_bytetrack(fps: float) -> Runner:
    from trackers import ByteTrackTracker

    def run(inputs: list[Any], times: list[float], size: Size) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
        del size  # ByteTrack takes no frame size
        trk = ByteTrackTracker(frame_rate=fps)
        out, t0 = [], time.perf_counter()
        for d, t in zip(inputs, times, strict=True):
            r = trk.update(d, timestamp=t)
            keep = r.tracker_id >= 0
            out.append((r.tracker_id[keep], r.xyxy[keep]))
        return out, time.perf_counter() - t0

    return run


def evaluate(gt: Sequence_, dets: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], stride: int,
             repeat: int, size: Size) -> dict[str, Any]:
    import supervision as sv

    frames = sorted(gt)[::stride]
    times = [(f - 1) / FPS for f in frames]
    ours_in = [Detections(dets[f][1], dets[f][2]) for f in frames]
    ref_in = [sv.Detections(xyxy=dets[f][1].astype(np.float32), confidence=dets[f][2].astype(np.float32),
                            class_id=np.zeros(len(dets[f][0]), int)) for f in frames]
    res: dict[str, Any] = {}
    fake_id = 10**6
    oracle = {}
    for f in frames:  # noisy detections with their true ids; each false box its own id
        ids = dets[f][0].copy()
        fp = ids < 0
        ids[fp] = fake_id + np.arange(fp.sum())
        fake_id += int(fp.sum())
        oracle[f] = (ids, dets[f][1])
    res["oracle"] = dict(zip(("mota", "idf1"), score(gt, oracle, frames), strict=True))
    true_only = {f: (dets[f][0][dets[f][0] >= 0], dets[f][1][dets[f][0] >= 0]) for f in frames}
    res["oracle_no_fp"] = dict(zip(("mota", "idf1"), score(gt, true_only, frames), strict=True))
    for name, runner, inputs in (("streamvg", run_streamvg, ours_in),
                                 ("offline", run_offline, ours_in),
                                 ("bytetrack", make_run_bytetrack(FPS / stride), ref_in)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            best = float("inf")
            for _ in range(repeat):
                out, elapsed = runner(inputs, times, size)
                best = min(best, elapsed)
        mota, idf1 = score(gt, dict(zip(frames, out, strict=True)), frames)
        res[name] = {"mota": mota, "idf1": idf1, "updates_per_s": len(frames) / best}
    return res


def mean_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over runs (seeds × sequences), with the standard error of MOTA and IDF1
    (`*_se`): at 1.7 fps a TUD run has only 5 or 12 updates, so single runs vary a lot."""
    out: dict[str, Any] = {}
    for name in results[0]:
        out[name] = {k: round(float(np.mean([r[name][k] for r in results])), 4) for k in results[0][name]}
        for k in ("mota", "idf1"):
            vals = [r[name][k] for r in results]
            out[name][f"{k}_se"] = round(float(np.std(vals, ddof=1) / np.sqrt(len(vals))), 4) if len(vals) > 1 else 0.0
    return out


def bench(sequences: dict[str, tuple[Callable[[int], Sequence_], Size]], seeds: int, strides: list[int],
          jitter: float, drop: float, fp: float, repeat: int) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for stride in strides:
        key = f"{FPS / stride:.3g}fps"
        runs, per_seq = [], {}
        for seq, (load, size) in sequences.items():
            seq_runs = []
            for seed in range(seeds):
                gt = load(seed)
                seq_runs.append(evaluate(gt, noisy(gt, seed, jitter=jitter, drop=drop, fp=fp, size=size),
                                         stride, repeat, size))
            per_seq[seq] = mean_results(seq_runs)
            runs += seq_runs
        m = mean_results(runs)
        s, b = m["streamvg"], m["bytetrack"]
        m["delta"] = {"mota": round(s["mota"] - b["mota"], 4), "idf1": round(s["idf1"] - b["idf1"], 4),
                      "speed_ratio": round(s["updates_per_s"] / b["updates_per_s"], 3)}
        m["of_ceiling"] = {name: {k: round(m[name][k] / max(m["oracle"][k], 1e-9), 4) for k in ("mota", "idf1")}
                           for name in ("streamvg", "offline", "bytetrack", "oracle_no_fp")}
        m["per_sequence"] = per_seq
        per[key] = m
    return per


def targets(res: dict[str, Any]) -> dict[str, bool]:
    """Issue 22's targets on the default noise: offline IDF1 ≥ 0.95× the true-id ceiling at
    5 fps and ≥ 0.9× at 1.7 fps; online ≥ 0.85× at 1.7 fps; online never behind ByteTrack
    (MOTA and IDF1) at any rate; online updates/s ≥ ByteTrack's."""
    ok = {}
    for key, m in res.items():
        frac = m["of_ceiling"]
        if key.startswith("5"):
            ok[f"{key}_offline_idf1_0.95x"] = frac["offline"]["idf1"] >= 0.95
        if key.startswith("1.67"):
            ok[f"{key}_offline_idf1_0.9x"] = frac["offline"]["idf1"] >= 0.9
            ok[f"{key}_online_idf1_0.85x"] = frac["streamvg"]["idf1"] >= 0.85
        d = m["delta"]
        ok[f"{key}_online_not_behind_bytetrack"] = d["mota"] >= 0 and d["idf1"] >= 0
        ok[f"{key}_online_updates_per_s_ge_bytetrack"] = d["speed_ratio"] >= 1.0
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="noise seeds per sequence (10: standard error ≈ .01 IDF1 at 1.7 fps)")
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 5, 15])
    ap.add_argument("--jitter", type=float, default=0.05)
    ap.add_argument("--drop", type=float, default=0.10)
    ap.add_argument("--fp", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3, help="timing passes per run (best is kept)")
    ap.add_argument("--gt", nargs="*", default=None, help="other MOTChallenge gt.txt files (640x480 assumed unless --size)")
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480])
    ap.add_argument("--heldout", action="store_true", help="run the held-out variants instead")
    ap.add_argument("--tracker", type=json.loads, default={}, help='tracker settings to try, as JSON: \'{"gate_sigmas": 3.5}\'')
    ap.add_argument("--offline", type=json.loads, default={}, help='offline pass settings to try, as JSON: \'{"horizon": 6}\'')
    args = ap.parse_args()
    TRACKER_KW.update(args.tracker)
    OFFLINE_KW.update(args.offline)

    data = Path(mm.__file__).parent / "data"
    paths = [Path(p) for p in args.gt] if args.gt else [data / "TUD-Campus" / "gt.txt", data / "TUD-Stadtmitte" / "gt.txt"]
    size = (int(args.size[0]), int(args.size[1]))
    tud = {p.parent.name: ((lambda _seed, p=p: load_mot(p)), size) for p in paths}
    common = {"seeds": args.seeds, "repeat": args.repeat}
    if not args.heldout:
        res = bench(tud, strides=args.strides, jitter=args.jitter, drop=args.drop, fp=args.fp, **common)
        print(json.dumps({"benchmark": "tracking", "sequences": list(tud), "seeds": args.seeds,
                          "noise": {"jitter": args.jitter, "drop": args.drop, "fp": args.fp},
                          "results": res, "targets_met": targets(res)}, indent=1))
        return
    syn = {"synthetic": (lambda seed: synthetic(seed), (1280, 720))}
    fast = {"synthetic_fast": (lambda seed: synthetic(seed, speed=2.5), (1280, 720))}
    variants = {
        "tud_jitter2": (tud, dict(jitter=0.02, drop=0.10, fp=0.05, strides=[1, 5, 15])),
        "tud_jitter10": (tud, dict(jitter=0.10, drop=0.10, fp=0.05, strides=[1, 5, 15])),
        "tud_drop20": (tud, dict(jitter=0.05, drop=0.20, fp=0.05, strides=[1, 5, 15])),
        "tud_fp15": (tud, dict(jitter=0.05, drop=0.10, fp=0.15, strides=[1, 5, 15])),
        "tud_strides": (tud, dict(jitter=0.05, drop=0.10, fp=0.05, strides=[2, 10, 25])),
        "synthetic": (syn, dict(jitter=0.05, drop=0.10, fp=0.05, strides=[1, 5, 15, 25])),
        "synthetic_fast": (fast, dict(jitter=0.05, drop=0.10, fp=0.05, strides=[1, 5, 15])),
    }
    out = {}
    for name, (seqs, kw) in variants.items():
        res = bench(seqs, **kw, **common)  # type: ignore[arg-type]
        out[name] = {k: {"streamvg": {m: v["streamvg"][m] for m in ("mota", "idf1")},
                         "offline": {m: v["offline"][m] for m in ("mota", "idf1")},
                         "bytetrack": {m: v["bytetrack"][m] for m in ("mota", "idf1")},
                         "oracle": v["oracle"], "delta": v["delta"]} for k, v in res.items()}
    print(json.dumps({"benchmark": "tracking-heldout", "seeds": args.seeds, "variants": out}, indent=1))


if __name__ == "__main__":
    main()
