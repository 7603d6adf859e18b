"""End to end: `streamvg monitor` as a real process on three live cameras served by ffmpeg,
replay engine fed from ground truth, real Redis; one camera killed and restarted mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamvg.consumer import Subscriber
from streamvg.demo import ground_truth_tracks, tracked_boxes
from streamvg.events import Event
from streamvg.testing.live import LiveStreamServer
from streamvg.testing.metrics import idf1
from streamvg.testing.servers import RedisServer, wait_until
from streamvg.testing.synthetic import replay_records, write_scene


@pytest.fixture(scope="module")
def live_scene(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Longer than the run, so every camera plays its file once (replay answers by media time).
    return write_scene(
        tmp_path_factory.mktemp("monitor") / "videos", cameras=3, width=320, height=192, fps=25.0,
        duration_s=30.0, gop=10, bframes=0, seed=11,
    )


def _read_all(url: str, pipeline: str, group: str, *, until: int | None = None, timeout_s: float = 5.0) -> list[Event]:
    with Subscriber(url, pipeline, group, "reader", start="0", timeout_s=timeout_s, count=until) as sub:
        return list(sub)


def test_monitor_live_cameras_end_to_end(live_scene: Any, tmp_path: Path) -> None:
    gt = live_scene.ground_truth
    labels = sorted({o["label"] for c in gt["cameras"].values() for f in c["frames"] for o in f["objects"]})
    label = labels[0]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(gt, query="q", labels=[label])))
    name = f"live-{uuid.uuid4().hex[:8]}"
    servers = {cam: LiveStreamServer(path, loop=False, protocol="tcp" if cam == "cam1" else "http")
               for cam, path in sorted(live_scene.cameras.items())}
    with RedisServer() as redis_srv:
        cfg = {
            "name": name,
            "sources": [{"name": cam, "uri": srv.url, "options": {"stall_timeout_s": 3.0}} for cam, srv in servers.items()],
            "sampling": {"fps": 5.0, "window_size": 4, "stride": 2},
            "queries": [{"id": "q", "text": f"the {label}"}],
            "engine": {"kind": "replay", "replay_path": str(answers)},
            "sinks": {"redis": {"url": redis_srv.url, "spool_dir": str(tmp_path / "spool")}},
        }
        path = tmp_path / "pipeline.yaml"
        path.write_text(yaml.safe_dump(cfg))
        for srv in servers.values():
            srv.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamvg", "monitor", str(path), "--json", "--no-view"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            import redis

            client = redis.Redis.from_url(redis_srv.url)
            stream = f"streamvg:{name}:events"

            def events() -> list[Event]:
                return [Event.from_json(f[b"data"]) for _i, f in client.xrange(stream)]

            def groundings(cam: str) -> list[Event]:
                return [e for e in events() if e.kind == "grounding" and e.camera == cam]

            wait_until(lambda: all(len(groundings(c)) >= 10 for c in servers), timeout=40, what="groundings on every camera")
            servers["cam2"].kill()
            wait_until(lambda: any(e.kind == "source_status" and e.camera == "cam2" and e.state in ("down", "stalled") for e in events()),
                       timeout=20, what="cam2 reported down")
            others_at_kill = {c: len(groundings(c)) for c in ("cam0", "cam1")}
            cam2_at_kill = len(groundings("cam2"))
            # the others keep flowing while cam2 is dead
            wait_until(lambda: all(len(groundings(c)) >= others_at_kill[c] + 5 for c in others_at_kill), timeout=20,
                       what="other cameras flowing while cam2 is down")
            servers["cam2"].start()
            wait_until(lambda: len(groundings("cam2")) >= cam2_at_kill + 5, timeout=30, what="cam2 resumed")
            t_stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
            shutdown_s = time.monotonic() - t_stop
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            for srv in servers.values():
                srv.kill()
        assert proc.returncode == 0, err
        assert shutdown_s <= 8.0, f"graceful shutdown took {shutdown_s:.1f}s"  # ≤ 5 s, plus interpreter exit
        summary = json.loads(out.strip().splitlines()[-1])
        assert "hunter" not in err

        # Everything the process published is in the stream, once, each with its own id.
        raw = [Event.from_json(f[b"data"]) for _i, f in client.xrange(stream)]
        assert len(raw) == summary["events_published"]
        dups = [e for e in raw if sum(1 for x in raw if x.event_id == e.event_id) > 1]
        assert not dups, [(e.camera, e.t, e.frame_index, e.kind) for e in dups]
        all_events = _read_all(redis_srv.url, name, "check", until=summary["events_published"])
        assert len(all_events) == len(raw)

        states = [e.state for e in all_events if e.kind == "source_status" and e.camera == "cam2"]
        assert "up" in states and states.index("up") < max(i for i, s in enumerate(states) if s in ("down", "stalled"))
        assert states[-1] in ("up", "down", "ended", "stalled") and states.count("up") >= 2  # down → up again
        assert summary["cameras"]["cam2"]["reconnects"] >= 1

        for cam in ("cam0", "cam1"):
            g_times = {round(e.t, 4) for e in all_events if e.kind == "grounding" and e.camera == cam and e.t is not None}
            truth = ground_truth_tracks(gt, cam, [label], g_times)
            score = idf1(truth, tracked_boxes(all_events, cam, "q"))
            assert score >= 0.9, f"{cam}: IDF1 {score:.3f}"
