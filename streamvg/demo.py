"""`streamvg demo`: a whole StreamVG run on generated video, no model needed.

A synthetic multi-camera scene (moving labelled shapes, exact ground truth) is written to
disk, the replay engine answers two queries from that ground truth, and the real
pipeline (file sources → windows → engine → trackers → sinks) runs on it. The tracks are
then scored against the ground truth with IDF1, so the demo is also a self-check.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streamvg.config import (
    EngineConfig,
    JsonlSinkConfig,
    PipelineConfig,
    QueryConfig,
    RedisSinkConfig,
    SamplingConfig,
    SinksConfig,
    SourceConfig,
)
from streamvg.events import Event
from streamvg.pipeline import Pipeline, default_sinks
from streamvg.redaction import mask_url
from streamvg.testing.metrics import idf1
from streamvg.testing.synthetic import replay_records, write_scene

__all__ = ["EventCollector", "demo_config", "ground_truth_tracks", "run_demo", "tracked_boxes", "write_pipeline_file"]


class EventCollector:
    """A sink that keeps events in memory (for the demo's self-check and for tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "q"


def ground_truth_tracks(
    ground_truth: dict[str, Any], camera: str, labels: list[str], times: set[float] | None = None, *, min_visible: float = 0.5
) -> dict[float, dict[int, list[float]]]:
    """`{pts: {object_id: xyxy}}` of the objects with one of `labels` in `camera`, at `times`."""
    out: dict[float, dict[int, list[float]]] = {}
    for fr in ground_truth["cameras"][camera]["frames"]:
        t = round(float(fr["pts"]), 4)
        if times is not None and t not in times:
            continue
        out[t] = {
            int(o["id"]): list(o["xyxy"])
            for o in fr["objects"]
            if o["label"] in labels and float(o.get("visible", 1.0)) >= min_visible
        }
    return out


def tracked_boxes(events: list[Event], camera: str, query_id: str) -> dict[float, dict[int, list[float]]]:
    """`{t: {track_id: xyxy}}` from track_start/track_update events of one camera and query."""
    out: dict[float, dict[int, list[float]]] = defaultdict(dict)
    for e in events:
        if e.camera == camera and e.query_id == query_id and e.kind in ("track_start", "track_update") and e.detail != "lost":
            assert e.t is not None and e.track_id is not None
            out[round(e.t, 4)][e.track_id] = list(e.boxes[0]["xyxy"])
    return dict(out)


def demo_config(
    out: Path, cameras: list[str], queries: list[QueryConfig], *, redis_ok: bool, redis_url: str, fps: float = 5.0
) -> PipelineConfig:
    """The pipeline the demo runs on the scene written under `out` (`pipelines/demo.yaml`
    is this for the default `out`, `streamvg-demo`, and a Redis that answers)."""
    sinks = SinksConfig(
        redis=RedisSinkConfig(url=redis_url, spool_dir=str(out / "spool")) if redis_ok else None,
        jsonl=None if redis_ok else JsonlSinkConfig(path=str(out / "events.jsonl")),
    )
    return PipelineConfig(
        name="demo",
        sources=[SourceConfig(name=name, uri=str(out / "videos" / f"{name}.mp4")) for name in cameras],
        sampling=SamplingConfig(fps=fps, window_size=4, stride=2),
        queries=queries,
        engine=EngineConfig(kind="replay", replay_path=str(out / "answers.jsonl")),
        sinks=sinks,
    )


def write_pipeline_file(cfg: PipelineConfig, path: Path) -> None:
    """Write `cfg` as a pipeline file (passwords masked) that `streamvg monitor` can run again."""
    import yaml

    header = "# What `streamvg demo` ran; `streamvg monitor` runs it again (paths relative to where the demo ran).\n"
    path.write_text(header + yaml.safe_dump(cfg.masked(), sort_keys=False), encoding="utf-8")


def run_demo(
    out: Path, *, cameras: int = 3, duration_s: float = 12.0, redis_url: str = "redis://127.0.0.1:6379/0",
    redis_ok: bool = False, show: bool = True, fps: float = 5.0,
) -> dict[str, Any]:
    """Generate, run, score; returns a JSON-ready summary."""
    console = Console(stderr=True, quiet=not show)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with console.status("generating a synthetic multi-camera scene…"):
        scene = write_scene(out / "videos", cameras=cameras, duration_s=duration_s, seed=7)
    gt = scene.ground_truth
    labels = sorted({o["label"] for cam in gt["cameras"].values() for fr in cam["frames"] for o in fr["objects"]})
    chosen = labels[:2]
    queries = [QueryConfig(id=_slug(label), text=f"the {label}") for label in chosen]
    answers = out / "answers.jsonl"
    with answers.open("w", encoding="utf-8") as fh:
        for q, label in zip(queries, chosen, strict=True):
            for rec in replay_records(gt, query=q.text, labels=[label]):
                fh.write(json.dumps(rec) + "\n")
    cfg = demo_config(out, sorted(scene.cameras), queries, redis_ok=redis_ok, redis_url=redis_url, fps=fps)
    write_pipeline_file(cfg, out / "pipeline.yaml")
    collector = EventCollector()
    pipe = Pipeline(cfg, sinks=[*default_sinks(cfg), collector], collect_segments=True, control=False)
    with console.status(f"running the pipeline on {cameras} cameras × {len(queries)} queries…"):
        summary = pipe.run()

    rows: list[dict[str, Any]] = []
    for cam in sorted(scene.cameras):
        for q, label in zip(queries, chosen, strict=True):
            hyp = tracked_boxes(collector.events, cam, q.id)
            sampled = {round(e.t, 4) for e in collector.events if e.kind == "grounding" and e.camera == cam and e.query_id == q.id and e.t is not None}
            truth = ground_truth_tracks(gt, cam, [label], sampled)
            tracks = {tid for boxes in hyp.values() for tid in boxes}
            objects = {oid for boxes in truth.values() for oid in boxes}
            rows.append({
                "camera": cam, "query_id": q.id, "query": q.text, "tracks": len(tracks), "objects": len(objects),
                "idf1": round(idf1(truth, hyp), 3),
            })
    where = f"Redis stream streamvg:demo:events at {mask_url(redis_url)}" if redis_ok else str(out / "events.jsonl")
    result = {
        "cameras": cameras, "duration_s": duration_s, "windows_grounded": summary.windows_grounded,
        "events_published": summary.events_published, "events_at": where, "elapsed_s": round(time.monotonic() - t0, 2),
        "tracks": rows, "segments": [s.to_json() for s in summary.segments],
    }
    if show:
        table = Table(title=f"StreamVG demo: {summary.windows_grounded} windows grounded, {summary.events_published} events")
        for col in ("camera", "query", "tracks found", "objects in truth", "IDF1 vs truth"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["camera"], r["query"], str(r["tracks"]), str(r["objects"]), f"{r['idf1']:.3f}")
        Console().print(table)
        seg_table = Table(title="tracks (segments)")
        for col in ("camera", "query", "track", "start", "end", "best score"):
            seg_table.add_column(col)
        for s in summary.segments:
            seg_table.add_row(s.camera, s.query_id, str(s.track_id), f"{s.start_s:.2f}s", f"{s.end_s:.2f}s", f"{s.best_score:.2f}")
        Console().print(seg_table)
        console.print(f"events: {where}   ({result['elapsed_s']} s)")
        if redis_ok:
            url_flag = "" if redis_url == "redis://127.0.0.1:6379/0" else f" --url {mask_url(redis_url)}"
            console.print(f"print them with: streamvg tail --pipeline demo --from-start --timeout 2{url_flag}")
        console.print(f"what ran: {out / 'pipeline.yaml'} (the same as pipelines/demo.yaml for the default --out); "
                      f"search it: streamvg search {out / 'videos'} -q \"{queries[0].text}\" --engine replay "
                      f"--replay {out / 'answers.jsonl'}")
    return result
