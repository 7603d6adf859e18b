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

import functools
import io
import json
import logging
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import numpy as np

from streamvg.config import PipelineConfig, QueryConfig
from streamvg.errors import GroundingError, StreamVGError, TrackingError
from streamvg.events import Event
from streamvg.grounding import Grounding, GroundingEngine, create_engine
from streamvg.redaction import mask_text, mask_url
from streamvg.sinks import JsonlSink, RedisSink
from streamvg.sources import SourceStatus, is_live, open_source
from streamvg.tracking import Tracker
from streamvg.types import Detections, Frame, Query, Window
from streamvg.windows import MultiCameraWindows, windows

__all__ = [
    "CameraState",
    "GroundingFailures",
    "Pipeline",
    "RunSummary",
    "Segment",
    "Sink",
    "send_query_command",
]

log = logging.getLogger(__name__)

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


@dataclass
class Segment:
    """One appearance of a tracked object: a track of one query in one video/camera.

    Times are media seconds. `best_*` describe the highest-scoring box of the track.
    """

    camera: str
    video: str
    query_id: str
    query: str
    track_id: int
    start_s: float
    end_s: float
    best_t: float
    best_xyxy: list[float]
    best_score: float
    hits: int = 1
    thumbnail: str | None = None
    best_frame: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "video": self.video,
            "camera": self.camera,
            "query_id": self.query_id,
            "query": self.query,
            "track_id": self.track_id,
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "best_t": round(self.best_t, 3),
            "best_xyxy": [round(v, 1) for v in self.best_xyxy],
            "best_score": round(self.best_score, 4),
            "hits": self.hits,
            "thumbnail": self.thumbnail,
        }


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


class GroundingFailures:
    """Windows whose grounding raised: skipped and counted, not fatal, up to a limit.

    A model server restarting or one out-of-memory batch must not end a monitor that
    watches cameras for days, so a failed batch's windows are skipped (their frames go
    ungrounded; trackers bridge the gap like a missed detection). `limit` failed windows in
    a row end the run instead (None: never), so a search whose engine cannot work at all
    stops with the reason rather than skipping every window. Logging is one line when a
    burst starts, one every `log_every_s` while it lasts, and one when grounding recovers.
    """

    def __init__(self, limit: int | None, *, log_every_s: float = 30.0) -> None:
        self.limit = limit
        self.log_every_s = log_every_s
        self.total = 0
        self.consecutive = 0
        self.last_error = ""
        self._last_log = 0.0

    def failed(self, windows: int, exc: BaseException) -> bool:
        """Count `windows` skipped because of `exc`; True when the limit is reached."""
        self.total += windows
        self.consecutive += windows
        self.last_error = mask_text(str(exc) or type(exc).__name__)
        now = time.monotonic()
        if self.consecutive == windows:
            log.warning("grounding failed, skipping %d window(s): %s", windows, self.last_error)
            self._last_log = now
        elif now - self._last_log >= self.log_every_s:
            log.warning("grounding still failing: %d window(s) skipped in a row; last error: %s",
                        self.consecutive, self.last_error)
            self._last_log = now
        log.debug("grounding failure", exc_info=exc)
        return self.limit is not None and self.consecutive >= self.limit

    def succeeded(self) -> None:
        if self.consecutive:
            log.info("grounding recovered after %d skipped window(s)", self.consecutive)
        self.consecutive = 0

    def give_up_message(self) -> str:
        return (f"grounding failed for {self.consecutive} windows in a row, so the run stopped; "
                f"last error: {self.last_error}")


def ground_in_chunks(
    engine: GroundingEngine,
    requests: list[tuple[Window, Query]],
    batch_size: int,
    failures: GroundingFailures,
    on_failed: Callable[[Window], None],
) -> Iterator[tuple[list[tuple[Window, Query]], list[Grounding], float]]:
    """Ground `requests` `batch_size` at a time; yield `(chunk, groundings, seconds)` for
    each chunk the engine answered. A chunk that raises is skipped: each of its windows is
    passed to `on_failed` once and counted in `failures`, which raises `GroundingError`
    (the run stops) when its limit of failures in a row is reached."""
    failed: set[int] = set()  # windows (by id) already reported
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        t0 = time.perf_counter()
        try:
            groundings = engine.ground_many(chunk)
        except Exception as exc:  # skipped and counted, not fatal: see GroundingFailures
            newly = {id(w): w for w, _q in chunk if id(w) not in failed}
            failed.update(newly)
            for w in newly.values():
                on_failed(w)
            if newly and failures.failed(len(newly), exc):
                raise GroundingError(failures.give_up_message()) from exc
            continue
        failures.succeeded()
        yield chunk, groundings, time.perf_counter() - t0


class WindowQueue:
    """A bounded FIFO of windows shared by the camera threads and the engine thread.

    `put(window, live=True)` never blocks: when full it drops the oldest window of the same
    camera (or the oldest overall) so a slow engine always sees fresh frames.
    `put(window, live=False)` blocks while full (files are processed completely).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Window] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, window: Window, *, live: bool, stop: threading.Event) -> Window | None:
        """Queue `window`; returns the window dropped to make room (live), if any."""
        with self._cond:
            dropped: Window | None = None
            if live:
                if len(self._items) >= self.capacity:
                    cam = window.frames[0].camera
                    for i, w in enumerate(self._items):
                        if w.frames[0].camera == cam:
                            dropped = w
                            del self._items[i]
                            break
                    else:
                        dropped = self._items.popleft()
            else:
                while len(self._items) >= self.capacity and not stop.is_set():
                    self._cond.wait(0.1)
                if stop.is_set():
                    return None
            self._items.append(window)
            self._cond.notify_all()
            return dropped

    def get_batch(self, max_items: int, *, wait_s: float, timeout: float) -> list[Window]:
        """Up to `max_items` windows: waits up to `timeout` for the first, then at most
        `wait_s` for more to arrive."""
        with self._cond:
            deadline = time.monotonic() + timeout
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return []
                self._cond.wait(left)
            if len(self._items) < max_items and wait_s > 0:
                fill_deadline = time.monotonic() + wait_s
                while len(self._items) < max_items and not self.closed:
                    # Once every camera has ended nothing more will come: no waiting.
                    left = fill_deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._cond.notify_all()
            return batch

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


def _query_from_config(q: QueryConfig | Query) -> Query:
    if isinstance(q, Query):
        return q
    return Query(id=q.id, text=q.text, mode=q.mode, min_score=q.min_score)


_TRACKSTATE_FORMAT = "streamvg.trackstate/v1"


@dataclass(frozen=True)
class _FrameInfo:
    """What track events need of a frame (its picture stays out of tracker state)."""

    camera: str
    index: int
    pts: float
    size: tuple[int, int]
    wall_time: float | None


class TrackingStage:
    """Grounding answers → per-(camera, query) trackers → events (and search segments).

    Shared by the all-in-one `Pipeline` and the scale-out ground workers. Frames that
    overlapping windows share are fed to the tracker and published once: the first
    window that contains a frame decides its boxes.
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        publish: Callable[[Event], None],
        model_name: Callable[[], str],
        collect_segments: bool = False,
    ) -> None:
        self.config = config
        self.pipeline = config.name
        self._publish = publish
        self._model_name = model_name
        self.collect_segments = collect_segments
        self._videos = {s.name: mask_url(s.uri) for s in config.sources}
        self._trackers: dict[tuple[str, str], Tracker] = {}
        self._last_fed: dict[tuple[str, str], float] = {}
        self._last_frame: dict[tuple[str, str], _FrameInfo] = {}
        self._queries: dict[tuple[str, str], Query] = {}
        self._segments: dict[tuple[str, str, int], Segment] = {}
        self._lock = threading.RLock()

    def process(self, window: Window, query: Query, g: Grounding, latency_ms: float | None) -> None:
        """Publish the window's new frames' groundings and feed them to the trackers."""
        dets = g.detections
        if query.min_score > 0 and len(dets):
            dets = dets[dets.score >= query.min_score]
        order = sorted(range(len(window.frames)), key=lambda k: window.frames[k].pts)
        with self._lock:
            for k in order:
                frame = window.frames[k]
                key = (frame.camera, query.id)
                last = self._last_fed.get(key)
                if last is not None and frame.pts <= last:
                    # Already fed through an overlapping window. Sources keep media time
                    # non-decreasing, across live reconnects too, so nothing is skipped.
                    continue
                frame_dets = dets[dets.image_index == k] if len(dets) else dets
                self._publish(Event.grounding(
                    pipeline=self.pipeline, camera=frame.camera, query_id=query.id, query=query.text, t=frame.pts,
                    frame_index=frame.index, frame_size=frame.size, detections=frame_dets, model=g.model,
                    wall_time=frame.wall_time, latency_ms=None if frame.wall_time is not None else latency_ms,
                ))
                tracker = self._trackers.get(key)
                if tracker is None:
                    tracker = self._trackers[key] = Tracker(self.config.tracker)
                self._queries[key] = query
                tracked = tracker.update(
                    Detections(frame_dets.xyxy, frame_dets.score, np.zeros(len(frame_dets), np.int64)), frame.pts
                )
                self._last_fed[key] = frame.pts
                info = self._last_frame[key] = _FrameInfo(
                    frame.camera, frame.index, frame.pts, frame.size, frame.wall_time
                )
                self._publish_track_events(tracker, info, query, g.model, k)
                if self.collect_segments and len(tracked):
                    self._update_segments(frame, query, tracked, tracker)

    def _publish_track_events(
        self, tracker: Tracker, frame: _FrameInfo, query: Query, model: str, image_index: int
    ) -> None:
        for ev in tracker.pop_events():
            if ev.kind == "lost":
                continue  # internal: the track either comes back (update) or ends
            self._publish(Event.track(
                ev.kind, pipeline=self.pipeline, camera=frame.camera, query_id=query.id, query=query.text,
                track_id=int(ev.track_id), t=float(ev.t), xyxy=ev.xyxy, score=float(ev.score),
                frame_index=frame.index if ev.t == frame.pts else None,
                frame_size=frame.size, image_index=image_index, model=model, wall_time=frame.wall_time,
            ))

    def finish(self, key: tuple[str, str]) -> None:
        """End every track of (camera, query) and publish their `track_end`."""
        with self._lock:
            tracker = self._trackers.pop(key, None)
            frame = self._last_frame.pop(key, None)
            t = self._last_fed.pop(key, None)
            query = self._queries.pop(key, None)
            if tracker is None or t is None:
                return
            tracker.finish(t)
            if frame is not None and query is not None:
                self._publish_track_events(tracker, frame, query, self._model_name(), 0)

    def finish_query(self, query_id: str) -> None:
        with self._lock:
            for key in [k for k in self._trackers if k[1] == query_id]:
                self.finish(key)

    def finish_all(self) -> None:
        with self._lock:
            for key in list(self._trackers):
                self.finish(key)

    def export_camera(self, camera: str) -> bytes:
        """The tracker state of one camera (all its queries), for hand-over to another worker.

        An `.npz` archive of plain arrays plus a JSON header (format `streamvg.trackstate/v1`),
        read back with `allow_pickle=False`: whoever can write to Redis cannot make a worker
        run code. Frames are kept as metadata only, so the state stays a few KB.
        """
        with self._lock:
            entries: list[dict[str, Any]] = []
            arrays: dict[str, np.ndarray] = {}
            for key, tracker in self._trackers.items():
                if key[0] != camera:
                    continue
                meta, tracker_arrays = tracker.state()
                frame, query = self._last_frame.get(key), self._queries.get(key)
                arrays.update({f"{len(entries)}.{name}": a for name, a in tracker_arrays.items()})
                entries.append({
                    "query_id": key[1],
                    "tracker": meta,
                    "last_fed": self._last_fed.get(key),
                    "frame": None if frame is None else asdict(frame),
                    "query": None if query is None else asdict(query),
                })
        header = json.dumps({"format": _TRACKSTATE_FORMAT, "camera": camera, "entries": entries}).encode()
        buf = io.BytesIO()
        arrays["header"] = np.frombuffer(header, np.uint8)
        np.savez(buf, **cast(dict[str, Any], arrays))  # cast: savez's stubs type ** as its own flags
        return buf.getvalue()

    def import_camera(self, camera: str, data: bytes) -> None:
        """Adopt a camera's tracker state saved by `export_camera`.

        Raises:
            TrackingError: `data` is not such a state (corrupt, or written by another version).
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                header = json.loads(archive["header"].tobytes())
                if header.get("format") != _TRACKSTATE_FORMAT:
                    raise ValueError(f"format {header.get('format')!r}, expected {_TRACKSTATE_FORMAT!r}")
                restored = []
                for i, e in enumerate(header["entries"]):
                    prefix = f"{i}."
                    arrays = {k[len(prefix) :]: archive[k] for k in archive.files if k.startswith(prefix)}
                    f, q = e["frame"], e["query"]
                    restored.append((
                        (camera, str(e["query_id"])),
                        Tracker.from_state(e["tracker"], arrays),
                        None if e["last_fed"] is None else float(e["last_fed"]),
                        None if f is None else _FrameInfo(
                            str(f["camera"]), int(f["index"]), float(f["pts"]), (int(f["size"][0]), int(f["size"][1])),
                            None if f["wall_time"] is None else float(f["wall_time"]),
                        ),
                        None if q is None else Query(**q),
                    ))
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as exc:
            raise TrackingError(
                f"the saved tracker state of camera {camera!r} is unreadable ({exc}); its tracks start afresh"
            ) from None
        with self._lock:
            for key, tracker, last_fed, last_frame, query in restored:
                self._trackers[key] = tracker
                if last_fed is not None:
                    self._last_fed[key] = last_fed
                if last_frame is not None:
                    self._last_frame[key] = last_frame
                if query is not None:
                    self._queries[key] = query

    def drop_camera(self, camera: str) -> None:
        """Forget a camera's state without publishing anything (another worker took it)."""
        with self._lock:
            for key in [k for k in self._trackers if k[0] == camera]:
                self._trackers.pop(key, None)
                self._last_fed.pop(key, None)
                self._last_frame.pop(key, None)
                self._queries.pop(key, None)

    def segments(self) -> list[Segment]:
        with self._lock:
            return sorted(self._segments.values(), key=lambda s: (s.video, s.query_id, s.start_s, s.track_id))

    def _update_segments(self, frame: Frame, query: Query, tracked: Detections, tracker: Tracker) -> None:
        first_seen: dict[int, float] | None = None
        for i in range(len(tracked)):
            tid = int(tracked.track_id[i])
            score = float(tracked.score[i])
            key = (frame.camera, query.id, tid)
            seg = self._segments.get(key)
            if seg is None:
                if first_seen is None:
                    first_seen = _first_seen_times(tracker)
                start = first_seen.get(tid, frame.pts)
                self._segments[key] = Segment(
                    camera=frame.camera, video=self._videos.get(frame.camera, frame.camera), query_id=query.id,
                    query=query.text, track_id=tid, start_s=start, end_s=frame.pts, best_t=frame.pts,
                    best_xyxy=tracked.xyxy[i].tolist(), best_score=score, best_frame=frame.image,
                )
            else:
                seg.end_s = max(seg.end_s, frame.pts)
                seg.hits += 1
                if score > seg.best_score:
                    seg.best_t, seg.best_xyxy, seg.best_score = frame.pts, tracked.xyxy[i].tolist(), score
                    seg.best_frame = frame.image


def _first_seen_times(tracker: Tracker) -> dict[int, float]:
    """Media time each current track was first detected (before it was confirmed)."""
    out: dict[int, float] = {}
    for tr in tracker.tracks:
        tid = int(getattr(tr, "track_id", -1))
        t0 = getattr(tr, "first_t", None)
        if tid >= 0 and t0 is not None:
            out[tid] = float(t0)
    return out


class Pipeline:
    """Runs a `PipelineConfig`: one thread per camera, one engine thread, trackers, sinks.

    Args:
        config: The pipeline file, already validated.
        engine: A ready engine; by default `create_engine(config.engine)`.
        sinks: Where events go; by default Redis when `sinks.redis` is set, JSONL when
            `sinks.jsonl` is set, and a JSONL file `streamvg-events.jsonl` otherwise.
        collect_segments: Keep a `Segment` per track (offline search).
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
        self._queries: dict[str, Query] = {q.id: _query_from_config(q) for q in config.queries}
        self._queries_lock = threading.Lock()
        n_cams = max(1, len(config.sources))
        self._queue = WindowQueue(capacity=max(2 * config.engine.batch_size, 2 * n_cams, 4))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sources: dict[str, Any] = {}
        self._sources_lock = threading.Lock()
        self._cameras_running = 0
        self._cameras_running_lock = threading.Lock()
        self.processor = TrackingStage(
            config, publish=self._publish, model_name=lambda: self._engine.name if self._engine else "",
            collect_segments=collect_segments,
        )
        self._multi: MultiCameraWindows | None = None
        self._multi_lock = threading.Lock()
        self.windows_grounded = 0
        self.events_published = 0
        self.unparseable_answers = 0
        limit = config.engine.max_consecutive_failures
        if limit is None:
            limit = 0 if any(c.live for c in self.cameras.values()) else 5
        self.failures = GroundingFailures(limit or None)
        self._started_at = 0.0
        self._done = threading.Event()
        self._engine_error: BaseException | None = None
        self.metrics = PipelineMetrics(metrics_port) if metrics_port else None

    # --- queries --------------------------------------------------------------------

    @property
    def queries(self) -> list[Query]:
        with self._queries_lock:
            return list(self._queries.values())

    def add_query(self, query: Query | QueryConfig) -> None:
        """Start asking `query` of every window from now on (replaces one with the same id)."""
        q = _query_from_config(query)
        with self._queries_lock:
            self._queries[q.id] = q
        log.info("query %s added: %s", q.id, q.text)

    def remove_query(self, query_id: str) -> bool:
        """Stop asking query `query_id`; its open tracks end. Returns whether it existed."""
        with self._queries_lock:
            existed = self._queries.pop(query_id, None) is not None
        if existed:
            log.info("query %s removed", query_id)
            self.processor.finish_query(query_id)
        return existed

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> Pipeline:
        """Open the engine and sinks and start the camera and engine threads."""
        if self._engine is None and self.window_sink is None:
            self._engine = create_engine(self.config.engine)
        if self._sinks is None:
            self._sinks = default_sinks(self.config)
        if self.metrics:
            self.metrics.watch_sinks(self._sinks)
        if self.config.sampling.multi_camera:
            tol = self.config.sampling.tolerance_s or 0.5 / (self.config.sampling.fps or 25.0)
            live = any(c.live for c in self.cameras.values())
            self._multi = MultiCameraWindows(
                [s.name for s in self.config.sources], tolerance_s=tol, clock="wall" if live else "pts"
            )
        self._started_at = time.monotonic()
        self._cameras_running = len(self.config.sources)
        for src in self.config.sources:
            t = threading.Thread(target=self._camera_loop, args=(src.name, src.uri, src.options), name=f"camera-{src.name}", daemon=True)
            self._threads.append(t)
        self._threads.append(threading.Thread(target=self._engine_loop, name="engine", daemon=True))
        if self._control_enabled and self.config.sinks.redis is not None:
            self._threads.append(threading.Thread(target=self._control_loop, name="control", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop cameras, let the engine finish its batch, end tracks, flush and close sinks."""
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
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._close_outputs()

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
            windows_failed=self.failures.total,
            error=mask_text(str(self._engine_error)) if self._engine_error is not None
            and not isinstance(self._engine_error, KeyboardInterrupt) else None,
        )

    def segments(self) -> list[Segment]:
        return self.processor.segments()

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
                on_status=self._on_status, **options,
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
                        ready = self._multi.push(frame)
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
        if self._multi is not None:
            # This camera ended: groups that waited only for it can go now.
            with self._multi_lock:
                ready = self._multi.flush(name)
            for w in ready:
                self._enqueue(name, w)

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
            while True:
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
                requests = [(w, q) for w in batch for q in queries]
                failed: set[int] = set()  # ids of windows whose grounding failed
                for chunk, groundings, elapsed in ground_in_chunks(
                    self._engine, requests, batch_size, self.failures, functools.partial(self._count_failed, failed)
                ):
                    if self.metrics:
                        self.metrics.engine_latency.observe(elapsed)
                    for (w, q), g in zip(chunk, groundings, strict=True):
                        self._handle(w, q, g, elapsed * 1000.0 / len(chunk))
                self._count_grounded([w for w in batch if id(w) not in failed])
            self.processor.finish_all()
        except BaseException as exc:
            self._engine_error = exc
            log.log(self._error_level, "grounding stopped: %s", mask_text(str(exc)))
            self._stop.set()
        finally:
            self._done.set()
            self._notify()

    def _count_failed(self, failed: set[int], window: Window) -> None:
        failed.add(id(window))
        cam = self.cameras.get(window.frames[0].camera)
        if cam is not None:
            cam.windows_failed += 1
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
        if not g.parse_ok:
            self.unparseable_answers += 1
        self.processor.process(window, query, g, latency_ms)
        cam0 = self.cameras.get(window.frames[0].camera)
        if cam0 is not None:
            cam0.last_latency_ms = latency_ms

    # --- outputs --------------------------------------------------------------------

    def _publish(self, event: Event) -> None:
        for sink in self._sinks or ():
            sink.publish(event)
        self.events_published += 1
        if self.metrics:
            self.metrics.events.labels(event.kind).inc()

    def _close_outputs(self) -> None:
        if self.thumbnails_dir is not None:
            self._write_thumbnails()
        for sink in self._sinks or ():
            try:
                sink.flush()
            finally:
                if self._owns_sinks:
                    sink.close()
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

    # --- Redis control stream -------------------------------------------------------

    def _control_loop(self) -> None:
        import redis

        assert self.config.sinks.redis is not None
        key = control_key(self.name)
        last_id = "0"
        client: redis.Redis | None = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = redis.Redis.from_url(self.config.sinks.redis.url, socket_timeout=2.0, socket_connect_timeout=1.0)
                reply: Any = client.xread({key: last_id}, count=100, block=500)
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        self._apply_control(fields)
            except Exception as exc:  # Redis down: try again shortly; queries stay as they are
                log.debug("control stream unavailable: %s", mask_text(str(exc)))
                client = None
                self._stop.wait(1.0)

    def _apply_control(self, fields: dict[Any, Any]) -> None:
        raw = fields.get(b"data") or fields.get("data")
        try:
            if raw is None:
                raise ValueError("no data field")
            cmd = json.loads(raw)
            if cmd.get("op") == "add":
                self.add_query(QueryConfig(**cmd["query"]))
            elif cmd.get("op") == "remove":
                self.remove_query(str(cmd["id"]))
            else:
                raise ValueError(f"unknown op {cmd.get('op')!r}")
        except Exception as exc:
            log.warning("ignored a malformed control command %r: %s", raw, exc)


def _close_quietly(src: Any) -> None:
    try:
        src.close()
    except Exception:  # a camera that fails to close must not block shutdown
        log.debug("closing a source failed", exc_info=True)


def control_key(pipeline: str) -> str:
    """Redis stream that carries query add/remove commands for `pipeline`."""
    return f"streamvg:{pipeline}:control"


def send_query_command(
    url: str, pipeline: str, op: Literal["add", "remove"], *, query: Query | QueryConfig | None = None,
    query_id: str | None = None,
) -> str:
    """Ask running `pipeline`s to add or remove a standing query; returns the command's id.

    Commands are kept on the control stream, so a pipeline that starts later applies
    them too, in order.
    """
    import redis

    if op == "add":
        if query is None:
            raise ValueError("op 'add' needs query")
        q = _query_from_config(query)
        cmd: dict[str, Any] = {"op": "add", "query": {"id": q.id, "text": q.text, "mode": q.mode, "min_score": q.min_score}}
    else:
        if not query_id:
            raise ValueError("op 'remove' needs query_id")
        cmd = {"op": "remove", "id": query_id}
    client = redis.Redis.from_url(url)
    try:
        entry = client.xadd(control_key(pipeline), {"data": json.dumps(cmd)})
    finally:
        client.close()
    return entry.decode() if isinstance(entry, bytes) else str(entry)


def default_sinks(config: PipelineConfig) -> list[Sink]:
    """Redis when configured, JSONL when configured, JSONL `streamvg-events.jsonl` otherwise."""
    sinks: list[Sink] = []
    r = config.sinks.redis
    if r is not None:
        sinks.append(RedisSink(r.url, config.name, maxlen=r.maxlen, spool_dir=r.spool_dir, stream=r.stream, spool_max_bytes=r.spool_max_bytes))
    if config.sinks.jsonl is not None:
        sinks.append(JsonlSink(config.sinks.jsonl.path))
    if not sinks:
        sinks.append(JsonlSink("streamvg-events.jsonl"))
    return sinks


def _sum_sink_stat(sinks: Sequence[Any], name: str) -> float:
    return float(sum(getattr(getattr(s, "stats", None), name, 0) for s in sinks))


class PipelineMetrics:
    """Prometheus metrics, in a registry of this pipeline's own, served on `port`."""

    def __init__(self, port: int) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        self.registry = CollectorRegistry()
        self.frames_in = Counter("streamvg_frames_in", "Frames sampled", ["camera"], registry=self.registry)
        self.windows_dropped = Counter("streamvg_windows_dropped", "Stale windows dropped (freshest policy)", ["camera"], registry=self.registry)
        self.windows_grounded = Counter("streamvg_windows_grounded", "Windows grounded", ["camera"], registry=self.registry)
        self.windows_failed = Counter(
            "streamvg_windows_failed", "Windows skipped because grounding raised", ["camera"], registry=self.registry
        )
        self.engine_latency = Histogram("streamvg_engine_latency_seconds", "Engine batch latency", registry=self.registry)
        self.events = Counter("streamvg_events_published", "Events published", ["kind"], registry=self.registry)
        self.camera_up = Gauge("streamvg_camera_up", "1 when the camera is streaming", ["camera"], registry=self.registry)
        self._server: Any = start_http_server(port, addr="0.0.0.0", registry=self.registry)

    def watch_sinks(self, sinks: Sequence[Any]) -> None:
        """Export the sinks' delivery counters (published, spooled, replayed, dropped)."""
        from prometheus_client import Gauge

        for field_name in ("published", "spooled", "replayed", "dropped"):
            gauge = Gauge(f"streamvg_sink_events_{field_name}", f"Events {field_name} by the sinks", registry=self.registry)
            gauge.set_function(functools.partial(_sum_sink_stat, sinks, field_name))

    def close(self) -> None:
        server = self._server[0] if isinstance(self._server, tuple) else self._server
        if server is not None and hasattr(server, "shutdown"):
            server.shutdown()
