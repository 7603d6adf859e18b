"""The model's work at scale: change gating on vs off, shared visual prefix vs not; prints JSON.

Two measurements, each against its baseline in the same run:

1. **Gating** (`streamvg.gating`): one camera watching a still scene (textured background,
   sensor noise, slow brightness drift, x264) that is idle two thirds of the time, with the
   object moving during known intervals. The real pipeline (decoder, sampler, windows, gate,
   the `gemvg` engine on a tiny random Qwen2.5-VL at realistic geometry, trackers, events)
   runs with gating on and off; reported per camera-minute: windows grounded, images
   encoded, prefill tokens, generated tokens, and how many windows showing activity were
   not grounded (must be 0), beside what an oracle knowing the activity would ground (every
   window overlapping it, and the first). Target: gating on grounds ≤ 0.4× the windows of
   gating off. Windows overlapping a burst's ends count whole, so the ratio an oracle reaches
   is about (burst/window + 1) / (3 · burst/window): ≤ 0.4 needs bursts of ≥ 5 windows (the
   default, two bursts in 120 s, is 20 s bursts of 2 s windows: ≈ 0.38).
2. **Shared prefix** (`streamvg.grounding.prefix`): Q = 1, 2, 4, 8 standing queries asked of
   4-frame windows of 448x448 frames (256 visual tokens per frame, ~1,100 prompt tokens),
   batched, with the shared visual prefix and without (`share_prefix=False`, one prompt and
   prefill per query); wall time (best of `--repeats`) and prefill tokens. Target: Q = 4
   prefills ≤ 1.5× the tokens of Q = 1 (without sharing: 4×).

The tiny model makes wall times a CPU figure of the plumbing, not of a 7B model (for that,
`benchmarks/engine_gpu.py` has the Q = 4 case); token and image counts are exact either way.

    python benchmarks/cost.py            # ~2-4 minutes on 2 CPU cores
    python benchmarks/cost.py --quick    # shorter scene, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def gating_case(model: Path, work: Path, *, duration_s: float, bursts: int, max_pixels: int) -> dict[str, Any]:
    from streamvg.config import (
        EngineConfig,
        GatingConfig,
        PipelineConfig,
        QueryConfig,
        SamplingConfig,
        SourceConfig,
    )
    from streamvg.demo import EventCollector
    from streamvg.pipeline import Pipeline
    from streamvg.testing.still import write_still_scene

    # Activity one third of the time, in `bursts` bursts, with equal idle stretches around them.
    burst = duration_s / 3 / bursts
    gap = (duration_s - bursts * burst) / (bursts + 1)
    activity = [(gap * (k + 1) + burst * k, gap * (k + 1) + burst * (k + 1)) for k in range(bursts)]
    # The object walks between its spots and paces about (40 px/s in a 320-px frame) while active.
    scene = write_still_scene(work / "scene", duration_s=duration_s, fps=10.0, activity=activity, wander_px_s=40.0)
    fps, size = 2.0, 4

    out: dict[str, Any] = {"scene_s": duration_s, "activity": [[round(a, 2), round(b, 2)] for a, b in activity],
                           "sampling": {"fps": fps, "window_size": size, "stride": size}}
    for label, on in (("gating_on", True), ("gating_off", False)):
        cfg = PipelineConfig(
            name=f"cost-{uuid.uuid4().hex[:6]}",
            sources=[SourceConfig(name="cam", uri=str(scene.video))],
            sampling=SamplingConfig(fps=fps, window_size=size, stride=size),
            queries=[QueryConfig(id="q", text="the red square")],
            engine=EngineConfig(kind="gemvg", model=str(model), device="cpu", max_pixels=max_pixels,
                                min_pixels=max_pixels, max_new_tokens=8, batch_size=4),
            gating=GatingConfig(enabled=on),
        )
        sink = EventCollector()
        t0 = time.perf_counter()
        summary = Pipeline(cfg, sinks=[sink], control=False).run()
        wall = time.perf_counter() - t0
        grounded_t = {round(e.t or 0.0, 3) for e in sink.events if e.kind == "grounding" and not e.carried_over}
        missed = 0
        for f in scene.frames:
            # a sampled frame showing activity must have been grounded
            if f["moving"] and abs(f["pts"] * fps - round(f["pts"] * fps)) < 1e-6 and round(f["pts"], 3) not in grounded_t:
                missed += 1
        per_min = 60.0 / duration_s
        out[label] = {
            "windows_grounded": summary.windows_grounded,
            "windows_unchanged": summary.windows_unchanged,
            "per_camera_minute": {
                "windows": round(summary.windows_grounded * per_min, 2),
                **{k: round(v * per_min, 1) for k, v in summary.work.items()},
            },
            "activity_frames_not_grounded": missed,
            "wall_s": round(wall, 2),
        }
    # What an oracle that knows the activity would ground: the first window and every window
    # holding a frame that differs from the frame before the window.
    period = 1.0 / fps
    oracle = 0
    for k in range(out["gating_off"]["windows_grounded"]):
        t0, t1 = k * size * period, (k * size + size - 1) * period
        oracle += k == 0 or any(f["moving"] for f in scene.frames if t0 - period < f["pts"] <= t1 + 1e-6)
    out["oracle_windows"] = oracle
    on_w, off_w = out["gating_on"]["windows_grounded"], out["gating_off"]["windows_grounded"]
    out["oracle_ratio"] = round(oracle / max(1, off_w), 3)
    out["windows_ratio"] = round(on_w / max(1, off_w), 3)
    out["prefill_ratio"] = round(out["gating_on"]["per_camera_minute"]["prefill_tokens"]
                                 / max(1.0, out["gating_off"]["per_camera_minute"]["prefill_tokens"]), 3)
    out["target"] = "windows_ratio <= 0.4 and no activity frame missed"
    out["target_met"] = out["windows_ratio"] <= 0.4 and out["gating_on"]["activity_frames_not_grounded"] == 0
    return out


def prefix_case(model: Path, *, windows: int, repeats: int) -> dict[str, Any]:
    import av

    from streamvg.grounding.hf import GemVGEngine
    from streamvg.types import Frame, Query, Window

    with av.open(str(ROOT / "tests" / "media" / "cup.mp4")) as c:
        frames = [Frame(camera="cup", index=i, pts=float(f.time), image=f.to_ndarray(format="rgb24"))
                  for i, f in zip(range(4 * windows), c.decode(video=0), strict=False)]
    wins = [Window(tuple(frames[4 * k : 4 * k + 4])) for k in range(windows)]
    texts = ["the cup", "the hand", "a person's arm", "the table", "the red object", "a shadow", "the mug handle", "the wall"]
    results: dict[str, Any] = {"frames_per_window": 4, "frame_size": "448x448 model input (256 visual tokens)",
                               "windows": windows, "cases": []}
    engine = GemVGEngine(model, device="cpu", max_pixels=448 * 448, min_pixels=448 * 448, max_new_tokens=8,
                         batch_size=64, generation_kwargs={"min_new_tokens": 8})
    engine.ground_many([(w, Query(id="warm", text="warm up")) for w in wins])  # visual tokens cached for both paths
    for q in (1, 2, 4, 8):
        queries = [Query(id=f"q{i}", text=texts[i]) for i in range(q)]
        requests = [(w, qq) for w in wins for qq in queries]
        row: dict[str, Any] = {"queries": q}
        texts_by: dict[bool, list[str]] = {}
        for share in (True, False):
            engine.share_prefix = share
            best, prefill = float("inf"), 0
            for _ in range(repeats):
                before = engine.stats.prefill_tokens
                t0 = time.perf_counter()
                out = engine.ground_many(requests)
                best = min(best, time.perf_counter() - t0)
                prefill = engine.stats.prefill_tokens - before
            texts_by[share] = [g.raw_text for g in out]
            key = "shared" if share else "per_query"
            row[f"{key}_wall_s"] = round(best, 4)
            row[f"{key}_prefill_tokens"] = prefill
        row["same_answers"] = texts_by[True] == texts_by[False]
        row["wall_ratio_shared_vs_per_query"] = round(row["shared_wall_s"] / row["per_query_wall_s"], 3)
        results["cases"].append(row)
    engine.share_prefix = True
    by_q = {r["queries"]: r for r in results["cases"]}
    results["prefill_q4_over_q1"] = {
        "shared": round(by_q[4]["shared_prefill_tokens"] / by_q[1]["shared_prefill_tokens"], 3),
        "per_query": round(by_q[4]["per_query_prefill_tokens"] / by_q[1]["per_query_prefill_tokens"], 3),
    }
    results["target"] = "shared prefill of Q=4 <= 1.5x Q=1"
    results["target_met"] = results["prefill_q4_over_q1"]["shared"] <= 1.5 and all(r["same_answers"] for r in results["cases"])
    engine.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="A 60 s scene, one prefix window, 1 repeat.")
    ap.add_argument("--duration-s", type=float, default=120.0, help="Length of the still scene, seconds.")
    ap.add_argument("--bursts", type=int, default=2, help="Bursts of activity (together a third of the scene).")
    ap.add_argument("--repeats", type=int, default=2, help="Timed runs per prefix case (best reported).")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration_s, args.repeats = 60.0, 1
    from streamvg.testing.tiny_model import build

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build(work / "tiny", "qwen2_5_vl")
        report = {
            "benchmark": "cost",
            "model": "tiny qwen2.5-vl (random weights), cpu",
            "gating": gating_case(model, work, duration_s=args.duration_s, bursts=args.bursts, max_pixels=224 * 224),
            "shared_prefix": prefix_case(model, windows=1 if args.quick else 2, repeats=args.repeats),
        }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
