"""Subscriber: a consumer killed holding unacked events; duplicates; the `tail` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from streamvg.cli import main
from streamvg.consumer import Subscriber
from streamvg.events import Event
from streamvg.sinks import RedisSink, stream_key
from streamvg.testing.servers import RedisServer, wait_until
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


# --- poison events, dead letters, a vanished stream ------------------------------------


def test_poison_event_goes_to_dead_letters_and_the_group_moves_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pipe = f"c-{uuid.uuid4().hex[:10]}"
    _publish(pipe, tmp_path, [_event(i, pipe) for i in range(6)])
    handled: list[int] = []
    attempts = 0
    for _restart in range(6):  # a consumer process that crashes on the poison and restarts
        try:
            with Subscriber(SHARED, pipe, "g", "worker", start="0", block_s=0.1, timeout_s=0.5,
                            max_deliveries=3) as sub:
                for ev in sub:
                    if ev.frame_index == 2:
                        attempts += 1
                        raise ValueError(f"cannot handle frame {ev.frame_index}")
                    handled.append(int(ev.frame_index or 0))
        except ValueError:
            continue
        break
    assert attempts == 3, "delivered max_deliveries times, then no more"
    assert sorted(set(handled)) == [0, 1, 3, 4, 5], "the group made progress past the poison"
    assert sub.dead == 1
    r = redis.Redis.from_url(SHARED)
    assert r.xpending(stream_key(pipe), "g")["pending"] == 0
    dead = r.xrange(f"streamvg:{pipe}:dead")
    assert len(dead) == 1
    fields = dead[0][1]
    assert b"ValueError: cannot handle frame 2" in fields[b"error"] and fields[b"deliveries"] == b"3"
    assert Event.from_json(fields[b"data"]).frame_index == 2
    # `streamvg tail --dead` shows it, in words and as JSON.
    assert main(["tail", "--url", SHARED, "-p", pipe, "--dead", "--timeout", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert "ValueError: cannot handle frame 2" in line and "3 deliveries" in line
    assert main(["tail", "--url", SHARED, "-p", pipe, "--dead", "--json", "--timeout", "1"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["event"]["frame_index"] == 2 and row["group"] == "g"
    r.delete(stream_key(pipe), f"streamvg:{pipe}:dead")


def test_nack_redelivers_then_buries(tmp_path: Path) -> None:
    pipe = f"c-{uuid.uuid4().hex[:10]}"
    _publish(pipe, tmp_path, [_event(i, pipe) for i in range(3)])
    seen: list[int] = []
    with Subscriber(SHARED, pipe, "g", "w", start="0", block_s=0.1, timeout_s=1, auto_ack=False,
                    max_deliveries=2) as sub:
        for ev in sub:
            seen.append(int(ev.frame_index or 0))
            if ev.frame_index == 1:
                sub.nack(ev, "downstream said no")
            else:
                sub.ack(ev)
    assert seen.count(1) == 2 and sorted(set(seen)) == [0, 1, 2]
    assert sub.dead == 1
    r = redis.Redis.from_url(SHARED)
    assert r.xrange(f"streamvg:{pipe}:dead")[0][1][b"error"] == b"downstream said no"
    r.delete(stream_key(pipe), f"streamvg:{pipe}:dead")


def test_stream_deleted_during_a_blocking_read(tmp_path: Path) -> None:
    pipe = "deleted"
    with RedisServer() as srv:  # private: client_list must show only this subscriber
        r = redis.Redis.from_url(srv.url)
        with RedisSink(srv.url, pipe, spool_dir=tmp_path / "a") as sink:
            sink.publish(_event(0, pipe))
        got: list[int] = []
        with Subscriber(srv.url, pipe, "g", "w", start="0", block_s=5, timeout_s=20, count=3) as sub:
            it = iter(sub)
            got.append(int(next(it).frame_index or 0))
            done = threading.Event()

            def rest() -> None:
                for ev in it:
                    got.append(int(ev.frame_index or 0))
                done.set()

            th = threading.Thread(target=rest, daemon=True)
            th.start()
            # Wait until the subscriber is blocked in XREADGROUP, then delete the stream.
            wait_until(lambda: any(c.get("cmd") == "xreadgroup" for c in r.client_list()), timeout=10,
                       what="a blocked XREADGROUP")
            r.delete(stream_key(pipe))
            with RedisSink(srv.url, pipe, spool_dir=tmp_path / "b") as sink:
                sink.publish(_event(1, pipe))
                sink.publish(_event(2, pipe))
            assert done.wait(20), "the subscriber went on after the stream was deleted"
        assert got == [0, 1, 2]
