"""RedisSink and JsonlSink against real Redis servers: round trip, outage, restart, AUTH."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

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


# --- issue 14: write-through JSONL, OOM is not "unreachable", a full disk never stops a run --

_JSONL_WRITER = r"""
import sys, time
import numpy as np
from streamvg.events import Event
from streamvg.sinks import JsonlSink
from streamvg.types import Detections
sink = JsonlSink(sys.argv[1], batch_size=64, flush_interval_s=0.1)
for i in range(1000):
    det = Detections(xyxy=np.array([[i, 0, i + 1, 1]], dtype=np.float32))
    sink.publish(Event.grounding(pipeline="j", camera="c", query_id="q", query="x", t=i / 25,
                                 frame_index=i, frame_size=(64, 64), detections=det, model="m"))
print("published", flush=True)
time.sleep(3600)  # never closes: only SIGKILL ends it
"""


def test_jsonl_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _JSONL_WRITER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "published"
        # The last partial batch goes out on the interval, without close().
        wait_until(lambda: path.exists() and path.read_bytes().count(b"\n") == 1000, timeout=20,
                   what="all lines written through")
    finally:
        proc.kill()
        proc.wait(10)
    lines = path.read_bytes().splitlines()
    assert [Event.from_json(x).frame_index for x in lines] == list(range(1000))


def test_out_of_memory_redis_is_reported_as_such(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with RedisServer() as srv:
        r = redis.Redis.from_url(srv.url)
        r.config_set("maxmemory", "1")  # every write is refused: OOM
        sink = RedisSink(srv.url, "oom", spool_dir=tmp_path, batch_size=8, flush_interval_s=0.01, retry_max_s=0.1)
        for i in range(40):
            sink.publish(_event(i, "oom"))
        sink.flush()
        wait_until(lambda: not sink.connected, timeout=10, what="sink spooling")
        assert any("out of memory" in m.getMessage() for m in caplog.records)
        assert not any("unreachable" in m.getMessage() for m in caplog.records)
        r.config_set("maxmemory", "0")
        wait_until(lambda: sink.connected and sink.pending == 0, timeout=20, what="replay")
        sink.close()
    again = [m.getMessage() for m in caplog.records if "answers again" in m.getMessage()]
    assert len(again) == 1 and "spooled events replayed" in again[0]
    assert sink.stats.dropped == 0 and sink.stats.replayed >= 1


def test_never_answering_redis_is_not_reported_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing spooled (the disk refuses it) and Redis never answers: no 'answers again'."""
    caplog.set_level(logging.WARNING)
    srv = RedisServer()  # never started
    blocker = tmp_path / "file"
    blocker.write_text("x")
    sink = RedisSink(srv.url, "never", spool_dir=blocker, retry_max_s=0.05, connect_timeout_s=0.2)
    for i in range(5):
        sink.publish(_event(i, "never"))
    wait_until(lambda: sink.stats.errors >= 4, timeout=20, what="several retry rounds")  # none may claim it is back
    sink.close(drain_timeout_s=0.2)
    assert not any("answers again" in m.getMessage() for m in caplog.records)
    assert sink.stats.dropped_by_reason == {"disk": 5} and sink.stats.spooled == 0


@pytest.mark.slow
def test_monitor_goes_on_with_a_full_spool_disk(tmp_path: Path) -> None:
    """`streamvg monitor` with Redis down and the spool on a tiny filesystem (a 64 KiB
    tmpfs, or a 64 KiB file-size limit where mounting is not allowed): the run finishes,
    exit 0, every event spooled or counted as dropped (disk), one warning line."""
    spool = tmp_path / "spool"
    spool.mkdir()
    limit = 0
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(spool)], capture_output=True, check=False
    ).returncode == 0
    if not mounted:
        limit = 64 * 1024
    answers = tmp_path / "answers.jsonl"
    answers.write_text("")
    srv = RedisServer()  # never started: Redis is down the whole run
    cfg = {
        "name": "fulldisk", "sources": [{"name": "cup", "uri": str(REPO / "tests" / "media" / "cup.mp4")}],
        "sampling": {"fps": 5.0, "window_size": 4, "stride": 2},
        "queries": [{"id": f"q{i}", "text": f"thing {i}"} for i in range(12)],
        "engine": {"kind": "replay", "replay_path": str(answers)},
        "sinks": {"redis": {"url": srv.url, "spool_dir": str(spool)}},
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))

    def _limit() -> None:  # in the child, before exec
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    try:
        out = subprocess.run(
            [sys.executable, "-m", "streamvg", "monitor", str(path), "--json", "--no-view"],
            capture_output=True, text=True, timeout=120, check=False, preexec_fn=_limit,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        )
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(spool)], check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["events_dropped"] > 0 and set(summary["dropped_by_reason"]) == {"disk"}
    assert summary["events_spooled"] > 0
    assert summary["events_spooled"] + summary["events_dropped"] == summary["events_published"]
    assert len([x for x in out.stderr.splitlines() if "cannot be written" in x]) == 1, out.stderr[-3000:]
