"""Subscriber: a consumer killed holding unacked events; duplicates; the `tail` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from streamvg.cli import main
from streamvg.consumer import Subscriber
from streamvg.events import Event
from streamvg.sinks import RedisSink, stream_key
from streamvg.testing.servers import wait_until
from streamvg.types import Detections

SHARED = "redis://127.0.0.1:6379/0"
REPO = Path(__file__).resolve().parents[1]


def _event(i: int, pipeline: str) -> Event:
    det = Detections(xyxy=np.array([[i, 0, i + 5, 5]], dtype=np.float32), score=np.array([0.75]))
    return Event.grounding(pipeline=pipeline, camera="door", query_id="q", query="the cup", t=i / 10,
                           frame_index=i, frame_size=(640, 480), detections=det, model="replay")


def _publish(pipe: str, tmp: Path, events: list[Event]) -> None:
    with RedisSink(SHARED, pipe, spool_dir=tmp) as sink:
        for e in events:
            sink.publish(e)


_DOOMED = r"""
import sys, time
from streamvg.consumer import Subscriber
sub = Subscriber(sys.argv[1], sys.argv[2], "workers", "doomed", start="0", batch=20, claim_idle_s=3600)
for ev in sub:
    print(ev.frame_index, flush=True)
    time.sleep(3600)  # stuck in its handler, holding the rest of its batch unacked
"""


def test_killed_consumer_messages_are_reclaimed(tmp_path: Path) -> None:
    pipe = f"c-{uuid.uuid4().hex[:10]}"
    _publish(pipe, tmp_path, [_event(i, pipe) for i in range(50)])
    proc = subprocess.Popen(
        [sys.executable, "-c", _DOOMED, SHARED, pipe], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "0"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    r = redis.Redis.from_url(SHARED)
    assert r.xpending(stream_key(pipe), "workers")["pending"] == 20  # held by the dead one
    got: list[int] = []
    with Subscriber(SHARED, pipe, "workers", "survivor", claim_idle_s=0.3, claim_interval_s=0.1,
                    block_s=0.1, timeout_s=10, count=50) as sub:
        for ev in sub:
            got.append(int(ev.frame_index or 0))
        assert sub.claimed >= 20
    assert sorted(got) == list(range(50)), "none lost, none twice"
    wait_until(lambda: r.xpending(stream_key(pipe), "workers")["pending"] == 0, timeout=5, what="all acked")
    r.delete(stream_key(pipe))


def test_duplicates_dropped_and_exception_leaves_event_pending(tmp_path: Path) -> None:
    pipe = f"c-{uuid.uuid4().hex[:10]}"
    evs = [_event(i, pipe) for i in range(3)]
    _publish(pipe, tmp_path, [evs[0], evs[1], evs[0], evs[2], evs[1]])  # a replay's duplicates
    with Subscriber(SHARED, pipe, "clean", start="0", block_s=0.1, timeout_s=1) as clean:
        assert [e.frame_index for e in clean] == [0, 1, 2]
        assert clean.duplicates == 2
    sub = Subscriber(SHARED, pipe, "g", "c", start="0", block_s=0.1, timeout_s=2)
    with pytest.raises(RuntimeError):
        for ev in sub:
            if ev.frame_index == 1:
                raise RuntimeError("handler failed")
    sub.close()
    # A new subscriber with the same name gets the failed event again first (its pending
    # entries: the failed one and the rest of the batch); dedupe memory is per subscriber.
    with Subscriber(SHARED, pipe, "g", "c", start="0", block_s=0.1, timeout_s=1) as sub2:
        got = [e.frame_index for e in sub2]
    assert got == [1, 0, 2]
    assert sub2.duplicates == 1
    redis.Redis.from_url(SHARED).delete(stream_key(pipe))


def test_start_dollar_skips_history(tmp_path: Path) -> None:
    pipe = f"c-{uuid.uuid4().hex[:10]}"
    _publish(pipe, tmp_path / "a", [_event(0, pipe)])
    sub = Subscriber(SHARED, pipe, "late", start="$", block_s=0.1, timeout_s=2, count=1)
    _publish(pipe, tmp_path / "b", [_event(1, pipe)])
    assert [e.frame_index for e in sub] == [1]
    sub.close()
    redis.Redis.from_url(SHARED).delete(stream_key(pipe))


def test_tail_prints_lines_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe = f"c-{uuid.uuid4().hex[:10]}"
    _publish(pipe, tmp_path, [_event(i, pipe) for i in range(3)])
    assert main(["tail", "--url", SHARED, "-p", pipe, "-g", "people", "--from-start", "-n", "3", "--timeout", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "door" in lines[0] and "'the cup'" in lines[0] and "[0,0,5,5 0.75]" in lines[0]
    assert main(["tail", "--url", SHARED, "-p", pipe, "-g", "scripts", "--from-start", "-n", "2", "--json", "--timeout", "5"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["frame_index"] for r in rows] == [0, 1]
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"].startswith("StreamVG event")
    redis.Redis.from_url(SHARED).delete(stream_key(pipe))
