"""The pipeline runtime: sources → windows → grounding engine → trackers → sinks.

```
 camera thread ×N ──windows──▶ WindowQueue ──▶ engine thread ──▶ trackers ──▶ sinks
 (decode, sample,   (bounded; live: freshest,   (batches windows     (one per     (Redis /
  make windows)      files: back-pressure)       × queries)          camera,query) JSONL)
```

Decoding runs on one thread per camera so a slow or dead camera never stalls another;
the engine runs on one thread and batches whatever windows are ready (up to
`engine.batch_size` requests, waiting at most `batch_wait_s` for more), across cameras
and queries. Live cameras keep only their freshest windows when the engine falls behind
(stale windows are dropped and counted), files are processed completely (the camera
thread blocks instead). Standing queries can be added and removed while it runs,
through `add_query` / `remove_query` or the Redis control stream
`streamvg:{pipeline}:control` (`send_query_command`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from streamvg.config import PipelineConfig, QueryConfig
from streamvg.errors import GroundingCancelled, StreamVGError
from streamvg.events import Event
from streamvg.gating import ChangeGate
from streamvg.grounding import Grounding, GroundingEngine, create_engine
from streamvg.pipeline.control import ControlFollower, query_from_config
from streamvg.pipeline.engine_stage import GroundingFailures, ground_in_chunks
from streamvg.pipeline.identity_stage import GlobalTrack, IdentityStage, global_tracks
from streamvg.pipeline.metrics import PipelineMetrics
from streamvg.pipeline.queue import WindowQueue
from streamvg.pipeline.tracking_stage import Segment, TrackingStage
from streamvg.redaction import mask_text, mask_url
from streamvg.sinks import JsonlSink, RedisSink
from streamvg.sources import SourceStatus, is_live, open_source
from streamvg.types import Frame, Query, Window
from streamvg.windows import MultiCameraWindows, windows

__all__ = ["WORK_KEYS", "CameraState", "Pipeline", "RunSummary", "Sink", "default_sinks", "unfinished_engine_threads"]

# What an engine reports per request in `Grounding.usage`, summed per camera and in total.
WORK_KEYS = ("images_encoded", "images_cached", "prefill_tokens", "generated_tokens")

log = logging.getLogger("streamvg.pipeline")


class Sink(Protocol):
    def publish(self, event: Event) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class CameraState:
    """What the terminal view and metrics show for one camera."""

    name: str
    uri: str
    live: bool
    state: str = "starting"
    detail: str = ""
    frames_in: int = 0
    frames_dropped: int = 0
    windows_made: int = 0
    windows_dropped: int = 0
    windows_grounded: int = 0
    windows_failed: int = 0
    last_latency_ms: float | None = None
    duration_s: float | None = None
    last_pts: float = 0.0
    reconnects: int = 0
    answers: int = 0  # (window, query) answers handled
    unparseable_answers: int = 0
    last_error: str = ""  # the last grounding error of this camera's windows (masked)
    # Model work (change gating, issue 18): windows not sent because nothing changed, and
    # what the engine did for this camera's windows (`Grounding.usage`).
    windows_unchanged: int = 0
    images_encoded: int = 0
    images_cached: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0


@dataclass

class RunSummary:
    """What a finished run did."""

    windows_grounded: int
    events_published: int
    segments: list[Segment]
    cameras: dict[str, CameraState]
    interrupted: bool
    elapsed_s: float
    unparseable_answers: int
    windows_failed: int = 0
    error: str | None = None  # why the run stopped early (the engine kept failing), else None
    answers: int = 0  # (window, query) answers handled, parsed or not
    # Delivery (summed over the sinks): events written to the outage spool, spooled events
    # later delivered, and events lost, by reason (`full`: spool cap, `disk`: the spool or
    # file could not be written, `corrupt`/`unreadable`: damaged spool records, `shutdown`:
    # produced after the sinks had closed).
    events_spooled: int = 0
    events_replayed: int = 0
    events_dropped: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)
    global_tracks: list[GlobalTrack] | None = None  # cross-camera identities (identity on), else None
    windows_unchanged: int = 0  # windows not sent to the engine because nothing changed
    work: dict[str, int] = field(default_factory=dict)  # WORK_KEYS totals: images encoded/cached, tokens



class Pipeline:
    """Runs a `PipelineConfig`: one thread per camera, one engine thread, trackers, sinks.

    Args:
        config: The pipeline file, already validated.
        engine: A ready engine; by default `create_engine(config.engine)`.
        sinks: Where events go; by default Redis when `sinks.redis` is set, JSONL when
            `sinks.jsonl` is set, and a JSONL file `streamvg-events.jsonl` otherwise.
        collect_segments: Keep a `Segment` per track (offline search).
        offline_tracking: With `collect_segments`: when a (camera, query) finishes, rebuild
            its segments from the offline tracking pass over every frame it was fed
            (`streamvg.tracking.offline`: each ambiguous pairing decided once the next
            updates are seen), so `segments()` / the summary carry the offline track ids.
            Events published during the run keep the live tracker's ids. With identity on,
            an offline segment's `global_id` is that of the live track most of its boxes
            belonged to (never one that a segment in view at the same time names; then an
            identity of its own).
        thumbnails_dir: Write one JPEG per segment with its best box drawn.
        batch_wait_s: How long the engine waits for more windows to fill a batch.
        metrics_port: Serve Prometheus metrics on this port.
        on_update: Called (from the engine or a camera thread) whenever progress changes.
        control: Follow the Redis control stream for query changes (when Redis is set).
        window_sink: Hand windows to this callable instead of grounding them (the
            scale-out ingest role puts them on Redis work streams).
        log_errors: Log cameras that cannot be opened or read and why grounding stopped
            (off when the caller reports the summary's camera details and `error` itself,
            as `streamvg search` does).
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        engine: GroundingEngine | None = None,
        sinks: Sequence[Sink] | None = None,
        collect_segments: bool = False,
        offline_tracking: bool = False,
        thumbnails_dir: str | Path | None = None,
        batch_wait_s: float = 0.05,
        metrics_port: int | None = None,
        on_update: Callable[[Pipeline], None] | None = None,
        control: bool = True,
        window_sink: Callable[[list[Window]], None] | None = None,
        log_errors: bool = True,
    ) -> None:
        self.config = config
        self._error_level = logging.ERROR if log_errors else logging.DEBUG
        self.window_sink = window_sink
        self.name = config.name
        self._engine = engine
        self._owns_engine = engine is None
        self._sinks: list[Sink] | None = list(sinks) if sinks is not None else None
        self._owns_sinks = sinks is None
        self.collect_segments = collect_segments
        self.thumbnails_dir = Path(thumbnails_dir) if thumbnails_dir else None
        self.batch_wait_s = batch_wait_s
        self.on_update = on_update
        self._control_enabled = control
        self.cameras: dict[str, CameraState] = {
            s.name: CameraState(name=s.name, uri=mask_url(s.uri), live=is_live(s.uri)) for s in config.sources
        }
        self._queries: dict[str, Query] = {q.id: query_from_config(q) for q in config.queries}
        self._queries_lock = threading.Lock()
        n_cams = max(1, len(config.sources))
        self._queue = WindowQueue(capacity=max(2 * config.engine.batch_size, 2 * n_cams, 4))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sources: dict[str, Any] = {}
        self._sources_lock = threading.Lock()
        self._cameras_running = 0
        self._cameras_running_lock = threading.Lock()
        # Cross-camera identity sits between the trackers and the sinks (global_id on events).
        self.identity = IdentityStage(config, publish=self._publish) if config.identity is not None else None
        self.processor = TrackingStage(
            config, publish=self.identity.publish if self.identity is not None else self._publish, model_name=lambda: self._engine.name if self._engine else "",
            collect_segments=collect_segments, offline_tracking=offline_tracking,
        )
        self._multi: MultiCameraWindows | None = None
        self._multi_lock = threading.Condition()
        self.windows_grounded = 0
        self.windows_unchanged = 0
        self.work: dict[str, int] = dict.fromkeys(WORK_KEYS, 0)
        self._gate: ChangeGate | None = ChangeGate(config.gating) if config.gating.active(config.engine.kind) else None
        self.events_published = 0
        self.unparseable_answers = 0
        self.answers = 0
        limit = config.engine.max_consecutive_failures
        if limit is None:
            limit = 0 if any(c.live for c in self.cameras.values()) else 5
        self.failures = GroundingFailures(limit or None)
        self._started_at = 0.0
        self._done = threading.Event()
        self._engine_error: BaseException | None = None
        self.metrics = PipelineMetrics(metrics_port, address=config.metrics.address) if metrics_port else None
        self._outputs_lock = threading.Lock()  # publishing vs closing the sinks
        self._outputs_closed = False
        self._lost_at_shutdown = 0

    # --- queries --------------------------------------------------------------------

    @property
    def queries(self) -> list[Query]:
        with self._queries_lock:
            return list(self._queries.values())

    def add_query(self, query: Query | QueryConfig) -> None:
        """Start asking `query` of every window from now on (replaces one with the same id)."""
        q = query_from_config(query)
        with self._queries_lock:
            self._queries[q.id] = q
        # Shortened: a long text in every log line costs more than it tells.
        log.info("query %s added: %r", q.id, q.text if len(q.text) <= 200 else q.text[:200] + "…")

    def remove_query(self, query_id: str) -> bool:
        """Stop asking query `query_id`; its open tracks end. Returns whether it existed."""
        with self._queries_lock:
            existed = self._queries.pop(query_id, None) is not None
        if existed:
            log.info("query %s removed", query_id)
            if self._gate is not None:
                self._gate.forget_query(query_id)
            self.processor.finish_query(query_id)
        return existed

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Pipeline:
        """Open the engine and sinks and start the camera and engine threads."""
        if self._engine is None and self.window_sink is None:
            self._engine = create_engine(self.config.engine)
        set_stop = getattr(self._engine, "set_stop_event", None)
        if callable(set_stop):
            set_stop(self._stop)  # stop() ends a running generate between tokens
        if self._sinks is None:
            self._sinks = default_sinks(self.config)
        if self.metrics:
            self.metrics.watch_sinks(self._sinks)
        if self.config.sampling.multi_camera:
            tol = self.config.sampling.tolerance_s or 0.5 / (self.config.sampling.fps or 25.0)
            live = any(c.live for c in self.cameras.values())
            self._multi = MultiCameraWindows(
                [s.name for s in self.config.sources], tolerance_s=tol, clock="wall" if live else "pts",
                offsets_s={s.name: s.start_s for s in self.config.sources if s.start_s} or None,
            )
        if self.identity is not None:
            self.identity.bind_engine(self._engine)
        self._started_at = time.monotonic()
        self._cameras_running = len(self.config.sources)
        for src in self.config.sources:
            t = threading.Thread(target=self._camera_loop, args=(src.name, src.uri, src.options), name=f"camera-{src.name}", daemon=True)
            self._threads.append(t)
        self._engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        self._threads.append(self._engine_thread)
        if self._control_enabled and self.config.sinks.redis is not None:
            follower = ControlFollower(
                self.config.sinks.redis.url, self.name, add=self.add_query, remove=self.remove_query, stop=self._stop,
                limits=self.config.control, query_count=lambda: len(self.queries),
                config_ids=[q.id for q in self.config.queries],
            )
            self._threads.append(threading.Thread(target=follower.run, name="control", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cameras, let the engine finish its batch, end tracks, flush and close sinks.

        `timeout` (seconds) bounds the wait for the camera and engine threads in all; a
        running `generate` stops at its next token (`set_stop_event`), and an engine still
        inside one model step after that is left to finish on its own
        (`unfinished_engine_threads`) rather than holding the stop up.
        """
        stop_started = time.monotonic()
        self._stop.set()
        with self._sources_lock:
            sources = list(self._sources.values())
        # Close every camera at once: one stuck connecting must not delay the others.
        closers = [threading.Thread(target=_close_quietly, args=(src,), daemon=True) for src in sources]
        for t in closers:
            t.start()
        for t in closers:
            t.join(2.5)
        self._queue.close()
        deadline = stop_started + timeout
        # Order: sources are closed; the engine finishes its batch and ends the tracks
        # (publishing); only then are the sinks flushed and closed.
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        engine_thread = getattr(self, "_engine_thread", None)
        if engine_thread is not None and engine_thread.is_alive():
            _remember_unfinished(engine_thread)
            log.warning("the engine was still computing %.1f s after the stop; its batch is abandoned", timeout)
        self._close_outputs(deadline)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every file source is processed (never for live sources unless stopped)."""
        return self._done.wait(timeout)

    def run(self) -> RunSummary:
        """Start, wait until all sources end (or Ctrl-C / `stop()`), shut down, summarise."""
        interrupted = False
        self.start()
        try:
            while not self._done.wait(0.2):
                if self._stop.is_set():
                    break
        except KeyboardInterrupt:
            interrupted = True
        self.stop()
        if self._engine_error is not None and not isinstance(self._engine_error, KeyboardInterrupt):
            raise self._engine_error
        return self.summary(interrupted=interrupted or (self._stop.is_set() and not self._done.is_set()))

    def summary(self, *, interrupted: bool = False) -> RunSummary:
        return RunSummary(
            windows_grounded=self.windows_grounded,
            events_published=self.events_published,
            segments=self.segments(),
            cameras=dict(self.cameras),
            interrupted=interrupted,
            elapsed_s=time.monotonic() - self._started_at if self._started_at else 0.0,
            unparseable_answers=self.unparseable_answers,
            answers=self.answers,
            windows_failed=self.failures.total,
            windows_unchanged=self.windows_unchanged,
            work=dict(self.work),
            error=mask_text(str(self._engine_error)) if self._engine_error is not None
            and not isinstance(self._engine_error, KeyboardInterrupt) else None,
            **self.delivery(),
            global_tracks=self.global_tracks() if self.identity is not None else None,
        )

    def delivery(self) -> dict[str, Any]:
        """The sinks' delivery counts summed: events_spooled, events_replayed, events_dropped
        and dropped_by_reason (see `RunSummary`)."""
        spooled = replayed = 0
        reasons: dict[str, int] = {}
        for sink in self._sinks or ():
            for part in getattr(sink, "sinks", None) or [sink]:  # a FanoutSink's members
                st = getattr(part, "stats", None)
                spooled += int(getattr(st, "spooled", 0))
                replayed += int(getattr(st, "replayed", 0))
                for k, v in (getattr(st, "dropped_by_reason", None) or {}).items():
                    reasons[k] = reasons.get(k, 0) + int(v)
        if self._lost_at_shutdown:
            reasons["shutdown"] = self._lost_at_shutdown
        reasons = {k: v for k, v in reasons.items() if v}
        return {"events_spooled": spooled, "events_replayed": replayed,
                "events_dropped": sum(reasons.values()), "dropped_by_reason": reasons}

    def segments(self) -> list[Segment]:
        segs = self.processor.segments()
        if self.identity is not None:
            for seg in segs:
                seg.global_id = self._global_id(seg)
        return segs

    def _global_id(self, seg: Segment) -> int:
        """A segment's cross-camera identity. Identities are keyed by live track ids: an
        offline segment takes that of the live track most of its boxes had, never one that
        a segment in view at the same time took (one left without a live id gets an identity
        of its own)."""
        assert self.identity is not None
        live = seg.live_track_id if seg.live_track_id is not None else -1 - seg.track_id  # -1 - id: no live track
        return self.identity.global_id(seg.query_id, seg.camera, live)

    def global_tracks(self) -> list[GlobalTrack]:
        """Search segments grouped by cross-camera identity (empty without `identity`)."""
        if self.identity is None:
            return []
        segs = self.processor.segments()
        gids = {(s.query_id, s.camera, s.track_id): self._global_id(s) for s in segs}
        return global_tracks(segs, lambda q, c, t: gids[(q, c, t)])

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- camera threads -------------------------------------------------------------

    def _on_status(self, status: SourceStatus) -> None:
        cam = self.cameras.get(status.camera)
        if cam is None:
            return
        if status.state == "up" and cam.state in ("down", "stalled"):
            cam.reconnects += 1
        cam.state = status.state
        cam.detail = mask_text(status.detail)
        self._publish(Event.source_status(
            pipeline=self.name, camera=status.camera, state=status.state,
            detail=cam.detail, wall_time=status.wall_time,
        ))
        if self.metrics:
            self.metrics.camera_up.labels(status.camera).set(1 if status.state == "up" else 0)
        self._notify()

    def _camera_loop(self, name: str, uri: str, options: dict[str, Any]) -> None:
        cam = self.cameras[name]
        s = self.config.sampling
        try:
            src = open_source(
                uri, fps=s.fps, snap=s.snap, tolerance_s=s.tolerance_s, camera=name,
                on_status=self._on_status, max_pixels=s.max_frame_pixels, **options,
            )
        except StreamVGError as exc:
            cam.state, cam.detail = "failed", mask_text(str(exc))
            log.log(self._error_level, "camera %s: %s", name, cam.detail)
            self._camera_finished(name)
            return
        with self._sources_lock:
            self._sources[name] = src
        info = getattr(src, "info", None)
        cam.duration_s = getattr(info, "duration_s", None)
        if cam.state == "starting":
            cam.state = "up"
        try:
            frames = self._count_frames(name, src)
            if self._multi is not None:
                for frame in frames:
                    with self._multi_lock:
                        if not cam.live:
                            self._wait_for_other_cameras(name)
                        ready = self._multi.push(frame)
                        self._multi_lock.notify_all()
                    for w in ready:
                        self._enqueue(name, w)
            else:
                for w in windows(frames, s.window_size, s.stride):
                    if not self._enqueue(name, w):
                        break
        except StreamVGError as exc:
            cam.state, cam.detail = "failed", mask_text(str(exc))
            log.log(self._error_level, "camera %s: %s", name, cam.detail)
        except Exception as exc:
            if not self._stop.is_set():
                cam.state, cam.detail = "failed", mask_text(str(exc))
                log.exception("camera %s stopped unexpectedly", name)
        finally:
            stats = getattr(src, "stats", None)
            if stats is not None:
                cam.frames_dropped = int(getattr(stats, "frames_dropped", 0))
            if cam.state not in ("failed",):
                cam.state = "ended" if not self._stop.is_set() else "stopped"
            try:
                src.close()
            except Exception:
                log.debug("closing camera %s failed", name, exc_info=True)
            self._camera_finished(name)

    def _wait_for_other_cameras(self, name: str, limit_s: float = 2.0) -> None:
        """Files in multi-camera windows: a camera half a buffer ahead of the others waits
        (at most `limit_s`, so a camera that never starts cannot stall it), instead of
        forcing groups out before the others' frames arrive. Keeps windows the same from run
        to run whatever the decoding speed. Called with `_multi_lock` held."""
        assert self._multi is not None
        deadline = time.monotonic() + limit_s
        while (
            self._multi.pending(name) >= self._multi.max_buffer // 2
            and not self._stop.is_set()
            and time.monotonic() < deadline
        ):
            self._multi_lock.wait(0.05)

    def _count_frames(self, name: str, frames: Iterable[Frame]) -> Iterable[Frame]:
        cam = self.cameras[name]
        for frame in frames:
            if self._stop.is_set():
                return
            cam.frames_in += 1
            cam.last_pts = frame.pts
            if self.metrics:
                self.metrics.frames_in.labels(name).inc()
            yield frame

    def _enqueue(self, name: str, window: Window) -> bool:
        cam = self.cameras[name]
        cam.windows_made += 1
        dropped = self._queue.put(window, live=cam.live, stop=self._stop)
        if dropped is not None:
            dcam = self.cameras.get(dropped.frames[0].camera, cam)
            dcam.windows_dropped += 1
            if self.metrics:
                self.metrics.windows_dropped.labels(dcam.name).inc()
        self._notify()
        return not self._stop.is_set()

    def _camera_finished(self, name: str) -> None:
        if self._multi is not None:
            # This camera ended (or never opened): groups that waited only for it can go now,
            # and the others must not wait for its frames.
            with self._multi_lock:
                ready = self._multi.flush(name)
                self._multi_lock.notify_all()
            for w in ready:
                self._enqueue(name, w)
        with self._cameras_running_lock:
            self._cameras_running -= 1
            last = self._cameras_running == 0
        if last:
            self._queue.close()
        self._notify()

    # --- engine thread --------------------------------------------------------------

    def _engine_loop(self) -> None:
        batch_size = self.config.engine.batch_size
        try:
            while not self._stop.is_set():  # stop(): finish the batch in hand, not the queue
                queries = self.queries
                max_windows = max(1, batch_size // max(1, len(queries)))
                batch = self._queue.get_batch(max_windows, wait_s=self.batch_wait_s, timeout=0.2)
                if not batch:
                    if self._queue.closed and len(self._queue) == 0:
                        break
                    continue
                if self.window_sink is not None:
                    self.window_sink(batch)
                    self._count_grounded(batch)
                    continue
                if not queries:
                    continue
                assert self._engine is not None
                if self._ground_batch(batch, queries, batch_size):
                    break  # stop() cut a generate short: what was answered is counted, then end
            self.processor.finish_all()
        except BaseException as exc:
            self._engine_error = exc
            log.log(self._error_level, "grounding stopped: %s", mask_text(str(exc)))
            self._stop.set()
        finally:
            self._done.set()
            self._notify()

    def _ground_batch(self, batch: list[Window], queries: list[Query], batch_size: int) -> bool:
        """Gate, ground and hand on one batch of windows, in window order; True when
        `stop()` cut a `generate` short (the run then ends).

        The change gate (`streamvg.gating`) keeps unchanged windows from the engine; their
        frames are carried over (trackers hold, the last answer repeats). Results are handed
        to the trackers in the windows' order, so a camera's carried-over frames and
        grounded frames reach its trackers in time order."""
        qids = [q.id for q in queries]
        gate = self._gate
        send = [w for w in batch if gate is None or gate.check(w, qids).ground]
        sent = {id(w) for w in send}
        requests = [(w, q) for w in send for q in queries]
        log.debug("grounding %d request(s) of %d window(s)", len(requests), len(send))
        failed: set[int] = set()  # ids of windows whose grounding failed
        answers: dict[int, list[tuple[Query, Grounding, float]]] = {}
        cancelled = False
        try:
            for chunk, groundings, elapsed in ground_in_chunks(
                self._engine, requests, batch_size, self.failures, functools.partial(self._count_failed, failed)  # type: ignore[arg-type]
            ):
                if self.metrics:
                    self.metrics.engine_latency.observe(elapsed)
                for (w, q), g in zip(chunk, groundings, strict=True):
                    answers.setdefault(id(w), []).append((q, g, elapsed * 1000.0 / len(chunk)))
        except GroundingCancelled:  # the cut answer is dropped: neither grounded nor failed
            log.debug("grounding stopped between tokens: the run is stopping")
            cancelled = True
        for w in batch:
            if id(w) not in sent:
                for q in queries:
                    self.processor.carry_over(w, q)
                continue
            for q, g, latency_ms in answers.get(id(w), ()):
                self._handle(w, q, g, latency_ms)
                self._count_work(w, g)
            if id(w) in failed and gate is not None:
                for cam in set(w.cameras):
                    gate.forget(cam)  # its answer is missing: look again at the next window
        if self.identity is not None and not cancelled:
            self.identity.ask(self._engine, batch_size)  # type: ignore[arg-type]  # correspondence requests of this batch
        self._count_unchanged([w for w in batch if id(w) not in sent])
        done = [w for w in send if id(w) not in failed and (not cancelled or id(w) in answers)]
        self._count_grounded(done)
        return cancelled

    def _count_unchanged(self, windows: list[Window]) -> None:
        for w in windows:
            name = w.frames[0].camera
            cam = self.cameras.get(name)
            if cam is not None:
                cam.windows_unchanged += 1
            self.windows_unchanged += 1
            if self.metrics:
                self.metrics.windows_unchanged.labels(name).inc()

    def _count_work(self, window: Window, g: Grounding) -> None:
        """Add the engine's work for one request (`Grounding.usage`) to its camera and the total."""
        usage = getattr(g, "usage", None)
        if not usage:
            return
        name = window.frames[0].camera
        cam = self.cameras.get(name)
        for key in WORK_KEYS:
            n = int(usage.get(key, 0))
            if not n:
                continue
            self.work[key] += n
            if cam is not None:
                setattr(cam, key, getattr(cam, key) + n)
            if self.metrics:
                self.metrics.work[key].labels(name).inc(n)

    def _count_failed(self, failed: set[int], window: Window) -> None:
        failed.add(id(window))
        cam = self.cameras.get(window.frames[0].camera)
        if cam is not None:
            cam.windows_failed += 1
            cam.last_error = self.failures.last_error
        if self.metrics:
            self.metrics.windows_failed.labels(window.frames[0].camera).inc()

    def _count_grounded(self, batch: list[Window]) -> None:
        for w in batch:
            cam = self.cameras.get(w.frames[0].camera)
            if cam is not None:
                cam.windows_grounded += 1
            self.windows_grounded += 1
            if self.metrics:
                self.metrics.windows_grounded.labels(w.frames[0].camera).inc()
        self._notify()

    def _handle(self, window: Window, query: Query, g: Grounding, latency_ms: float) -> None:
        self.answers += 1
        cam0 = self.cameras.get(window.frames[0].camera)
        if not g.parse_ok:
            self.unparseable_answers += 1
            if cam0 is not None:
                cam0.unparseable_answers += 1
        fed = self.processor.process(window, query, g, latency_ms)
        if self.identity is not None:
            self.identity.observe(window, query, fed)
        if cam0 is not None:
            cam0.answers += 1
            cam0.last_latency_ms = latency_ms

    # --- outputs --------------------------------------------------------------------

    def _publish(self, event: Event) -> None:
        with self._outputs_lock:
            if self._outputs_closed:
                # Produced after shutdown closed the sinks (the engine outlived stop()'s
                # deadline): counted, logged once, never raised into the engine thread.
                self._lost_at_shutdown += 1
                if self._lost_at_shutdown == 1:
                    log.warning("an event was produced after the sinks closed; it is dropped and counted "
                                "(dropped_by_reason.shutdown)")
                return
            for sink in self._sinks or ():
                sink.publish(event)
        self.events_published += 1
        if self.metrics:
            self.metrics.events.labels(event.kind).inc()

    def _close_outputs(self, deadline: float | None = None) -> None:
        """Last step of shutdown, after sources stopped and the engine drained: flush and
        close the sinks (a spool replay gets what is left of `deadline`), then the engine."""
        if self.thumbnails_dir is not None:
            self._write_thumbnails()
        with self._outputs_lock:
            sinks = [] if self._outputs_closed else list(self._sinks or ())
            self._outputs_closed = True
        for sink in sinks:
            try:
                sink.flush()
                if self._owns_sinks:
                    left = 1.0 if deadline is None else max(0.5, deadline - time.monotonic())
                    if isinstance(sink, RedisSink):
                        sink.close(drain_timeout_s=left)
                    else:
                        sink.close()
            except Exception as exc:  # one failing sink must not keep the others open
                log.error("closing sink %r failed: %s", sink, mask_text(str(exc)))
        if self._owns_engine and self._engine is not None:
            self._engine.close()
        if self.metrics:
            self.metrics.close()

    def _write_thumbnails(self) -> None:
        import cv2

        assert self.thumbnails_dir is not None
        self.thumbnails_dir.mkdir(parents=True, exist_ok=True)
        for seg in self.processor.segments():
            if seg.best_frame is None or seg.thumbnail:
                continue
            img = cv2.cvtColor(seg.best_frame, cv2.COLOR_RGB2BGR)
            x1, y1, x2, y2 = (round(v) for v in seg.best_xyxy)
            cv2.rectangle(img, (x1, y1), (x2, y2), (0, 255, 255), 2)
            label = f"{seg.query_id} #{seg.track_id} {seg.best_score:.2f}"
            cv2.putText(img, label, (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
            path = self.thumbnails_dir / f"{seg.camera}_{seg.query_id}_{seg.track_id}_{seg.best_t:.2f}s.jpg"
            cv2.imwrite(str(path), img)
            seg.thumbnail = str(path)

    def _notify(self) -> None:
        if self.on_update is not None:
            try:
                self.on_update(self)
            except Exception:
                log.debug("progress callback failed", exc_info=True)

# Engine threads still running after their pipeline's stop() timed out (a long model step).
# They are daemon threads: left running while the interpreter exits, torch's threads abort
# the process ("terminate called without an active exception"). With the stop event set
# they end at the next generated token, so at exit they are waited for; a caller that
# cannot wait (the CLI, which must exit promptly) ends the process with os._exit instead.
_UNFINISHED: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_UNFINISHED_LOCK = threading.Lock()
_AT_EXIT_WAIT_S = 60.0


def _remember_unfinished(thread: threading.Thread) -> None:
    with _UNFINISHED_LOCK:
        first = not _UNFINISHED
        _UNFINISHED.add(thread)
    if first:
        atexit.register(_join_unfinished_at_exit)


def unfinished_engine_threads() -> list[threading.Thread]:
    """Engine threads of stopped pipelines that are still running (their batch abandoned)."""
    with _UNFINISHED_LOCK:
        return [t for t in _UNFINISHED if t.is_alive()]


def _join_unfinished_at_exit() -> None:
    deadline = time.monotonic() + _AT_EXIT_WAIT_S
    for t in unfinished_engine_threads():
        t.join(max(0.0, deadline - time.monotonic()))


def _close_quietly(src: Any) -> None:
    try:
        src.close()
    except Exception:  # a camera that fails to close must not block shutdown
        log.debug("closing a source failed", exc_info=True)


def default_sinks(config: PipelineConfig) -> list[Sink]:
    """Redis, JSONL and MQTT as configured; JSONL `streamvg-events.jsonl` when none is."""
    sinks: list[Sink] = []
    r = config.sinks.redis
    if r is not None:
        sinks.append(RedisSink(r.url, config.name, maxlen=r.maxlen, spool_dir=r.spool_dir, stream=r.stream, spool_max_bytes=r.spool_max_bytes))
    if config.sinks.jsonl is not None:
        sinks.append(JsonlSink(config.sinks.jsonl.path, fsync=config.sinks.jsonl.fsync))
    m = config.sinks.mqtt
    if m is not None:
        from streamvg.sinks.mqtt import MqttSink  # paho-mqtt is an optional extra

        sinks.append(MqttSink(m.url, config.name, topic=m.topic, qos=m.qos, retain=m.retain, client_id=m.client_id,
                              spool_dir=m.spool_dir, spool_max_bytes=m.spool_max_bytes))
    if not sinks:
        sinks.append(JsonlSink("streamvg-events.jsonl"))
    return sinks


