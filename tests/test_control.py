"""Control-stream limits and compaction, against a live camera and the real Redis: a 5 MB
command, a 1 MB query text and a flood past the query cap are rejected (one short log line
each) while grounding goes on; the stream keeps only the commands that make the query set."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from streamvg.config import (
    ControlConfig,
    EngineConfig,
    PipelineConfig,
    QueryConfig,
    RedisSinkConfig,
    SamplingConfig,
    SinksConfig,
    SourceConfig,
)
from streamvg.errors import ConfigError
from streamvg.events import Event
from streamvg.pipeline import Pipeline, send_query_command
from streamvg.pipeline.control import ControlFollower, control_key
from streamvg.testing.live import LiveStreamServer
from streamvg.testing.servers import wait_until
from streamvg.types import Query

URL = "redis://127.0.0.1:6379/0"


class _Collector:
    def __init__(self) -> None:
        self.events: list[tuple[float, Event]] = []

    def publish(self, event: Event) -> None:
        self.events.append((time.monotonic(), event))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _raw(r: redis.Redis, name: str, cmd: Any) -> None:
    r.xadd(control_key(name), {"data": cmd if isinstance(cmd, (bytes, str)) else json.dumps(cmd)})


def test_hostile_commands_rejected_without_stalling(live_clip: Any, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="streamvg.pipeline")
    name = f"ctl-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(URL)
    answers = tmp_path / "empty.jsonl"
    answers.write_text(json.dumps({"camera": "nobody", "pts": 0.0, "query": None, "boxes": []}) + "\n")
    with LiveStreamServer(live_clip.cameras["cam0"], loop=True) as server:
        cfg = PipelineConfig(
            name=name,
            sources=[SourceConfig(name="cam", uri=server.url)],
            sampling=SamplingConfig(fps=5.0, window_size=2, stride=2),
            queries=[QueryConfig(id="a", text="thing a")],
            engine=EngineConfig(kind="replay", replay_path=str(answers)),
            sinks=SinksConfig(redis=RedisSinkConfig(url=URL, spool_dir=str(tmp_path / "spool"))),
            control=ControlConfig(max_queries=5),
        )
        sink = _Collector()
        pipe = Pipeline(cfg, sinks=[sink]).start()
        try:
            def count(qid: str) -> int:
                return sum(1 for _t, e in list(sink.events) if e.kind == "grounding" and e.query_id == qid)

            wait_until(lambda: count("a") >= 2, timeout=30, what="groundings for query a")
            t0 = time.monotonic()
            _raw(r, name, b'{"op": "add", "query": {"id": "huge", "text": "' + b"x" * (5 << 20) + b'"}}')
            _raw(r, name, {"op": "add", "query": {"id": "long", "text": "rtsp://u:pw@h/ " * 70_000}})  # 1 MB
            _raw(r, name, {"op": "add", "query": {"id": "wordy", "text": "a red car " * 500}})  # 5,000 chars
            send_query_command(URL, name, "add", query=Query("b", "thing b"))
            wait_until(lambda: count("b") >= 2, timeout=20, what="the good command after the hostile ones")
            took = time.monotonic() - t0
            # Grounding never paused for long around the hostile commands.
            times = [t for t, e in list(sink.events) if e.kind == "grounding" and e.query_id == "a" and t >= t0 - 1]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert took < 15 and max(gaps) < 5, (took, max(gaps))
            for i in range(100):  # a flood past max_queries
                send_query_command(URL, name, "add", query=Query(f"f{i}", f"flood {i}"))
            wait_until(lambda: r.xlen(control_key(name)) <= 5, timeout=20, what="the stream compacted")
        finally:
            pipe.stop()
    ids = {q.id for q in pipe.queries}
    assert ids == {"a", "b", "f0", "f1", "f2"}
    rejected = [rec.getMessage() for rec in caplog.records if "rejected" in rec.getMessage()]
    assert len(rejected) == 3 + 97, "one line per rejected command"
    assert all(len(m) < 600 for m in rejected), "log lines are truncated"
    assert any("max_command_bytes" in m for m in rejected) and any("max_query_chars" in m for m in rejected)
    assert not any("pw" in m for m in rejected)
    # A restart replays only what makes today's query set: b and f0..f2, no hostile command.
    applied: list[str] = []
    stop = threading.Event()
    follower = ControlFollower(URL, name, add=lambda q: applied.append(q.id), remove=lambda _q: None, stop=stop,
                               limits=cfg.control, query_count=lambda: 1 + len(applied), config_ids=["a"])
    th = threading.Thread(target=follower.run, daemon=True)
    th.start()
    wait_until(lambda: len(applied) >= 4, timeout=10, what="replay of the control stream")
    stop.set()
    th.join(5)
    assert applied == ["b", "f0", "f1", "f2"] and follower.rejected == 0
    r.delete(control_key(name), f"streamvg:{name}:events")


def test_remove_compaction_and_client_side_limit() -> None:
    name = f"ctl-{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(URL)
    for i in range(3):
        send_query_command(URL, name, "add", query=Query("x", f"version {i}"))
    send_query_command(URL, name, "add", query=Query("y", "runtime only"))
    send_query_command(URL, name, "remove", query_id="y")
    send_query_command(URL, name, "remove", query_id="cfg")  # a query of the pipeline file
    send_query_command(URL, name, "remove", query_id="never-existed")
    stop = threading.Event()
    seen: list[str] = []
    follower = ControlFollower(URL, name, add=lambda q: seen.append(f"+{q.id}:{q.text}"),
                               remove=lambda q: seen.append(f"-{q}"), stop=stop, config_ids=["cfg"])
    th = threading.Thread(target=follower.run, daemon=True)
    th.start()
    wait_until(lambda: r.xlen(control_key(name)) == 2, timeout=10, what="compaction")
    stop.set()
    th.join(5)
    kept = [json.loads(f[b"data"]) for _i, f in r.xrange(control_key(name))]
    assert kept == [{"op": "add", "query": {"id": "x", "text": "version 2", "mode": "direct", "min_score": 0.0}},
                    {"op": "remove", "id": "cfg"}]
    with pytest.raises(ConfigError, match="max_query_chars"):
        send_query_command(URL, name, "add", query=Query("z", "z" * 5000))
    r.delete(control_key(name))
