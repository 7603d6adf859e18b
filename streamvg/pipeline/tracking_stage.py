"""Grounding answers → per-(camera, query) trackers → events and search segments.

Shared by the all-in-one `Pipeline` and the scale-out ground workers.

Offline search (`offline_tracking=True`, with `collect_segments`): events are published
with the live tracker's ids as the frames come, and every frame fed is also recorded per
(camera, query): the boxes as given to the tracker, the media time, the frame number and
the live track id of each box; held (carried-over) frames as the repeated last answer.
When the (camera, query) finishes (`finish`: the run's end, or its query removed), the
recording is tracked again by `streamvg.tracking.offline.track_offline` (each ambiguous
pairing decided after the next updates are seen) and its segments are replaced by ones
built from that pass; the recording is then freed. Images are not recorded: the only
frame images kept are the live segments' best frames (as without the offline pass), and
an offline segment's best box is the highest-scoring of its boxes whose frame image is
kept that way (any query of the camera), or, when none is, its highest-scoring box
without an image (no thumbnail).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np

from streamvg.config import PipelineConfig
from streamvg.errors import TrackingError
from streamvg.events import Event
from streamvg.grounding import Grounding
from streamvg.redaction import mask_url
from streamvg.tracking import Tracker
from streamvg.tracking.offline import track_offline
from streamvg.types import Detections, Frame, Query, Window

__all__ = ["Segment", "TrackingStage"]

log = logging.getLogger("streamvg.pipeline")


@dataclass
class Segment:
    """One appearance of a tracked object: a track of one query in one video/camera.

    Times are media seconds. `best_*` describe the highest-scoring box of the track.
    `boxes` holds every box the track had, in time order, as
    `(t, frame_index, [x1, y1, x2, y2], score)` (media s, source frame number, frame
    pixels): what clips and MOTChallenge exports draw and write. It is not in `to_json`
    (a few dozen bytes per sampled frame).
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
    global_id: int | None = None  # cross-camera identity (identity on), else None
    best_frame: np.ndarray | None = field(default=None, repr=False, compare=False)
    boxes: list[tuple[float, int, list[float], float]] = field(default_factory=list, repr=False, compare=False)
    # The live tracker's id of this track (what cross-camera identities are keyed by): its
    # `track_id` for live segments, for offline ones the live id most of its boxes had,
    # never one a segment in view at the same time has (None when it is left without one).
    live_track_id: int | None = field(default=None, repr=False, compare=False)

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
            **({"global_id": self.global_id} if self.global_id is not None else {}),
        }


_TRACKSTATE_FORMAT = "streamvg.trackstate/v1"


@dataclass(frozen=True)
class _FrameInfo:
    """What track events need of a frame (its picture stays out of tracker state)."""

    camera: str
    index: int
    pts: float
    size: tuple[int, int]
    wall_time: float | None


@dataclass(frozen=True)
class _Fed:
    """One frame as fed to a (camera, query) tracker, recorded for the offline pass (no image)."""

    t: float
    index: int
    dets: Detections  # as given to the tracker
    live_ids: np.ndarray  # the live track id of each row of `dets`, -1 where none
    held: bool = False  # a carried-over frame: the last answer repeated
    size: tuple[int, int] | None = None  # (width, height) of the frame


class TrackingStage:
    """Grounding answers → per-(camera, query) trackers → events (and search segments).

    Shared by the all-in-one `Pipeline` and the scale-out ground workers. Frames that
    overlapping windows share are fed to the tracker and published once: the first
    window that contains a frame decides its boxes.

    With `collect_segments` and `offline_tracking`, each (camera, query)'s segments are
    rebuilt by the offline pass when it finishes (see the module docstring); events keep
    the live ids.
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        publish: Callable[[Event], None],
        model_name: Callable[[], str],
        collect_segments: bool = False,
        offline_tracking: bool = False,
    ) -> None:
        self.config = config
        self.pipeline = config.name
        self._publish = publish
        self._model_name = model_name
        self.collect_segments = collect_segments
        self.offline_tracking = offline_tracking and collect_segments
        self._recorded: dict[tuple[str, str], list[_Fed]] = {}  # offline pass: frames fed, per (camera, query)
        self._videos = {s.name: mask_url(s.uri) for s in config.sources}
        self._trackers: dict[tuple[str, str], Tracker] = {}
        self._last_fed: dict[tuple[str, str], float] = {}
        self._last_frame: dict[tuple[str, str], _FrameInfo] = {}
        self._queries: dict[tuple[str, str], Query] = {}
        self._segments: dict[tuple[str, str, int], Segment] = {}
        self._last_answer: dict[tuple[str, str], tuple[Detections, str]] = {}  # boxes, model: what a carry-over repeats
        self._lock = threading.RLock()

    def process(self, window: Window, query: Query, g: Grounding, latency_ms: float | None) -> dict[int, Detections]:
        """Publish the window's new frames' groundings and feed them to the trackers.

        Returns:
            `{image index: tracked boxes}` for the frames fed now (confirmed tracks only,
            `track_id` set), for stages after tracking (cross-camera identity).
        """
        fed: dict[int, Detections] = {}
        dets = g.detections
        if query.min_score > 0 and len(dets):
            dets = dets[dets.score >= query.min_score]
        with self._lock:
            for k, frame, key in self._unfed_frames(window, query):
                frame_dets = dets[dets.image_index == k] if len(dets) else dets
                self._last_answer[key] = (frame_dets, g.model)
                self._publish(Event.grounding(
                    pipeline=self.pipeline, camera=frame.camera, query_id=query.id, query=query.text, t=frame.pts,
                    frame_index=frame.index, frame_size=frame.size, detections=frame_dets, model=g.model,
                    wall_time=frame.wall_time, latency_ms=None if frame.wall_time is not None else latency_ms,
                ))
                tracker = self._tracker(key)
                self._queries[key] = query
                given = Detections(frame_dets.xyxy, frame_dets.score, np.zeros(len(frame_dets), np.int64))
                # each frame's size: a stream's can change (an encoder restart)
                tracked = tracker.update(given, frame.pts, frame_size=frame.size)
                self._last_fed[key] = frame.pts
                if self.offline_tracking:
                    live_ids = np.full(len(given), -1, np.int64)
                    live_ids[_rows_of(given, tracked)] = tracked.track_id
                    self._recorded.setdefault(key, []).append(_Fed(frame.pts, frame.index, given, live_ids, size=frame.size))
                fed[k] = tracked
                info = self._last_frame[key] = _FrameInfo(
                    frame.camera, frame.index, frame.pts, frame.size, frame.wall_time
                )
                self._publish_track_events(tracker, info, query, g.model, k)
                if self.collect_segments and len(tracked):
                    self._update_segments(frame, query, tracked, tracker)
        return fed

    def _unfed_frames(self, window: Window, query: Query) -> Iterator[tuple[int, Frame, tuple[str, str]]]:
        """`(image index, frame, tracker key)` of the window's frames not yet fed for
        `query`, in time order (the caller holds the lock). A frame already fed through an
        overlapping window is skipped: sources keep media time non-decreasing, across live
        reconnects too, so nothing new is."""
        for k in sorted(range(len(window.frames)), key=lambda k: window.frames[k].pts):
            frame = window.frames[k]
            key = (frame.camera, query.id)
            last = self._last_fed.get(key)
            if last is None or frame.pts > last:
                yield k, frame, key

    def _tracker(self, key: tuple[str, str]) -> Tracker:
        """The tracker of (camera, query), made on first use."""
        tracker = self._trackers.get(key)
        if tracker is None:
            fps = self.config.sampling.fps  # frames reach a tracker at the sampling rate
            tracker = self._trackers[key] = Tracker(self.config.tracker, interval_s=1.0 / fps if fps else None)
        return tracker

    def carry_over(self, window: Window, query: Query) -> None:
        """The change gate kept `window` from the engine: nothing changed since the last
        grounded frame. Each new frame gets a `grounding` event repeating the last answer
        (`carried_over: true`), the tracker holds its tracks at the frame's time (alive,
        same boxes; nothing is lost because nothing was asked) and search segments go on
        through the still stretch."""
        with self._lock:
            for k, frame, key in self._unfed_frames(window, query):
                answer, model = self._last_answer.get(key, (Detections.empty(), self._model_name()))
                boxes = Detections(answer.xyxy, answer.score, np.full(len(answer), k, np.int64), answer.track_id)
                self._publish(Event.grounding(
                    pipeline=self.pipeline, camera=frame.camera, query_id=query.id, query=query.text, t=frame.pts,
                    frame_index=frame.index, frame_size=frame.size, detections=boxes, model=model,
                    wall_time=frame.wall_time, carried_over=True,
                ))
                tracker = self._tracker(key)
                self._queries[key] = query
                held = tracker.hold(frame.pts)
                self._last_fed[key] = frame.pts
                if self.offline_tracking:  # the repeated last answer, as its grounding event says
                    rec = self._recorded.setdefault(key, [])
                    if rec:
                        rec.append(_Fed(frame.pts, frame.index, rec[-1].dets, rec[-1].live_ids, held=True, size=frame.size))
                    else:
                        given = Detections(answer.xyxy, answer.score, np.zeros(len(answer), np.int64))
                        rec.append(_Fed(frame.pts, frame.index, given, np.full(len(given), -1, np.int64), held=True,
                                        size=frame.size))
                self._last_frame[key] = _FrameInfo(frame.camera, frame.index, frame.pts, frame.size, frame.wall_time)
                self._publish_track_events(tracker, self._last_frame[key], query, model, k)  # tracks that ended
                if self.collect_segments:
                    for tid in held.track_id.tolist():
                        seg = self._segments.get((frame.camera, query.id, int(tid)))
                        if seg is not None:
                            seg.end_s = max(seg.end_s, frame.pts)

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
            self._last_answer.pop(key, None)
            recorded = self._recorded.pop(key, None)
            if tracker is None or t is None:
                return
            tracker.finish(t)
            if frame is not None and query is not None:
                self._publish_track_events(tracker, frame, query, self._model_name(), 0)
            if recorded and query is not None:
                self._offline_segments(key, query, recorded)

    def _offline_segments(self, key: tuple[str, str], query: Query, recorded: list[_Fed]) -> None:
        """Replace the segments of (camera, query) `key` by ones from the offline pass over
        its recorded frames (the caller holds the lock)."""
        camera = key[0]
        fps = self.config.sampling.fps
        try:
            result = track_offline(
                [(f.dets, f.t) for f in recorded], self.config.tracker, interval_s=1.0 / fps if fps else None,
                frame_sizes=[f.size for f in recorded],
            )
        except TrackingError as exc:  # cannot happen after the live tracker took the same frames; keep live ids
            log.warning("offline tracking of camera %s, query %s failed (%s); its segments keep the live ids",
                        camera, query.id, exc)
            return
        # Frame images still held (the live segments' best frames, any query of this camera), by time.
        images = {s.best_t: s.best_frame for s in self._segments.values()
                  if s.camera == camera and s.best_frame is not None}
        segs: dict[int, Segment] = {}
        votes: dict[int, dict[int, int]] = {}
        for fed, tracked in zip(recorded, result.tracked, strict=True):
            rows = _rows_of(fed.dets, tracked)
            for k in range(len(tracked)):
                tid = int(tracked.track_id[k])
                box, score = tracked.xyxy[k].tolist(), float(tracked.score[k])
                seg = segs.get(tid)
                if seg is None:
                    seg = segs[tid] = Segment(
                        camera=camera, video=self._videos.get(camera, camera), query_id=query.id, query=query.text,
                        track_id=tid, start_s=result.first_seen.get(tid, fed.t), end_s=fed.t, best_t=fed.t,
                        best_xyxy=box, best_score=score, hits=0, best_frame=images.get(fed.t),
                    )
                seg.end_s = max(seg.end_s, fed.t)
                if fed.held and seg.hits:
                    continue  # as live: a still stretch extends the segment, it adds no sighting
                seg.hits += 1
                seg.boxes.append((fed.t, fed.index, box, score))
                live = int(fed.live_ids[rows[k]])
                if live >= 0:
                    v = votes.setdefault(tid, {})
                    v[live] = v.get(live, 0) + 1
                image = images.get(fed.t)
                # The best box: highest score among boxes whose frame image is kept, else overall.
                if (image is not None, score) > (seg.best_frame is not None, seg.best_score):
                    seg.best_t, seg.best_xyxy, seg.best_score, seg.best_frame = fed.t, box, score, image
        _name_live_tracks(segs, votes)
        for skey in [k for k in self._segments if k[:2] == key]:
            del self._segments[skey]
        for tid, seg in segs.items():
            self._segments[(camera, query.id, tid)] = seg
        log.debug("camera %s, query %s: offline pass made %d segment(s), %d pairing(s) changed",
                  camera, query.id, len(segs), result.changed)

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

    def finish_camera(self, camera: str) -> None:
        """End every track of one camera (its source ended) and publish their `track_end`."""
        with self._lock:
            for key in [k for k in self._trackers if k[0] == camera]:
                self.finish(key)

    def camera_time(self, camera: str) -> float | None:
        """The latest media time fed to any tracker of `camera` (None: no state)."""
        with self._lock:
            times = [t for k, t in self._last_fed.items() if k[0] == camera]
        return max(times) if times else None

    def drop_camera(self, camera: str) -> None:
        """Forget a camera's state without publishing anything (another worker took it)."""
        with self._lock:
            for key in [k for k in self._trackers if k[0] == camera]:
                self._trackers.pop(key, None)
                self._last_fed.pop(key, None)
                self._last_frame.pop(key, None)
                self._queries.pop(key, None)
                self._last_answer.pop(key, None)
                self._recorded.pop(key, None)

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
                    first_seen = tracker.first_seen()
                start = first_seen.get(tid, frame.pts)
                self._segments[key] = Segment(
                    camera=frame.camera, video=self._videos.get(frame.camera, frame.camera), query_id=query.id,
                    query=query.text, track_id=tid, start_s=start, end_s=frame.pts, best_t=frame.pts,
                    best_xyxy=tracked.xyxy[i].tolist(), best_score=score, best_frame=frame.image, live_track_id=tid,
                )
                self._segments[key].boxes.append((frame.pts, frame.index, tracked.xyxy[i].tolist(), score))
            else:
                seg.boxes.append((frame.pts, frame.index, tracked.xyxy[i].tolist(), score))
                seg.end_s = max(seg.end_s, frame.pts)
                seg.hits += 1
                if score > seg.best_score:
                    seg.best_t, seg.best_xyxy, seg.best_score = frame.pts, tracked.xyxy[i].tolist(), score
                    seg.best_frame = frame.image


def _name_live_tracks(segs: dict[int, Segment], votes: dict[int, dict[int, int]]) -> None:
    """Set each offline segment's `live_track_id`: the live track most of its boxes had,
    except that segments overlapping in time never share one (two objects in view at once
    are never one cross-camera identity); a segment whose live tracks all went to segments
    with more of their boxes gets None (an identity of its own).

    Greedy, the largest vote first (ties: the lower live id, then the lower segment id), so
    a segment without such a conflict gets its own majority as before."""
    candidates = sorted(((-n, live, tid) for tid, counts in votes.items() for live, n in counts.items()))
    spans: dict[int, list[tuple[float, float]]] = {}
    for seg in segs.values():
        seg.live_track_id = None
    for _, live, tid in candidates:
        seg = segs[tid]
        if seg.live_track_id is not None:
            continue
        taken = spans.setdefault(live, [])
        if any(seg.start_s <= end and start <= seg.end_s for start, end in taken):
            continue  # a segment at the same time has this live track
        seg.live_track_id = live
        taken.append((seg.start_s, seg.end_s))


def _rows_of(given: Detections, tracked: Detections) -> np.ndarray:
    """The row of `given` each row of `tracked` is (a tracker returns some of its input
    rows, in input order and unchanged)."""
    out = np.empty(len(tracked), np.int64)
    j = 0
    for k in range(len(tracked)):
        while not (given.score[j] == tracked.score[k] and np.array_equal(given.xyxy[j], tracked.xyxy[k])):
            j += 1
        out[k] = j
        j += 1
    return out




