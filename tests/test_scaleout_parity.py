"""A fleet (1 ingest + 2 ground worker processes over a real Redis) publishes the same
events as one process on the same generated cameras, also when Redis is killed (kill -9,
restarted from its append-only file) for 10 s in the middle of the run."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import redis
from _fleet import make_scene, pipeline_file, spawn, stream_events, summary, work_left

from streamvg.config import load_pipeline
from streamvg.events import Event
from streamvg.pipeline import Pipeline
from streamvg.testing.servers import RedisServer, wait_until


def _one_process(tmp: Path, scene) -> list[Event]:  # type: ignore[no-untyped-def]
    out = tmp / "one.jsonl"
    cfg = load_pipeline(pipeline_file(tmp, scene, name="par", redis_url=None, jsonl=out))
    Pipeline(cfg, control=False).run()
    return [Event.from_json(line) for line in out.read_text().splitlines() if line.strip()]


def _key(events: list[Event]) -> tuple[set[str], collections.Counter[str], set[tuple[str, str]]]:
    """What must match: ids and kind counts of everything but source_status (whose id
    carries the wall time it happened at), and (camera, state) of source_status."""
    body = [e for e in events if e.kind != "source_status"]
    status = {(e.camera, str(e.state)) for e in events if e.kind == "source_status"}
    return {e.event_id for e in body}, collections.Counter(e.kind for e in body), status


def test_fleet_publishes_what_one_process_does_through_a_redis_kill(tmp_path: Path) -> None:
    outage_s = 10.0
    scene = make_scene(tmp_path, duration_s=6.0)
    expected = _one_process(tmp_path, scene)
    ids, kinds, status = _key(expected)
    assert kinds["track_end"] > 0 and kinds["grounding"] > 0 and status
    with RedisServer(persistent=True) as srv:
        # 50 ms per window stands in for a model, so the outage lands mid-run
        path = pipeline_file(tmp_path, scene, name="par", redis_url=srv.url, latency_s=0.05,
                             scaleout={"lease_s": 2.0, "max_backlog": 4})  # files wait on the fleet
        client = redis.Redis.from_url(srv.url)
        logs = [tmp_path / f"ground{i}.log" for i in range(2)]
        procs = [spawn(path, "ground", log=logs[0]), spawn(path, "ground", log=logs[1])]
        procs.append(spawn(path, "ingest", log=tmp_path / "ingest.log"))
        try:
            if outage_s:
                # both roles are at work: ingest still has windows to hand over, workers to ground
                wait_until(lambda: int(client.get("streamvg:par:windows_grounded") or 0) >= 2, timeout=60,
                           what="some windows grounded")
                assert procs[2].poll() is None
                srv.kill()
                t0 = time.monotonic()
                while time.monotonic() - t0 < outage_s:
                    assert all(p.poll() is None for p in procs[:2]), "a ground worker exited during the outage"
                    time.sleep(0.2)
                srv.start()
                client = redis.Redis.from_url(srv.url)
            out, _ = procs[2].communicate(timeout=120)
            assert procs[2].returncode == 0, (tmp_path / "ingest.log").read_text()[-3000:]
            published = summary(out)["windows_published"]
            wait_until(lambda: work_left(client, "par", list(scene.cameras)) == 0
                       and int(client.get("streamvg:par:windows_grounded") or 0) >= published,
                       timeout=90, what="every window grounded")
            assert all(p.poll() is None for p in procs[:2]), "a ground worker exited"
            for p in procs[:2]:
                p.terminate()
            outs = [p.communicate(timeout=30)[0] for p in procs[:2]]
            assert [p.returncode for p in procs[:2]] == [0, 0], [lg.read_text()[-2000:] for lg in logs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        assert sum(summary(o)["windows_grounded"] for o in outs) == published  # each window grounded once
        raw = stream_events(client, "par")
    got_ids, got_kinds, got_status = _key(raw)
    assert got_ids == ids
    assert got_kinds == kinds  # no event published twice, none missing
    assert status <= got_status
    for lg in [*logs, tmp_path / "ingest.log"]:  # one line when it goes, one when it is back
        text = lg.read_text()
        assert 1 <= text.count("Redis is unreachable") <= 2 and text.count("Redis is back") >= 1, text[-2000:]
        assert "Traceback" not in text
