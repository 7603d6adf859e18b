"""Cross-camera identity in scale-out: the linker lives with the worker leasing the
multi-camera windows' stream, and its state moves with the lease."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import redis

from streamvg.config import (
    EngineConfig,
    IdentityConfig,
    PipelineConfig,
    QueryConfig,
    RedisSinkConfig,
    SamplingConfig,
    SinksConfig,
    SourceConfig,
)
from streamvg.demo import EventCollector
from streamvg.scaleout import GroundWorker, WindowPublisher
from streamvg.sources import open_source
from streamvg.testing.servers import wait_until
from streamvg.testing.synthetic import (
    GroundTruthEngine,
    cross_camera_objects,
    cross_camera_specs,
    write_scene,
)
from streamvg.windows import MultiCameraWindows

URL = "redis://127.0.0.1:6379/0"


class _StopAfter:
    """An engine that stops its worker once it has grounded `n` of `windows`, so the
    hand-over point is the same on every run however loaded the machine is (stopping from
    the test thread let a worker ground a varying number of further batches first)."""

    def __init__(self, inner: GroundTruthEngine, windows: list, n: int) -> None:
        self.inner, self.n, self.stop = inner, n, threading.Event()
        self._ids, self._seen = {w.id for w in windows}, set()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def ground_many(self, requests: list) -> list:
        out = self.inner.ground_many(requests)
        self._seen.update(w.id for w, _ in requests if getattr(w, "id", None) in self._ids)
        if len(self._seen) >= self.n:
            self.stop.set()  # seen between batches: this batch is committed, then the worker stops
        return out


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.mark.skipif(not _redis_up(), reason="needs the Redis server at 127.0.0.1:6379 that CI starts")
def test_global_ids_continue_when_a_camera_group_moves_to_another_worker(tmp_path: Path) -> None:
    w, h, dur = 320, 192, 10.0
    scene = write_scene(tmp_path / "v", cameras=cross_camera_specs(w, h, start_s=(0.0, 0.0, 0.0)), width=w, height=h,
                        fps=5.0, duration_s=dur, seed=2, bframes=0, objects=cross_camera_objects(w, h, dur, n=3, seed=2))
    labels = sorted({o.label for o in scene.objects})
    name = f"xcam-{uuid.uuid4().hex[:8]}"
    cfg = PipelineConfig(
        name=name, sources=[SourceConfig(name=c, uri=str(p)) for c, p in sorted(scene.cameras.items())],
        sampling=SamplingConfig(fps=5.0, multi_camera=True),
        queries=[QueryConfig(id=f"q{i}", text=f"the {lab}") for i, lab in enumerate(labels)],
        engine=EngineConfig(kind="replay", replay_path="unused.jsonl", batch_size=4),
        sinks=SinksConfig(redis=RedisSinkConfig(url=URL)), identity=IdentityConfig(one_referent=["*"]),
    )
    # The ingest side: multi-camera windows of the three files, onto the work streams.
    mc = MultiCameraWindows(sorted(scene.cameras), tolerance_s=0.1)
    sources = {c: iter(open_source(str(p), fps=5.0, camera=c)) for c, p in scene.cameras.items()}
    windows = []
    while sources:
        for cam in sorted(list(sources)):
            frame = next(sources[cam], None)
            if frame is None:
                del sources[cam]
                windows += mc.flush(cam)
            else:
                windows += mc.push(frame)
    windows += mc.flush()
    assert all(w.frames[0].camera == "cam0" for w in windows)  # windows travel whole to one stream
    client = redis.Redis.from_url(URL)
    try:
        pub = WindowPublisher(URL, name)
        pub.put(windows)
        assert pub.drain(timeout=60)  # close() drops what the sender thread has not handed over yet
        pub.close()

        def work(worker: GroundWorker, stop: threading.Event, done: object) -> None:
            t = threading.Thread(target=worker.run, args=(stop,), daemon=True)
            t.start()
            wait_until(done, timeout=60)  # type: ignore[arg-type]
            stop.set()
            t.join(30)
            assert not t.is_alive()

        first, second = EventCollector(), EventCollector()
        engine_a = _StopAfter(GroundTruthEngine(scene.ground_truth, wrong_rate=0.1, seed=3), windows, len(windows) // 2)
        a = GroundWorker(cfg, engine=engine_a, sinks=[first], worker_id="a", lease_s=1.0)  # type: ignore[arg-type]
        work(a, engine_a.stop, engine_a.stop.is_set)
        a.close()
        b = GroundWorker(cfg, engine=GroundTruthEngine(scene.ground_truth, wrong_rate=0.1, seed=3), sinks=[second], worker_id="b", lease_s=1.0)
        work(b, threading.Event(), lambda: int(client.get(f"streamvg:{name}:windows_grounded") or 0) >= len(windows))
        assert b.identity is not None
        gids_a = {(e.query_id, e.camera, e.track_id): e.global_id for e in first.events if e.kind.startswith("track_")}
        linked_a = {k for k, g in gids_a.items() if any(g == g2 and k[1] != k2[1] and k[0] == k2[0] for k2, g2 in gids_a.items())}
        assert linked_a, "worker a linked nothing across cameras"
        # The linker's state moved with the lease: worker b knows worker a's tracks of the
        # stream camera (cam0), whose tracker state moved too.
        for q, cam, tid in linked_a:
            if cam == "cam0":
                assert (cam, tid) in b.identity.linker(q).tracks
        # Worker b ends with an identity across the three cameras for every query.
        for q, groups in b.identity.identities().items():
            assert any(len({c for c, _ in ks}) == 3 for ks in groups.values()), (q, groups)
        b.close()
    finally:
        for key in client.scan_iter(match=f"streamvg:{name}:*"):
            client.delete(key)
        client.close()
