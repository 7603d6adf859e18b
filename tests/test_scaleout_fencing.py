"""Fenced camera leases with real Redis and real worker processes.

- A worker frozen (SIGSTOP) past its lease and resumed (SIGCONT) is fenced off: its writes
  are refused, the camera's saved tracker state never goes back in time, and no frame
  gets two histories, with workers whose "models" differ (replay answers jittered per worker).
- A worker whose grounding takes 3× the lease keeps its cameras (the heartbeat renews
  them), and no window is grounded twice.
- The fenced commit itself: a stale token writes nothing.
"""

from __future__ import annotations

import collections
import io
import json
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import redis
from _fleet import (
    make_scene,
    pipeline_file,
    spawn,
    stream_events,
    summary,
    work_left,
    write_answers,
)

from streamvg.scaleout import Commit, Fence
from streamvg.testing.servers import RedisServer, wait_until
from streamvg.testing.synthetic import replay_records


def _state_time(data: bytes | None) -> float | None:
    if not data:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes())
    times = [e["last_fed"] for e in header["entries"] if e["last_fed"] is not None]
    return max(times) if times else None


def _pid(lease: bytes | None) -> int | None:
    return int(lease.decode().split("|")[0].split("-")[-2]) if lease else None


def _assert_one_history(raw: list[Any]) -> None:
    by_id: dict[str, set[bytes]] = collections.defaultdict(set)
    by_frame: dict[tuple[str, int], set[bytes]] = collections.defaultdict(set)
    for e in raw:
        body = json.dumps(e.boxes, sort_keys=True).encode()
        by_id[e.event_id].add(body)
        if e.kind == "grounding":
            by_frame[(e.camera, e.frame_index)].add(body)
    assert all(len(v) == 1 for v in by_id.values()), "an event was published with two different contents"
    assert all(len(v) == 1 for v in by_frame.values()), "a frame was grounded with two different answers"
    assert len(raw) == len(by_id), "an event was published twice"


def test_frozen_worker_is_fenced_off(tmp_path: Path) -> None:
    scene = make_scene(tmp_path, cameras=2, duration_s=5.0, seed=3)
    records = replay_records(scene.ground_truth, query="q", labels=[scene.label])
    answers = [write_answers(tmp_path / f"answers{i}.jsonl", records, jitter_px=4.0, seed=i) for i in range(2)]
    with RedisServer() as srv:
        path = pipeline_file(tmp_path, scene, name="fence", redis_url=srv.url, latency_s=0.15,
                             scaleout={"lease_s": 1.0, "max_backlog": 6})
        client = redis.Redis.from_url(srv.url)
        workers = [spawn(path, "ground", env={"STREAMVG_ENGINE__REPLAY_PATH": str(a)}, log=tmp_path / f"g{i}.log")
                   for i, a in enumerate(answers)]
        ingest = spawn(path, "ingest", log=tmp_path / "ingest.log")
        times: list[float] = []
        done = threading.Event()

        def watch_state() -> None:  # the saved state of cam0, as often as Redis answers
            while not done.is_set():
                t = _state_time(client.get("streamvg:fence:trackstate:cam0"))  # type: ignore[arg-type]
                if t is not None and (not times or t != times[-1]):
                    times.append(t)

        watcher = threading.Thread(target=watch_state, daemon=True)
        watcher.start()
        try:
            wait_until(lambda: _state_time(client.get("streamvg:fence:trackstate:cam0")) is not None,  # type: ignore[arg-type]
                       timeout=60, what="cam0 grounded")
            owner = _pid(client.get("streamvg:fence:lease:cam0"))  # type: ignore[arg-type]
            frozen = next(w for w in workers if w.pid == owner)
            other = next(w for w in workers if w is not frozen)
            frozen.send_signal(signal.SIGSTOP)
            wait_until(lambda: _pid(client.get("streamvg:fence:lease:cam0")) == other.pid,  # type: ignore[arg-type]
                       timeout=30, what="the other worker taking cam0 over")
            before = int(client.get("streamvg:fence:windows_grounded") or 0)
            wait_until(lambda: int(client.get("streamvg:fence:windows_grounded") or 0) >= before + 3, timeout=30,
                       what="the new owner grounding")
            frozen.send_signal(signal.SIGCONT)
            out, _ = ingest.communicate(timeout=120)
            assert ingest.returncode == 0
            published = summary(out)["windows_published"]
            wait_until(lambda: work_left(client, "fence", list(scene.cameras)) == 0
                       and int(client.get("streamvg:fence:windows_grounded") or 0) >= published,
                       timeout=90, what="every window grounded")
            done.set()
            for w in workers:
                w.terminate()
            outs = {w.pid: summary(w.communicate(timeout=30)[0]) for w in workers}
        finally:
            done.set()
            for p in [*workers, ingest]:
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
                    p.kill()
                    p.communicate()
        raw = stream_events(client, "fence")
    assert outs[frozen.pid]["leases_lost"] >= 1  # it noticed, and dropped the camera
    assert "dropping it without publishing" in (tmp_path / f"g{workers.index(frozen)}.log").read_text()
    assert sum(o["windows_grounded"] for o in outs.values()) == published  # the frozen one's last batch refused
    assert times == sorted(times), f"cam0's saved state went back in time: {times}"
    assert len(times) >= 5
    _assert_one_history(raw)


def test_grounding_three_times_the_lease_keeps_the_cameras(tmp_path: Path) -> None:
    scene = make_scene(tmp_path, cameras=1, duration_s=2.0, seed=5)  # the second worker waits to steal it
    with RedisServer() as srv:
        path = pipeline_file(tmp_path, scene, name="slow", redis_url=srv.url, latency_s=1.5,
                             scaleout={"lease_s": 0.5})
        client = redis.Redis.from_url(srv.url)
        workers = [spawn(path, "ground", log=tmp_path / f"g{i}.log") for i in range(2)]
        ingest = spawn(path, "ingest", log=tmp_path / "ingest.log")
        try:
            out, _ = ingest.communicate(timeout=120)
            published = summary(out)["windows_published"]
            wait_until(lambda: work_left(client, "slow", list(scene.cameras)) == 0, timeout=120, what="every window done")
            for w in workers:
                w.terminate()
            outs = [summary(w.communicate(timeout=30)[0]) for w in workers]
        finally:
            for p in [*workers, ingest]:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        raw = stream_events(client, "slow")
    assert [o["leases_lost"] for o in outs] == [0, 0] and [o["commits_refused"] for o in outs] == [0, 0]
    assert sum(o["windows_grounded"] for o in outs) == published
    _assert_one_history(raw)


def test_a_stale_token_writes_nothing() -> None:
    with RedisServer() as srv:
        client = redis.Redis.from_url(srv.url)
        fence = Fence(client, "p", events_key="streamvg:p:events", live_key="streamvg:p:live", events_maxlen=100)
        client.xadd("streamvg:p:work:c", {"meta": b"{}"})
        (eid, _f), = client.xrange("streamvg:p:work:c")
        first = fence.acquire("c", "w1", 200)
        assert first is not None and fence.acquire("c", "w2", 200) is None  # held
        wait_until(lambda: client.get("streamvg:p:lease:c") is None, timeout=5, what="the lease to expire")
        second = fence.acquire("c", "w2", 10_000)
        assert second is not None and int(second.split("|")[1]) > int(first.split("|")[1])  # the token grew
        stale = Commit(state=b"old", ids=[eid], events=[b'{"x":1}'], dead=[(b"d", "e", "s")], grounded=1)
        assert not fence.commit("c", "streamvg:p:work:c", first, stale)
        assert client.get("streamvg:p:trackstate:c") is None and client.xlen("streamvg:p:work:c") == 1
        assert not client.exists("streamvg:p:events", "streamvg:p:dead", "streamvg:p:windows_grounded")
        assert fence.commit("c", "streamvg:p:work:c", second, Commit(state=b"new", ids=[eid], events=[b"{}"], grounded=1))
        assert client.get("streamvg:p:trackstate:c") == b"new" and client.xlen("streamvg:p:work:c") == 0
        assert client.xlen("streamvg:p:events") == 1 and not fence.renew("c", first, 1000) and fence.renew("c", second, 1000)
