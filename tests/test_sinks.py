"""RedisSink and JsonlSink against real Redis servers: round trip, outage, restart, AUTH."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from streamvg.consumer import Subscriber
from streamvg.errors import ConfigError, RedisAuthError
from streamvg.events import Event
from streamvg.sinks import JsonlSink, RedisSink, stream_key
from streamvg.testing.servers import RedisServer, wait_until
from streamvg.types import Detections

SHARED = "redis://127.0.0.1:6379/0"
REPO = Path(__file__).resolve().parents[1]


def _pipe() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _event(i: int, pipeline: str = "p") -> Event:
    det = Detections(xyxy=np.array([[i, 2 * i, i + 10, 2 * i + 20]], dtype=np.float32), score=np.array([0.5]))
    return Event.grounding(
        pipeline=pipeline, camera="cam", query_id="q", query="the red circle", t=i / 25,
        frame_index=i, frame_size=(640, 360), detections=det, model="replay",
    )


def _take(sub: Subscriber, n: int, got: list[Event]) -> None:
    for ev in sub:
        got.append(ev)
        if len(got) >= n:
            break


@pytest.fixture
def shared_redis() -> redis.Redis:
    r = redis.Redis.from_url(SHARED)
    r.ping()
    return r


def test_round_trip_equal_after_validation(tmp_path: Path, shared_redis: redis.Redis) -> None:
    pipe = _pipe()
    sent = [_event(i, pipe) for i in range(40)]
    sent.append(Event.track("started", pipeline=pipe, camera="cam", query_id="q", query="x",
                            track_id=1, t=2.0, xyxy=[1, 2, 3, 4], score=0.7))
    sent.append(Event.source_status(pipeline=pipe, camera="cam", state="up"))
    sub = Subscriber(SHARED, pipe, "g", "c1", start="0", timeout_s=10)
    with RedisSink(SHARED, pipe, spool_dir=tmp_path, batch_size=16) as sink:
        for e in sent:
            sink.publish(e)
        sink.flush()
        assert sink.stats.published == len(sent) and sink.stats.spooled == 0
    got: list[Event] = []
    with sub:
        _take(sub, len(sent), got)
    assert got == sent
    assert shared_redis.xlen(stream_key(pipe)) == len(sent)
    assert shared_redis.xpending(stream_key(pipe), "g")["pending"] == 0
    shared_redis.delete(stream_key(pipe))


def test_interval_flush_and_live_channel(tmp_path: Path) -> None:
    pipe = _pipe()
    sub = Subscriber(SHARED, pipe, "g")
    got: list[Event] = []
    ready = threading.Event()

    def listen() -> None:
        it = sub.live(timeout_s=10, count=3)
        ready.set()
        got.extend(it)

    th = threading.Thread(target=listen)
    th.start()
    ready.wait(5)
    r = redis.Redis.from_url(SHARED)
    wait_until(lambda: r.pubsub_numsub(f"streamvg:{pipe}:live")[0][1] > 0, timeout=10, what="live subscriber")
    with RedisSink(SHARED, pipe, spool_dir=tmp_path, batch_size=1000, flush_interval_s=0.02) as sink:
        for i in range(3):
            sink.publish(_event(i, pipe))
        # No flush(): the background interval flush sends the small batch.
        wait_until(lambda: r.xlen(stream_key(pipe)) == 3, timeout=10, what="interval flush")
    th.join(15)
    assert [e.frame_index for e in got] == [0, 1, 2]
    r.delete(stream_key(pipe))
    sub.close()


def test_jsonl_sink_writes_the_same_events(tmp_path: Path) -> None:
    path = tmp_path / "out" / "events.jsonl"
    sent = [_event(i) for i in range(5)]
    with JsonlSink(path) as sink:
        for e in sent:
            sink.publish(e)
    lines = path.read_bytes().splitlines()
    assert [Event.from_json(x) for x in lines] == sent
    assert lines[0] == sent[0].to_json()


def test_outage_every_event_once_in_order(tmp_path: Path) -> None:
    """Kill Redis mid-run, keep publishing, restart it: nothing lost, order kept."""
    pipe = "outage"
    with RedisServer() as srv:
        sink = RedisSink(srv.url, pipe, spool_dir=tmp_path, batch_size=16, flush_interval_s=0.02,
                         retry_max_s=0.2, socket_timeout_s=1.0, connect_timeout_s=0.5)
        sub = Subscriber(srv.url, pipe, "g", "c1", start="0", block_s=0.2, timeout_s=20)
        got: list[Event] = []
        for i in range(100):
            sink.publish(_event(i, pipe))
        sink.flush()
        _take(sub, 100, got)  # delivered before the crash (Redis here keeps no data on disk)
        srv.kill()
        for i in range(100, 200):
            sink.publish(_event(i, pipe))
        sink.flush()
        assert not sink.connected and sink.stats.spooled > 0
        srv.start()
        for i in range(200, 300):
            sink.publish(_event(i, pipe))
        sink.flush()
        wait_until(lambda: sink.pending == 0 and sink.connected, timeout=20, what="spool replay")
        _take(sub, 300, got)
        sub.close(ack_last=True)
        stats = sink.stats
        sink.close()
    ids = [e.frame_index for e in got]
    assert ids == list(range(300)), "every event once, in publish order"
    assert stats.replayed >= 100 and stats.dropped == 0
    assert sub.duplicates >= 0


_PUBLISHER = r"""
import sys
import numpy as np
from streamvg.events import Event
from streamvg.sinks import RedisSink
from streamvg.types import Detections
url, spool, start, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with RedisSink(url, "restart", spool_dir=spool, batch_size=32, retry_max_s=0.2,
               connect_timeout_s=0.5, socket_timeout_s=1.0) as sink:
    for i in range(start, stop):
        det = Detections(xyxy=np.array([[i, 0, i + 1, 1]], dtype=np.float32))
        sink.publish(Event.grounding(pipeline="restart", camera="cam", query_id="q", query="x",
                     t=i / 25, frame_index=i, frame_size=(64, 64), detections=det, model="m"))
print(sink.stats.published, sink.stats.spooled, sink.stats.replayed)
"""


def _run_publisher(url: str, spool: Path, start: int, stop: int) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _PUBLISHER, url, str(spool), str(start), str(stop)],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert out.returncode == 0, out.stderr
    return [int(x) for x in out.stdout.split()]


def test_process_restart_replays_the_spool(tmp_path: Path) -> None:
    """A StreamVG process spools while Redis is down and exits; the next run replays first."""
    srv = RedisServer()  # not started yet: Redis is down
    try:
        published, spooled, _ = _run_publisher(srv.url, tmp_path, 0, 150)
        assert (published, spooled) == (0, 150)
        assert list((tmp_path / "restart").glob("seg-*.log"))
        srv.start()
        published, spooled, replayed = _run_publisher(srv.url, tmp_path, 150, 200)
        assert replayed >= 150 and published == 200
        with Subscriber(srv.url, "restart", "g", "c", start="0", timeout_s=10) as sub:
            got: list[Event] = []
            _take(sub, 200, got)
        assert [e.frame_index for e in got] == list(range(200))
    finally:
        srv.kill()


def test_auth_right_wrong_and_missing_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pw, wrong = "Sup3r-s3cret-pw", "Wr0ng-guess-pw"
    with RedisServer(password=pw) as srv:
        with RedisSink(srv.url, "auth", spool_dir=tmp_path) as sink:
            sink.publish(_event(1, "auth"))
            sink.flush()
            assert sink.stats.published == 1
        with Subscriber(srv.url, "auth", "g", start="0", timeout_s=5) as sub:
            assert [e.frame_index for e in sub][:1] == [1]
        bad = srv.url.replace(pw, wrong)
        for make in (
            lambda: RedisSink(bad, "auth", spool_dir=tmp_path / "b"),
            lambda: Subscriber(bad, "auth", "g"),
            lambda: RedisSink(srv.url.replace(f":{pw}@", ""), "auth", spool_dir=tmp_path / "c"),
        ):
            with pytest.raises(RedisAuthError) as ei:
                make()
            msg = str(ei.value)
            assert "refused the credentials" in msg and "\n" not in msg
            assert pw not in msg and wrong not in msg
        # The command line: one sentence on stderr, exit 2, no traceback, no password.
        cli = subprocess.run(
            [sys.executable, "-m", "streamvg", "tail", "--url", bad, "--group", "g", "--timeout", "1"],
            capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
        )
        assert cli.returncode == 2
        assert cli.stderr.startswith("error: Redis at redis://:***@127.0.0.1:")
        assert "Traceback" not in cli.stderr and wrong not in cli.stderr and pw not in cli.stderr
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert pw not in text and wrong not in text


def test_bad_url_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a redis://"):
        RedisSink("http://u:pw@localhost:6379", "x", spool_dir=tmp_path)
