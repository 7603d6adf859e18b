"""Helpers for the scale-out tests: a generated multi-camera scene with replay answers, the
pipeline file for it, and real `streamvg monitor --role …` processes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from streamvg.events import Event
from streamvg.testing.synthetic import replay_records, write_scene


@dataclass
class Scene:
    cameras: dict[str, Path]
    ground_truth: dict[str, Any]
    label: str
    answers: Path


def make_scene(tmp: Path, *, cameras: int = 3, duration_s: float = 8.0, seed: int = 21) -> Scene:
    scene = write_scene(tmp / "videos", cameras=cameras, width=320, height=192, duration_s=duration_s, seed=seed)
    gt = scene.ground_truth
    label = sorted({o["label"] for c in gt["cameras"].values() for f in c["frames"] for o in f["objects"]})[0]
    answers = tmp / "answers.jsonl"
    write_answers(answers, replay_records(gt, query="q", labels=[label]))
    return Scene(dict(scene.cameras), gt, label, answers)


def write_answers(path: Path, records: Sequence[dict[str, Any]], *, jitter_px: float = 0.0, seed: int = 0) -> Path:
    """Replay records, each box moved by up to `jitter_px` (a different "model" per seed)."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for r in records:
            r = json.loads(json.dumps(r))
            for b in r.get("boxes", []):
                dx, dy = rng.uniform(-jitter_px, jitter_px), rng.uniform(-jitter_px, jitter_px)
                x1, y1, x2, y2 = b["xyxy"]
                b["xyxy"] = [x1 + dx, y1 + dy, x2 + dx, y2 + dy]
            fh.write(json.dumps(r) + "\n")
    return path


def pipeline_file(tmp: Path, scene: Scene, *, name: str, redis_url: str | None, latency_s: float = 0.0,
                  scaleout: dict[str, Any] | None = None, jsonl: Path | None = None) -> Path:
    cfg: dict[str, Any] = {
        "name": name,
        "sources": [{"name": c, "uri": str(p)} for c, p in sorted(scene.cameras.items())],
        "sampling": {"fps": 5.0, "window_size": 4, "stride": 2},
        "queries": [{"id": "q", "text": f"the {scene.label}"}],
        "engine": {"kind": "replay", "replay_path": str(scene.answers), "batch_size": 1, "replay_latency_s": latency_s},
        "sinks": {},
    }
    if redis_url:
        cfg["sinks"]["redis"] = {"url": redis_url, "spool_dir": str(tmp / "spool")}
    if jsonl:
        cfg["sinks"]["jsonl"] = {"path": str(jsonl)}
    if scaleout:
        cfg["scaleout"] = scaleout
    path = tmp / f"{name}-{'fleet' if redis_url else 'one'}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def spawn(cfg: Path, role: str, *, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[str]:
    """A real `streamvg monitor CFG --role ROLE --json` process (stderr to `log` when given)."""
    err: Any = log.open("w") if log else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "streamvg", "monitor", str(cfg), "--role", role, "--json"],
        stdout=subprocess.PIPE, stderr=err, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def stream_events(client: redis.Redis, pipeline: str) -> list[Event]:
    return [Event.from_json(f[b"data"]) for _i, f in client.xrange(f"streamvg:{pipeline}:events")]


def work_left(client: redis.Redis, pipeline: str, cameras: Sequence[str]) -> int:
    return sum(int(client.xlen(f"streamvg:{pipeline}:work:{c}")) for c in cameras)


def summary(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])
