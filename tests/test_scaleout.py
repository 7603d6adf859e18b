"""Scale-out over Redis: one ingest process, two ground worker processes (replay engine),
one worker killed mid-run; every window grounded, track ids consistent across hand-over."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml

from streamvg.demo import ground_truth_tracks, tracked_boxes
from streamvg.events import Event
from streamvg.scaleout import decode_window, encode_window
from streamvg.testing.metrics import idf1
from streamvg.testing.servers import RedisServer, wait_until
from streamvg.testing.synthetic import replay_records, write_scene
from streamvg.types import Frame, Window


def test_window_codec_round_trip() -> None:
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.stack([xx * 3, yy * 4, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    img[10:30, 20:40] = (200, 40, 40)  # a coloured box, as in the synthetic scenes
    w = Window((Frame("a", 3, 0.4, img, 1700000000.5), Frame("b", 7, 0.41, img)), missing=("c",))
    back = decode_window(encode_window(w))
    assert back.id == w.id and back.missing == ("c",)
    assert [(f.camera, f.index, f.pts, f.wall_time) for f in back] == [(f.camera, f.index, f.pts, f.wall_time) for f in w]
    assert np.abs(back[0].image.astype(int) - img.astype(int)).mean() < 3  # JPEG, nearly lossless here


def _spawn(cfg: Path, role: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamvg", "monitor", str(cfg), "--role", role, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_ingest_and_two_ground_workers_survive_a_killed_worker(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "videos", cameras=3, width=320, height=192, duration_s=6.0, seed=21)
    gt = scene.ground_truth
    label = sorted({o["label"] for c in gt["cameras"].values() for f in c["frames"] for o in f["objects"]})[0]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(gt, query="q", labels=[label])))
    procs: list[subprocess.Popen[str]] = []
    with RedisServer() as srv:
        cfg = {
            "name": "fleet",
            "sources": [{"name": c, "uri": str(p)} for c, p in sorted(scene.cameras.items())],
            "sampling": {"fps": 5.0, "window_size": 4, "stride": 2},
            "queries": [{"id": "q", "text": f"the {label}"}],
            # 80 ms per window stands in for a model, so the kill lands mid-run
            "engine": {"kind": "replay", "replay_path": str(answers), "batch_size": 1, "replay_latency_s": 0.08},
            "sinks": {"redis": {"url": srv.url, "spool_dir": str(tmp_path / "spool")}},
        }
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(cfg))
        client = redis.Redis.from_url(srv.url)
        try:
            workers = [_spawn(path, "ground"), _spawn(path, "ground")]
            procs += workers
            ingest = _spawn(path, "ingest")
            procs.append(ingest)
            out, err = ingest.communicate(timeout=120)
            assert ingest.returncode == 0, err
            published = json.loads(out.strip().splitlines()[-1])["windows_published"]
            assert published > 30

            def grounded() -> int:
                return int(client.get("streamvg:fleet:windows_grounded") or 0)

            wait_until(lambda: grounded() >= 8, timeout=60, what="some windows grounded")
            owners = {client.get(f"streamvg:fleet:lease:{c}") for c in scene.cameras}
            victim = next(w for w in workers if any(o and o.decode().split("-")[-2] == str(w.pid) for o in owners))
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            survivor = next(w for w in workers if w is not victim)

            def drained() -> bool:
                backlog = sum(int(client.xlen(f"streamvg:fleet:work:{c}")) for c in scene.cameras)
                return backlog == 0 and grounded() >= published

            wait_until(drained, timeout=90, what="all windows grounded after the hand-over")
            survivor.send_signal(signal.SIGTERM)
            _s_out, s_err = survivor.communicate(timeout=30)
            assert survivor.returncode == 0, s_err
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()

        raw = [Event.from_json(f[b"data"]) for _i, f in client.xrange("streamvg:fleet:events")]
        events = list({e.event_id: e for e in raw}.values())  # what a consumer sees after dedupe
        for cam in scene.cameras:
            frames = [(e.frame_index, e.t) for e in events if e.kind == "grounding" and e.camera == cam]
            # each sampled frame of the camera is grounded exactly once, with no hole
            assert len(frames) == len(set(frames))
            assert sorted(f[0] for f in frames) == sorted({f[0] for f in frames})
            starts = sorted(t for _i, t in frames)
            assert starts[0] == 0.0 and all(b - a < 0.21 for a, b in itertools.pairwise(starts))
            times = {round(t, 4) for _i, t in frames}
            score = idf1(ground_truth_tracks(gt, cam, [label], times), tracked_boxes(events, cam, "q"))
            assert score >= 0.9, f"{cam}: IDF1 {score:.3f} across the hand-over"


def test_role_without_redis_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"name": "a", "uri": "a.mp4"}], "engine": {"kind": "replay", "replay_path": "x"}}))
    r = subprocess.run([sys.executable, "-m", "streamvg", "monitor", str(path), "--role", "ground"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs sinks.redis.url" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(autouse=True)
def _no_leftover_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("STREAMVG_SINKS__REDIS__URL", raising=False)
