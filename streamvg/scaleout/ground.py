"""The ground worker: fenced camera leases → windows → engine → trackers → fenced commits.

```
 heartbeat thread: every heartbeat_s  SET workers:{id} PX lease; renew each camera's lease
 main thread:      balance (take free cameras: fence token INCR, load state)
                   XREAD work:{camera} after the last window done (oldest first, in order)
                   decode (checked) → ground → track → one fenced commit per batch:
                   state SET + XDEL windows + XADD events + dead letters + counters
```

Order and hand-over: a camera's work stream holds exactly the windows not yet committed
(a commit deletes the ones it covers, atomically with the tracker state and the events
they produced), so a new owner reads the stream from its start and continues where the
last accepted commit left off: nothing is skipped and nothing is published twice. A
worker whose lease went stale (frozen past `lease_s`, or cut off from Redis while another
worker took the camera) has its commit refused: it drops the camera, logs once, and what
it computed is never seen.

Poison: a work entry that does not decode (see `codec`), a saved state that does not load,
is larger than `max_state_bytes` inflated, is ahead of the camera's windows in time or
makes the tracker raise goes to `streamvg:{pipeline}:dead` (fields `data`, `error`,
`source`) inside the same fenced commit; the camera goes on (from a clean tracker state
where the state was the problem).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from streamvg.config import PipelineConfig
from streamvg.errors import PublishError, RedisAuthError, TrackingError
from streamvg.events import Event
from streamvg.grounding import Grounding, GroundingEngine, create_engine
from streamvg.pipeline import (
    GroundingFailures,
    IdentityStage,
    PipelineMetrics,
    Sink,
    TrackingStage,
    ground_in_chunks,
    query_from_config,
)
from streamvg.redaction import mask_text, mask_url
from streamvg.scaleout.codec import PoisonEntry, WorkItem, decode_entry, describe_entry
from streamvg.scaleout.ingest import work_key
from streamvg.scaleout.lease import Commit, Fence, Outage, is_outage, key, token_of
from streamvg.sinks import JsonlSink
from streamvg.sinks.redis import connect_redis, live_channel, stream_key
from streamvg.types import Detections, Frame, Query, Window

__all__ = ["GroundWorker", "check_state_size"]

log = logging.getLogger("streamvg.scaleout")

SOURCE_WORK = "scaleout.ground:work"
SOURCE_STATE = "scaleout.ground:state"


@dataclass(frozen=True, eq=False)
class _SentFrame(Frame):
    """A frame ingest downsized: the picture as sent, the size it has in its source
    (events report that size, and boxes are mapped back to it)."""

    original_size: tuple[int, int] = (0, 0)

    @property
    def width(self) -> int:
        return self.original_size[0]

    @property
    def height(self) -> int:
        return self.original_size[1]

    @property
    def size(self) -> tuple[int, int]:
        return self.original_size


def check_state_size(data: bytes, max_bytes: int) -> None:
    """Refuse a saved tracker state whose archive declares more than `max_bytes` inflated
    (a zip bomb is refused before anything is inflated).

    Raises:
        PoisonEntry: not a zip archive, or too large once inflated.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise PoisonEntry(f"is unreadable (not a saved tracker state: {exc})") from None
    declared = sum(i.file_size for i in infos)
    if len(infos) > 10_000 or declared > max_bytes:
        raise PoisonEntry(
            f"declares {declared} bytes in {len(infos)} arrays once inflated, above scaleout.max_state_bytes ({max_bytes})"
        )


def _restore_sizes(item: WorkItem, g: Grounding) -> tuple[Window, Grounding]:
    """The window and answer in original frame pixels when ingest downsized frames."""
    w = item.window
    assert w is not None
    scales = [(o[0] / f.image.shape[1], o[1] / f.image.shape[0]) for f, o in zip(w.frames, item.original_sizes, strict=True)]
    if all(sx == 1.0 and sy == 1.0 for sx, sy in scales):
        return w, g
    frames = tuple(_SentFrame(f.camera, f.index, f.pts, f.image, f.wall_time, o)
                   for f, o in zip(w.frames, item.original_sizes, strict=True))
    d = g.detections
    if len(d):
        s = np.array([[sx, sy, sx, sy] for sx, sy in scales], np.float32)[d.image_index]
        d = Detections((d.xyxy * s).astype(np.float32), d.score, d.image_index, d.track_id)
    return Window(frames, id=w.id, missing=w.missing), dataclasses.replace(g, detections=d)


class GroundWorker:
    """A ground worker: leases cameras, grounds their windows, tracks, publishes events.

    Args:
        config: The pipeline file (its `sinks.redis.url` is the work and event broker;
            `scaleout` holds the lease, heartbeat and limits).
        engine: A ready engine; by default `create_engine(config.engine)`.
        sinks: Extra sinks fed after each accepted commit (the JSONL sink of the file by
            default); Redis events are written by the fenced commit itself.
        worker_id: Unique name of this worker.
        lease_s, heartbeat_s: Override `config.scaleout`.
        metrics_port: Serve Prometheus metrics on this port (`metrics.address`).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        engine: GroundingEngine | None = None,
        sinks: Sequence[Sink] | None = None,
        worker_id: str | None = None,
        lease_s: float | None = None,
        heartbeat_s: float | None = None,
        metrics_port: int | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        rcfg = config.sinks.redis
        if rcfg is None:
            raise PublishError("scale-out needs sinks.redis.url in the pipeline file (the work streams live in Redis)")
        self.config = config
        self.settings = config.scaleout
        self.pipeline = config.name
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        lease = lease_s if lease_s is not None else self.settings.lease_s
        self.lease_ms = max(1, int(lease * 1000))
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else (
            self.settings.heartbeat_s if lease_s is None and self.settings.heartbeat_s else lease / 3.0
        )
        self.url = rcfg.url
        self.outage = Outage(f"ground worker {self.worker_id}")
        self.client = connect_redis(rcfg.url, socket_timeout_s=5.0, connect_timeout_s=2.0)
        self._hb_client = connect_redis(rcfg.url, socket_timeout_s=max(0.2, self.heartbeat_s), connect_timeout_s=1.0)
        self._wait_for_redis(stop)
        self.fence = Fence(self.client, self.pipeline, events_key=rcfg.stream or stream_key(self.pipeline),
                           live_key=live_channel(self.pipeline), events_maxlen=rcfg.maxlen)
        self._hb_fence = Fence(self._hb_client, self.pipeline, events_key="", live_key="", events_maxlen=1)
        self.engine = engine or create_engine(config.engine)
        if sinks is not None:
            self.sinks = list(sinks)
        else:
            self.sinks = [JsonlSink(config.sinks.jsonl.path)] if config.sinks.jsonl is not None else []
        self._events: list[Event] = []
        # Cross-camera identity: the linker lives with the worker that leases a multi-camera
        # window's stream (windows travel whole to their first camera's stream); its state is
        # saved in the same fenced commit as the tracker state.
        self.identity = IdentityStage(config, publish=self._events.append) if config.identity is not None else None
        if self.identity is not None:
            self.identity.bind_engine(self.engine)
        publish = self.identity.publish if self.identity is not None else self._events.append
        self.stage = TrackingStage(config, publish=publish, model_name=lambda: self.engine.name)
        self.queries: list[Query] = [query_from_config(q) for q in config.queries]
        self.owned: dict[str, str] = {}  # camera -> lease value "{worker}|{token}"
        self._cursor: dict[str, str] = {}  # camera -> last work entry id done
        self._unproven: set[str] = set()  # cameras whose imported state no window has passed yet
        self._lost: set[str] = set()
        self._run_stop: threading.Event | None = stop
        self._lock = threading.Lock()
        self.windows_grounded = 0
        self.leases_lost = 0
        self.commits_refused = 0
        self.dead_letters = 0
        self.failures = GroundingFailures(config.engine.max_consecutive_failures or None)
        self.metrics = PipelineMetrics(metrics_port, address=config.metrics.address) if metrics_port else None
        if self.metrics:
            self.metrics.watch_sinks(self.sinks)
            from prometheus_client import Gauge

            for name, doc in (("leases_lost", "Cameras this worker lost (lease expired or taken over)"),
                              ("commits_refused", "Commits refused because the fencing token was stale"),
                              ("dead_letters", "Work entries and saved states dead-lettered")):
                Gauge(f"streamvg_scaleout_{name}", doc, registry=self.metrics.registry).set_function(
                    functools.partial(self._counter, name))

    def _counter(self, name: str) -> float:
        return float(getattr(self, name))

    def _wait_for_redis(self, stop: threading.Event | None) -> None:
        """Until Redis answers (an outage at start is ridden out like any other)."""
        while stop is None or not stop.is_set():
            try:
                self.client.ping()
                self.outage.up()
                return
            except redis.RedisError as exc:
                if isinstance(exc, redis.AuthenticationError) or str(exc).startswith(("NOAUTH", "WRONGPASS")):
                    raise RedisAuthError(
                        f"Redis at {mask_url(self.url)} refused the credentials; check the user and password in the URL"
                    ) from exc
                if not is_outage(exc):
                    raise PublishError(f"Redis at {mask_url(self.url)} answered {mask_text(str(exc))}") from exc
                self.outage.down(exc, stop)

    # --- leases -------------------------------------------------------------------

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """Renew the worker's presence and every lease it holds, whatever the main thread
        is doing (a grounding longer than the lease keeps its cameras)."""
        while not stop.wait(self.heartbeat_s):
            try:
                self._hb_client.set(key(self.pipeline, f"workers:{self.worker_id}"), b"1", px=self.lease_ms)
                with self._lock:
                    owned = dict(self.owned)
                for cam, lease in owned.items():
                    if not self._hb_fence.renew(cam, lease, self.lease_ms):
                        with self._lock:
                            if self.owned.get(cam) == lease:
                                self._lost.add(cam)
            except redis.RedisError:
                pass  # the main thread logs outages; a lease that expires meanwhile is found below

    def _drop(self, cam: str, why: str) -> None:
        log.warning("worker %s: camera %s: %s; dropping it without publishing", self.worker_id, cam, why)
        with self._lock:
            self.owned.pop(cam, None)
            self._lost.discard(cam)
        self._cursor.pop(cam, None)
        self._unproven.discard(cam)
        self.stage.drop_camera(cam)
        self.leases_lost += 1

    def _drop_lost(self) -> None:
        with self._lock:
            lost = [c for c in self._lost if c in self.owned]
            self._lost.clear()
        for cam in lost:
            self._drop(cam, "its lease expired or was taken over (not renewed in time)")

    def _balance(self) -> None:
        self.client.set(key(self.pipeline, f"workers:{self.worker_id}"), b"1", px=self.lease_ms)
        n_workers = sum(1 for _ in self.client.scan_iter(match=key(self.pipeline, "workers:*"), count=100)) or 1
        cameras = sorted(c.decode() if isinstance(c, bytes) else c for c in self.client.smembers(key(self.pipeline, "cameras")))
        fair = math.ceil(len(cameras) / n_workers) if cameras else 0
        while len(self.owned) > fair:
            self._give_back(sorted(self.owned)[-1])
        for cam in cameras:
            if len(self.owned) >= fair:
                break
            if cam in self.owned:
                continue
            lease = self.fence.acquire(cam, self.worker_id, self.lease_ms)
            if lease:
                self._adopt(cam, lease)

    def _adopt(self, cam: str, lease: str) -> None:
        with self._lock:
            self.owned[cam] = lease
        self._cursor[cam] = "0-0"
        self.stage.drop_camera(cam)
        state: Any = self.client.get(key(self.pipeline, f"trackstate:{cam}"))
        if state:
            try:
                check_state_size(state, self.settings.max_state_bytes)
                self.stage.import_camera(cam, state)
                self._unproven.add(cam)
            except (PoisonEntry, TrackingError, MemoryError) as exc:
                self.stage.drop_camera(cam)
                reason = str(exc) if isinstance(exc, TrackingError) else f"the saved tracker state of camera {cam!r} {exc}"
                self._commit(cam, Commit(state=b"", dead=[self._dead_state(state, reason)]))
        if self.identity is not None:
            saved: Any = self.client.get(key(self.pipeline, f"identitystate:{cam}"))
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
        log.info("worker %s took camera %s (token %d)", self.worker_id, cam, token_of(lease))

    def _dead_state(self, state: bytes, reason: str) -> tuple[bytes, str, str]:
        log.warning("worker %s: %s; dead-lettered, its tracks restart clean", self.worker_id, reason)
        self.dead_letters += 1
        # the first 64 KiB: enough to inspect a header, never a bomb's worth
        return (state[:65536], reason, SOURCE_STATE)

    def _give_back(self, cam: str, stop: threading.Event | None = None) -> None:
        lease = self.owned.get(cam)
        if lease is None:
            return
        state = self.stage.export_camera(cam) if self.stage.camera_time(cam) is not None else None
        identity = self.identity.export_state() if self.identity is not None else None
        if self._commit(cam, Commit(state=state, identity=identity), stop):
            self.fence.release(cam, lease)
            with self._lock:
                self.owned.pop(cam, None)
            self._cursor.pop(cam, None)
            self._unproven.discard(cam)
            self.stage.drop_camera(cam)

    # --- commits --------------------------------------------------------------------

    def _commit(self, cam: str, c: Commit, stop: threading.Event | None = None) -> bool:
        """Apply `c` for `cam` under its fencing token, retrying through outages; False
        when the token is stale (the camera is dropped) or `stop` came first."""
        stop = stop or self._run_stop
        while True:
            lease = self.owned.get(cam)
            if lease is None:
                return False
            try:
                ok = self.fence.commit(cam, work_key(self.pipeline, cam), lease, c)
                self.outage.up()
                break
            except redis.RedisError as exc:
                if not is_outage(exc):
                    raise
                self.outage.down(exc, stop)
                if stop is not None and stop.is_set():
                    return False
        if not ok:
            self.commits_refused += 1
            self._drop(cam, f"token {token_of(lease)} is stale (another worker took the camera over)")
        return ok

    # --- work ---------------------------------------------------------------------

    def _decode(self, cam: str, entries: list[tuple[Any, Any]], commit: Commit) -> list[tuple[Any, WorkItem]]:
        items: list[tuple[Any, WorkItem]] = []
        for eid, fields in entries:
            try:
                items.append((eid, decode_entry(fields or {}, camera=cam, max_bytes=self.settings.max_window_bytes,
                                                max_pixels=self.settings.max_frame_pixels)))
            except PoisonEntry as exc:
                e = eid.decode() if isinstance(eid, bytes) else str(eid)
                reason = f"work entry {e} of camera {cam!r} {exc}"
                log.warning("worker %s: %s; dead-lettered, the camera goes on", self.worker_id, reason)
                self.dead_letters += 1
                commit.dead.append((describe_entry(fields or {}).encode(), reason, SOURCE_WORK))
                commit.ids.append(eid)
        return items

    def _track(self, cam: str, item: WorkItem, answers: list[tuple[Query, Grounding, float]], commit: Commit,
               state: bytes | None) -> None:
        """Feed one window's answers to the trackers; poison state or window dead-lettered."""
        assert item.window is not None
        pairs = [( *_restore_sizes(item, g), q, ms) for q, g, ms in answers]
        if cam in self._unproven:
            t_state = self.stage.camera_time(cam)
            t_new = max((f.pts for f in item.window.frames if f.camera == cam), default=None)
            if t_state is not None and t_new is not None and t_new <= t_state:
                self._reset_state(cam, commit, state, f"the saved tracker state of camera {cam!r} is at t={t_state:.3f} s, "
                                  f"ahead of the camera's next window (t={t_new:.3f} s): time would go back")
        for attempt in (0, 1):
            mark = len(self._events)
            try:
                for w, g, q, ms in pairs:
                    fed = self.stage.process(w, q, g, ms)
                    if self.identity is not None:
                        self.identity.observe(w, q, fed)
                self._unproven.discard(cam)
                return
            except (TrackingError, ValueError, TypeError, IndexError, KeyError, MemoryError) as exc:
                del self._events[mark:]
                if attempt == 0 and cam in self._unproven:
                    self._reset_state(cam, commit, state, f"the saved tracker state of camera {cam!r} breaks the tracker "
                                      f"({mask_text(str(exc))})")
                    continue
                reason = f"window {item.window.id} of camera {cam!r} breaks the tracker ({mask_text(str(exc))})"
                log.warning("worker %s: %s; dead-lettered, the camera goes on", self.worker_id, reason)
                self.dead_letters += 1
                meta = {"id": item.window.id, "frames": [[f.index, f.pts] for f in item.window.frames]}
                commit.dead.append((json.dumps(meta).encode(), reason, SOURCE_WORK))
                return

    def _reset_state(self, cam: str, commit: Commit, state: bytes | None, reason: str) -> None:
        self._unproven.discard(cam)
        self.stage.drop_camera(cam)
        commit.dead.append(self._dead_state(state or b"", reason))

    def _process(self, cam: str, entries: list[tuple[Any, Any]], stop: threading.Event | None = None) -> None:
        if not entries:
            return
        commit = Commit()
        state_before: bytes | None = None
        if cam in self._unproven:
            state_before = self.client.get(key(self.pipeline, f"trackstate:{cam}"))  # type: ignore[assignment]
        items = self._decode(cam, entries, commit)
        windows = [(eid, it) for eid, it in items if not it.is_end]
        requests = [(it.window, q) for _eid, it in windows for q in self.queries]
        failed: set[int] = set()
        answers: dict[int, list[tuple[Query, Grounding, float]]] = {}
        for chunk, groundings, elapsed in ground_in_chunks(self.engine, requests, self.config.engine.batch_size,  # type: ignore[arg-type]
                                                            self.failures, lambda w: failed.add(id(w))):
            ms = elapsed * 1000.0 / max(1, len(chunk))
            for (w, q), g in zip(chunk, groundings, strict=True):
                answers.setdefault(id(w), []).append((q, g, ms))
        for eid, it in items:
            commit.ids.append(eid)
            if it.is_end:
                self.stage.finish_camera(cam)
                self._unproven.discard(cam)
            elif id(it.window) not in failed:
                self._track(cam, it, answers.get(id(it.window), []), commit, state_before)
        if self.identity is not None:
            self.identity.ask(self.engine, self.config.engine.batch_size)  # correspondence requests of this batch
            commit.identity = self.identity.export_state()
        commit.grounded = len(windows) - len(failed)
        commit.failed = len(failed)
        commit.state = self.stage.export_camera(cam) if self.stage.camera_time(cam) is not None else b""
        events = list(self._events)
        self._events.clear()  # in place: the stage appends to this very list
        commit.events = [e.to_json() for e in events]
        if not self._commit(cam, commit, stop):
            return
        last = entries[-1][0]
        self._cursor[cam] = last.decode() if isinstance(last, bytes) else str(last)
        self.windows_grounded += commit.grounded
        for e in events:
            for s in self.sinks:
                s.publish(e)
            if self.metrics:
                self.metrics.events.labels(e.kind).inc()
        if self.metrics:
            self.metrics.windows_grounded.labels(cam).inc(commit.grounded)
            if commit.failed:
                self.metrics.windows_failed.labels(cam).inc(commit.failed)

    def run(self, stop: threading.Event, *, block_ms: int = 200) -> None:
        """Work until `stop` is set, through Redis outages; gives its cameras back on the way out."""
        self._run_stop = stop
        hb_stop = threading.Event()
        hb = threading.Thread(target=self._heartbeat_loop, args=(hb_stop,), name="streamvg-lease-heartbeat", daemon=True)
        hb.start()
        next_balance = 0.0
        try:
            while not stop.is_set():
                try:
                    self._drop_lost()
                    now = time.monotonic()
                    if now >= next_balance:
                        self._balance()
                        next_balance = now + self.heartbeat_s
                    if not self.owned:
                        self.outage.up()
                        stop.wait(block_ms / 1000.0)
                        continue
                    streams = {work_key(self.pipeline, c): self._cursor.get(c, "0-0") for c in sorted(self.owned)}
                    reply: Any = self.client.xread(streams, count=self.config.engine.batch_size, block=block_ms)  # type: ignore[arg-type]
                    self.outage.up()
                    for k, entries in reply or []:
                        cam = (k.decode() if isinstance(k, bytes) else k).rsplit(":", 1)[-1]
                        self._drop_lost()
                        if cam in self.owned:
                            self._process(cam, list(entries), stop)
                except redis.RedisError as exc:
                    if not is_outage(exc):
                        raise
                    self.outage.down(exc, stop)
        finally:
            hb_stop.set()
            hb.join(5)
            # Hand cameras back with their state, but never hang on a dead Redis at exit:
            # whatever is not handed back within 5 s moves when its lease expires.
            give_up = threading.Event()
            timer = threading.Timer(5.0, give_up.set)
            timer.start()
            for cam in list(self.owned):
                try:
                    self._give_back(cam, give_up)
                except redis.RedisError:
                    log.warning("worker %s: could not hand camera %s back; its lease will expire", self.worker_id, cam)
            timer.cancel()
            with contextlib.suppress(redis.RedisError):
                self.client.delete(key(self.pipeline, f"workers:{self.worker_id}"))
            for s in self.sinks:
                s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self.engine.close()
        self.client.close()
        self._hb_client.close()
        if self.metrics:
            self.metrics.close()
