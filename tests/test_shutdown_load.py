"""Shutdown order under load (delivery, issue 14): `streamvg monitor` with hundreds of standing queries gets
SIGTERM while it publishes; it exits 0 within 5 s and every event it counted as published
is in Redis or in the spool, none dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import yaml

from streamvg.sinks.spool import Spool
from streamvg.testing.servers import RedisServer, wait_until

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO / "tests" / "media"


def _monitor(tmp_path: Path, url: str, name: str) -> subprocess.Popen[str]:
    answers = tmp_path / "answers.jsonl"
    answers.write_text("")  # no boxes: one grounding event per frame and query
    cfg = {
        "name": name,
        "sources": [{"name": "cup", "uri": str(MEDIA / "cup.mp4")}, {"name": "car", "uri": str(MEDIA / "carphone.mp4")}],
        "sampling": {"fps": 10.0, "window_size": 4, "stride": 2},
        "queries": [{"id": f"q{i}", "text": f"thing number {i}"} for i in range(300)],
        "engine": {"kind": "replay", "replay_path": str(answers), "batch_size": 16},
        "sinks": {"redis": {"url": url, "spool_dir": str(tmp_path / "spool"), "maxlen": 10_000_000}},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "streamvg", "monitor", str(path), "--json", "--no-view"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )


def _stop(proc: subprocess.Popen[str]) -> tuple[dict[str, object], str, float]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    took = time.monotonic() - t0
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err, took


@pytest.mark.slow
@pytest.mark.parametrize("redis_dies", [False, True], ids=["redis-up", "redis-killed-mid-run"])
def test_sigterm_under_load_exits_0_with_nothing_lost(tmp_path: Path, redis_dies: bool) -> None:
    name = f"stop-{uuid.uuid4().hex[:8]}"
    with RedisServer(persist=True) as srv:
        client = redis.Redis.from_url(srv.url)
        stream = f"streamvg:{name}:events"
        proc = _monitor(tmp_path, srv.url, name)
        try:
            wait_until(lambda: client.xlen(stream) >= 3000, timeout=120, interval=0.1, what="events flowing")
            if redis_dies:
                srv.kill()
                wait_until(lambda: list((tmp_path / "spool" / name).glob("seg-*.log")), timeout=30,
                           what="publishing goes on into the spool")
        except BaseException:
            proc.kill()
            raise
        summary, err, took = _stop(proc)
        if redis_dies:
            srv.start()
            client = redis.Redis.from_url(srv.url)
        in_redis = client.xlen(stream)
    assert "Traceback" not in err and "is closed" not in err, err[-3000:]
    assert float(summary["shutdown_s"]) <= 5.0, summary  # type: ignore[arg-type]
    assert took <= 8.0, f"exit took {took:.1f}s (5 s shutdown + interpreter exit)"
    assert summary["events_dropped"] == 0 and summary["dropped_by_reason"] == {}, summary
    published = int(summary["events_published"])  # type: ignore[call-overload]
    assert published > 3000
    spool = Spool(tmp_path / "spool" / name)
    left = len(spool)
    spool.close()
    if redis_dies:
        assert int(summary["events_spooled"]) > 0  # type: ignore[call-overload]
        assert left > 0
    # Every produced event is in Redis or waits in the spool (a half-sent batch may be in both).
    assert in_redis + left >= published, (in_redis, left, published)
    assert in_redis <= published + left
