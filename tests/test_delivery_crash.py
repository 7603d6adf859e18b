"""Crash points: a publisher process SIGKILLed at many points, a real redis-server killed
and restarted between them. Every event a publisher flushed (in Redis or in the spool)
reaches Redis, first copies in publish order; with room in the spool none is dropped."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import redis

from streamvg.events import Event
from streamvg.sinks import RedisSink, stream_key
from streamvg.testing.servers import RedisServer, wait_until
from streamvg.types import Detections

REPO = Path(__file__).resolve().parents[1]
PIPE = "crash"

def _publisher(out: IO[str], url: str, spool: Path, start: int, count: int, cap: int) -> None:
    """Publish events start..start+count-1; print "F i" once everything up to i is durable
    (flush() returned: confirmed by Redis, or written to the spool)."""
    sink = RedisSink(url, PIPE, spool_dir=spool, spool_max_bytes=cap, batch_size=8, flush_interval_s=0.01,
                     retry_max_s=0.05, connect_timeout_s=0.3, socket_timeout_s=0.5)
    print("S", file=out, flush=True)
    for i in range(start, start + count):
        det = Detections(xyxy=np.array([[i, 0, i + 1, 1]], dtype=np.float32))
        sink.publish(Event.grounding(pipeline=PIPE, camera="cam", query_id="q", query="x", t=i / 25,
                                     frame_index=i, frame_size=(64, 64), detections=det, model="m"))
        if i % 4 == 3:
            sink.flush()
            print("F", i, file=out, flush=True)
    sink.close(drain_timeout_s=10)
    print("D", sink.stats.dropped, file=out, flush=True)


class _Run:
    """One publisher process (forked from this one: no interpreter start-up per crash
    point); remembers the last index it reported durable."""

    def __init__(self, url: str, spool: Path, start: int, count: int, cap: int) -> None:
        self.flushed = start - 1
        self.done = False
        self.started = threading.Event()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: publish, then leave without running the parent's cleanup
            code = 1
            try:
                os.close(rfd)
                with os.fdopen(wfd, "w") as out:
                    _publisher(out, url, spool, start, count, cap)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(wfd)
        self.pid = pid
        self.returncode: int | None = None
        self._out = os.fdopen(rfd, "r")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._out:
            if line.startswith("S"):
                self.started.set()
            elif line.startswith("F ") and line.endswith("\n"):  # a kill can cut a line short
                self.flushed = int(line.split()[1])
            elif line.startswith("D "):
                self.done = True

    def _exited(self) -> bool:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.returncode = os.waitstatus_to_exitcode(status)
        self._reader.join(10)
        self._out.close()
        return True

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        wait_until(self._exited, timeout=30, what="killed publisher gone")

    def finish(self, timeout: float = 60) -> None:
        """Wait for the run to end by itself."""
        wait_until(self._exited, timeout=timeout, interval=0.05, what="publisher exit")


def _delivered(url: str) -> list[int]:
    r = redis.Redis.from_url(url)
    try:
        return [int(json.loads(f[b"data"])["frame_index"]) for _id, f in r.xrange(stream_key(PIPE))]
    finally:
        r.close()


def _spool_lifetime_dropped(spool: Path) -> int:
    from streamvg.sinks.spool import Spool

    sp = Spool(spool / PIPE)
    try:
        return sum(sp.lifetime_dropped.values())
    finally:
        sp.close()


@pytest.mark.slow
def test_publisher_and_redis_killed_at_many_points(tmp_path: Path) -> None:
    rng = random.Random(14)
    spool = tmp_path / "spool"
    cap = 64 * 1024 * 1024  # room for everything: none may be dropped
    published = -1  # highest index some run reported durable; all below it were too
    points: dict[str, int] = {}
    with RedisServer(persist=True) as srv:
        for it in range(24):
            phase = ["redis up", "redis down", "redis dies mid-run", "redis returns mid-run"][it % 4]
            if phase in ("redis down", "redis dies mid-run") and srv.proc is None:
                srv.start()
            if phase in ("redis down", "redis returns mid-run"):
                srv.kill()
            run = _Run(srv.url, spool, published + 1, 400, cap)
            assert run.started.wait(60), "publisher did not start"
            # Kill it at a random point: while writing, while replaying, just after a replay.
            delay = rng.choice([0.0, 0.01, 0.05, 0.1, 0.3, 0.6])
            if phase == "redis dies mid-run":
                time.sleep(rng.uniform(0, 0.2))
                srv.kill()
            if phase == "redis returns mid-run":
                time.sleep(rng.uniform(0, 0.2))
                srv.start()
            time.sleep(delay)
            run.kill()
            published = max(published, run.flushed)
            points[phase] = points.get(phase, 0) + 1
        # Redis up; a last run with nothing new replays what is left and stops cleanly.
        srv.start()
        for _ in range(5):
            last = _Run(srv.url, spool, published + 1, 0, cap)
            last.finish()
            assert last.returncode == 0 and last.done
            if not list((spool / PIPE).glob("seg-*.log")):
                break
        assert not list((spool / PIPE).glob("seg-*.log")), "the spool drained"
        got = _delivered(srv.url)
    assert published > 50, "the runs got somewhere"
    missing = sorted(set(range(published + 1)) - set(got))
    assert not missing, f"{len(missing)} durable events never reached Redis, e.g. {missing[:10]}"
    assert _spool_lifetime_dropped(spool) == 0, "with room in the spool, none is dropped"
    first: list[int] = []
    seen: set[int] = set()
    for i in got:
        if i not in seen:
            seen.add(i)
            first.append(i)
    assert first == sorted(first), "first copies arrive in publish order"
    assert len(points) == 4


def test_small_spool_loses_only_what_it_counts(tmp_path: Path) -> None:
    """Redis down, a spool far too small, the publisher killed mid-stream twice: what never
    reached Redis is at most what the spool counted as dropped."""
    spool = tmp_path / "spool"
    cap = 16 * 1024
    with RedisServer(persist=True) as srv:
        srv.kill()
        published = -1
        for delay in (0.4, 0.8):
            run = _Run(srv.url, spool, published + 1, 600, cap)
            assert run.started.wait(60)
            floor = published + 100
            wait_until(lambda r=run, f=floor: r.flushed > f, timeout=60, what="publisher progress")  # type: ignore[misc]
            time.sleep(delay / 4)
            run.kill()
            published = max(published, run.flushed)
        srv.start()
        last = _Run(srv.url, spool, published + 1, 0, cap)
        last.finish()
        assert last.returncode == 0 and last.done
        got = set(_delivered(srv.url))
    dropped = _spool_lifetime_dropped(spool)
    missing = set(range(published + 1)) - got
    assert dropped > 0 and missing, "the cap was reached"
    assert len(missing) <= dropped, f"{len(missing)} lost but {dropped} counted"
