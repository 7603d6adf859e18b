"""Scale-out over Redis: ingest processes put windows on per-camera work streams, ground
workers take them through a consumer group.

```
 streamvg monitor --role ingest            streamvg monitor --role ground  (×N, GPU)
 cameras → windows ─XADD─▶ streamvg:{p}:work:{camera} ─XREADGROUP─▶ engine → trackers → events
          (JPEG frames + metadata; stalest dropped        (a camera is leased to one worker at a time;
           beyond max_backlog)                             its tracker state is saved with every ack)
```

Routing: each camera has its own work stream and a lease key
(`streamvg:{p}:lease:{camera}`, `SET NX PX`) held by one worker and renewed on every
loop, so a camera's windows reach one tracker at a time and arrive in order. Workers
announce themselves with a heartbeat key; each takes about `cameras / workers` leases and
gives back extras when new workers join.

Hand-over: after a window is processed the worker saves the camera's tracker state and
acknowledges the window in one transaction. When a worker dies its leases expire; the
next owner loads the saved state, claims the dead worker's pending windows
(`XAUTOCLAIM`) and processes them first, so track ids continue. Windows the dead worker
had processed but not acknowledged are processed again and produce the same events with
the same `event_id`s, which consumers drop (at-least-once delivery, exactly-once after
dedupe).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import redis

from streamvg.config import PipelineConfig
from streamvg.errors import PublishError, RedisAuthError, TrackingError
from streamvg.events import Event
from streamvg.grounding import GroundingEngine, create_engine
from streamvg.pipeline import (
    GroundingFailures,
    IdentityStage,
    PipelineMetrics,
    Sink,
    TrackingStage,
    default_sinks,
    ground_in_chunks,
)
from streamvg.redaction import mask_url
from streamvg.types import Frame, Window

__all__ = ["GroundWorker", "WindowPublisher", "decode_window", "encode_window"]

log = logging.getLogger(__name__)

GROUP = "ground"


def work_key(pipeline: str, camera: str) -> str:
    return f"streamvg:{pipeline}:work:{camera}"


def _k(pipeline: str, name: str) -> str:
    return f"streamvg:{pipeline}:{name}"


def encode_window(window: Window, *, jpeg_quality: int = 90) -> dict[str, bytes]:
    """A window as stream fields: `meta` (JSON) and one JPEG per frame (`f0`, `f1`, …)."""
    meta = {
        "id": window.id,
        "missing": list(window.missing),
        "frames": [{"camera": f.camera, "index": f.index, "pts": f.pts, "wall_time": f.wall_time} for f in window.frames],
    }
    fields: dict[str, bytes] = {"meta": json.dumps(meta).encode()}
    for k, f in enumerate(window.frames):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise ValueError(f"could not JPEG-encode frame {f.index} of camera {f.camera}")
        fields[f"f{k}"] = buf.tobytes()
    return fields


def decode_window(fields: dict[bytes, bytes] | dict[str, bytes]) -> Window:
    """The inverse of `encode_window` (frames come back as RGB arrays)."""
    get = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    meta = json.loads(get["meta"])
    frames = []
    for k, fm in enumerate(meta["frames"]):
        img = cv2.imdecode(np.frombuffer(get[f"f{k}"], np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"frame {k} of window {meta['id']} is not a decodable JPEG")
        rgb = np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        frames.append(Frame(fm["camera"], int(fm["index"]), float(fm["pts"]), rgb, fm["wall_time"]))
    return Window(tuple(frames), id=meta["id"], missing=tuple(meta["missing"]))


def _client(url: str) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise RedisAuthError(f"Redis at {mask_url(url)} refused the credentials; check the user and password in the URL") from exc
    except redis.RedisError as exc:
        raise PublishError(f"cannot reach Redis at {mask_url(url)} ({exc.__class__.__name__}); check the URL and that Redis runs") from exc
    return client


class WindowPublisher:
    """The ingest side: puts windows on their camera's work stream.

    Args:
        url: Redis URL.
        pipeline: Pipeline name.
        max_backlog: Windows a camera's work stream may hold; beyond it the stalest are
            dropped (and counted), so a slow ground fleet sees fresh windows.
    """

    def __init__(self, url: str, pipeline: str, *, max_backlog: int = 1000) -> None:
        self.url = url
        self.pipeline = pipeline
        self.max_backlog = max_backlog
        self.client = _client(url)
        self.published = 0
        self.dropped = 0
        self._known: set[str] = set()

    def put(self, windows: Sequence[Window]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for w in windows:
            cam = w.frames[0].camera
            if cam not in self._known:
                self.client.sadd(_k(self.pipeline, "cameras"), cam)
                self._known.add(cam)
            pipe.xadd(work_key(self.pipeline, cam), encode_window(w))  # type: ignore[arg-type]
        pipe.incrby(_k(self.pipeline, "windows_published"), len(windows))
        pipe.execute()
        self.published += len(windows)
        for cam in {w.frames[0].camera for w in windows}:
            key = work_key(self.pipeline, cam)
            backlog = int(self.client.xlen(key))
            if backlog > self.max_backlog:
                trimmed = int(self.client.xtrim(key, maxlen=self.max_backlog, approximate=False))
                self.dropped += trimmed
                log.warning("camera %s: ground workers are behind; dropped %d stale windows", cam, trimmed)

    def close(self) -> None:
        self.client.close()


_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def _worker_sinks(config: PipelineConfig, max_slots: int = 64) -> list[Sink]:
    """The pipeline's sinks with a spool of this worker's own: several workers on one host
    take spool slots `ground-0`, `ground-1`, … so a restarted worker replays what a dead
    one left behind."""
    assert config.sinks.redis is not None
    base = config.sinks.redis.spool_dir
    last: PublishError | None = None
    for slot in range(max_slots):
        redis_cfg = config.sinks.redis.model_copy(update={"spool_dir": os.path.join(base, f"ground-{slot}")})
        sinks_cfg = config.sinks.model_copy(update={"redis": redis_cfg})
        try:
            return default_sinks(config.model_copy(update={"sinks": sinks_cfg}))
        except PublishError as exc:
            if "in use by another" not in str(exc):
                raise
            last = exc
    raise PublishError(f"all {max_slots} spool slots under {base} are in use; give this worker another sinks.redis.spool_dir") from last


class GroundWorker:
    """A ground worker: leases cameras, grounds their windows, tracks, publishes events.

    Args:
        config: The pipeline file (its `sinks.redis.url` is the work and event broker).
        engine: A ready engine; by default `create_engine(config.engine)`.
        sinks: Where events go; by default the pipeline's sinks.
        worker_id: Unique name of this worker (consumer name in the group).
        lease_s: How long a camera stays with a worker that stopped renewing (a dead
            worker's cameras move after this long).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        engine: GroundingEngine | None = None,
        sinks: Sequence[Sink] | None = None,
        worker_id: str | None = None,
        lease_s: float = 5.0,
        metrics_port: int | None = None,
    ) -> None:
        if config.sinks.redis is None:
            raise PublishError("scale-out needs sinks.redis.url in the pipeline file (the work streams live in Redis)")
        self.config = config
        self.pipeline = config.name
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lease_ms = int(lease_s * 1000)
        self.client = _client(config.sinks.redis.url)
        self.engine = engine or create_engine(config.engine)
        self.sinks = list(sinks) if sinks is not None else _worker_sinks(config)
        # Cross-camera identity: the linker lives with the worker that leases a multi-camera
        # window's stream (windows travel whole to their first camera's stream).
        self.identity = IdentityStage(config, publish=self._publish) if config.identity is not None else None
        if self.identity is not None:
            self.identity.bind_engine(self.engine)
        publish = self.identity.publish if self.identity is not None else self._publish
        self.stage = TrackingStage(config, publish=publish, model_name=lambda: self.engine.name)
        self.queries = [q for q in config.queries]
        self.owned: set[str] = set()
        self.windows_grounded = 0
        # Windows whose grounding raised are skipped and acknowledged, never retried: by the
        # time a model server is back they are stale, and the cameras keep sending fresh ones.
        self.failures = GroundingFailures(config.engine.max_consecutive_failures or None)
        self.metrics = PipelineMetrics(metrics_port) if metrics_port else None
        if self.metrics:
            self.metrics.watch_sinks(self.sinks)
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    def _publish(self, event: Event) -> None:
        for s in self.sinks:
            s.publish(event)
        if self.metrics:
            self.metrics.events.labels(event.kind).inc()

    # --- leases -------------------------------------------------------------------

    def _heartbeat(self) -> int:
        self.client.set(_k(self.pipeline, f"workers:{self.worker_id}"), b"1", px=self.lease_ms)
        return sum(1 for _ in self.client.scan_iter(match=_k(self.pipeline, "workers:*"), count=100)) or 1

    def _balance(self) -> None:
        n_workers = self._heartbeat()
        for cam in list(self.owned):
            if not self._renew(keys=[_k(self.pipeline, f"lease:{cam}")], args=[self.worker_id, self.lease_ms]):
                log.warning("lost the lease of camera %s", cam)
                self.owned.discard(cam)
                self.stage.drop_camera(cam)
        cameras = sorted(c.decode() if isinstance(c, bytes) else c for c in self.client.smembers(_k(self.pipeline, "cameras")))
        fair = math.ceil(len(cameras) / n_workers) if cameras else 0
        while len(self.owned) > fair:
            self._give_back(sorted(self.owned)[-1])
        for cam in cameras:
            if len(self.owned) >= fair:
                break
            if cam in self.owned:
                continue
            if self.client.set(_k(self.pipeline, f"lease:{cam}"), self.worker_id, nx=True, px=self.lease_ms):
                self._adopt(cam)

    def _adopt(self, cam: str) -> None:
        key = work_key(self.pipeline, cam)
        try:
            self.client.xgroup_create(key, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        state: Any = self.client.get(_k(self.pipeline, f"trackstate:{cam}"))
        self.stage.drop_camera(cam)
        if state:
            try:
                self.stage.import_camera(cam, state)
            except TrackingError as exc:  # corrupt, or saved by another version: carry on
                log.warning("worker %s: %s", self.worker_id, exc)
        if self.identity is not None:
            saved: Any = self.client.get(_k(self.pipeline, f"identitystate:{cam}"))
            if saved:
                try:
                    self.identity.import_state(saved)
                except ValueError as exc:
                    log.warning("worker %s: %s", self.worker_id, exc)
            # Only this stream camera's trackers were handed over; the window's other
            # cameras start their track ids again, so their old tracks are forgotten.
            for other in self.config.sources:
                if other.name != cam:
                    self.identity.forget_camera(other.name)
        self.owned.add(cam)
        log.info("worker %s took camera %s", self.worker_id, cam)
        # Windows a previous owner received but never acknowledged come first, in order.
        start = "0-0"
        while True:
            reply = self.client.xautoclaim(key, GROUP, self.worker_id, min_idle_time=0, start_id=start, count=100)
            start, entries = reply[0], reply[1]
            if not entries:
                break
            self._process(cam, [(eid, f) for eid, f in entries if f])
            if start in (b"0-0", "0-0"):
                break

    def _give_back(self, cam: str) -> None:
        self.client.set(_k(self.pipeline, f"trackstate:{cam}"), self.stage.export_camera(cam))
        if self.identity is not None:
            self.client.set(_k(self.pipeline, f"identitystate:{cam}"), self.identity.export_state())
        self._release(keys=[_k(self.pipeline, f"lease:{cam}")], args=[self.worker_id])
        self.stage.drop_camera(cam)
        self.owned.discard(cam)

    # --- work ---------------------------------------------------------------------

    def _process(self, cam: str, entries: list[tuple[Any, Any]]) -> None:
        if not entries:
            return
        windows = [decode_window(f) for _eid, f in entries]
        requests = [(w, q) for w in windows for q in self.queries]
        bs = self.config.engine.batch_size
        from streamvg.pipeline import query_from_config as _query_from_config

        reqs = [(w, _query_from_config(q)) for w, q in requests]
        failed: list[Window] = []
        for chunk, groundings, elapsed in ground_in_chunks(self.engine, reqs, bs, self.failures, failed.append):
            ms = elapsed * 1000.0 / max(1, len(chunk))
            for (w, q), g in zip(chunk, groundings, strict=True):
                fed = self.stage.process(w, q, g, ms)
                if self.identity is not None:
                    self.identity.observe(w, q, fed)
        if self.identity is not None:
            self.identity.ask(self.engine, bs)
        for s in self.sinks:
            s.flush()
        ids = [eid for eid, _ in entries]
        tx = self.client.pipeline(transaction=True)
        tx.set(_k(self.pipeline, f"trackstate:{cam}"), self.stage.export_camera(cam))
        if self.identity is not None:
            tx.set(_k(self.pipeline, f"identitystate:{cam}"), self.identity.export_state())
        tx.xack(work_key(self.pipeline, cam), GROUP, *ids)
        tx.xdel(work_key(self.pipeline, cam), *ids)
        grounded = len(ids) - len(failed)
        tx.incrby(_k(self.pipeline, "windows_grounded"), grounded)
        if failed:
            tx.incrby(_k(self.pipeline, "windows_failed"), len(failed))
        tx.execute()
        self.windows_grounded += grounded
        if self.metrics:
            self.metrics.windows_grounded.labels(cam).inc(grounded)
            if failed:
                self.metrics.windows_failed.labels(cam).inc(len(failed))

    def run(self, stop: threading.Event, *, block_ms: int = 200) -> None:
        """Work until `stop` is set; gives its cameras back on the way out."""
        next_balance = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_balance:
                    self._balance()
                    next_balance = now + self.lease_ms / 3000.0
                if not self.owned:
                    stop.wait(block_ms / 1000.0)
                    continue
                streams = {work_key(self.pipeline, c): ">" for c in sorted(self.owned)}
                reply: Any = self.client.xreadgroup(GROUP, self.worker_id, streams, count=self.config.engine.batch_size, block=block_ms)  # type: ignore[arg-type]
                for key, entries in reply or []:
                    k = key.decode() if isinstance(key, bytes) else key
                    cam = k.rsplit(":", 1)[-1]
                    if cam in self.owned:
                        self._process(cam, [(eid, f) for eid, f in entries if f])
        finally:
            for cam in list(self.owned):
                try:
                    self._give_back(cam)
                except redis.RedisError:
                    log.warning("could not hand camera %s back; its lease will expire", cam)
            self.client.delete(_k(self.pipeline, f"workers:{self.worker_id}"))
            for s in self.sinks:
                s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self.engine.close()
        self.client.close()
        if self.metrics:
            self.metrics.close()
