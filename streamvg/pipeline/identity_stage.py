"""Tracked boxes of multi-camera windows → cross-camera identities → `global_id` on events.

Sits between the trackers and the sinks: `publish` decorates every track event with its
track's current `global_id` on the way to the sinks; `observe` takes the tracked boxes of
each multi-camera window (from `TrackingStage.process`) and turns them into votes, at once
for one-referent queries, or by correspondence requests that `ask` sends to the engine after
each batch. Shared by the all-in-one `Pipeline` and the scale-out ground workers.

Cost in model calls: nothing for one-referent queries; for the others at most
`identity.max_requests_per_window` extra requests per multi-camera window and query (each
one `generate()` over the window's images, the reference one marked), fewer with
`identity.ask_every_s`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamvg.config import IdentityConfig, PipelineConfig
from streamvg.errors import ConfigError
from streamvg.events import Event
from streamvg.grounding import GroundingEngine
from streamvg.identity.correspondence import CorrespondenceRequest, match_track, read_answer
from streamvg.identity.linker import Linker, TrackKey, pairs_of
from streamvg.redaction import mask_text
from streamvg.types import Detections, Query, Window

__all__ = ["GlobalTrack", "IdentityStage", "IdentityStats", "global_tracks"]

log = logging.getLogger("streamvg.pipeline")

_STATE_FORMAT = "streamvg.identitystate/v1"
_MAX_PENDING = 256  # queued correspondence requests (each holds its window's frames)


@dataclass
class IdentityStats:
    """Counters of the identity stage (read them, don't write them).

    Attributes:
        requests: Correspondence requests sent to the engine.
        requests_failed: Requests whose grounding raised (skipped; the votes are just missing).
        unparseable: Answers the parser could not read.
        votes_agree, votes_contradict: Votes recorded.
        skipped_engine: Requests not sent because the engine answers from stored boxes
            (replay) and cannot answer a correspondence request.
        requests_dropped: Queued requests dropped, oldest first, beyond 256 waiting.
    """

    requests: int = 0
    requests_failed: int = 0
    unparseable: int = 0
    votes_agree: int = 0
    votes_contradict: int = 0
    skipped_engine: int = 0
    requests_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Pending:
    request: CorrespondenceRequest
    tracked: dict[str, Detections]  # target camera -> its tracked boxes in the window


@dataclass
class GlobalTrack:
    """One object across cameras: where and when each camera saw it.

    Attributes:
        global_id: The identity.
        query_id, query: The query it answers.
        cameras: `{camera: (start_s, end_s)}` in that camera's media seconds.
        tracks: The per-camera tracks `(camera, track_id)` it is made of.
    """

    global_id: int
    query_id: str
    query: str
    cameras: dict[str, tuple[float, float]] = field(default_factory=dict)
    tracks: list[TrackKey] = field(default_factory=list)

    def summary(self) -> str:
        """'seen on cam0 10.0–20.0 s, cam2 15.0–31.0 s' (cameras in name order)."""
        parts = [f"{c} {a:.1f}–{b:.1f} s" for c, (a, b) in sorted(self.cameras.items())]
        return "seen on " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "global_id": self.global_id,
            "query_id": self.query_id,
            "query": self.query,
            "cameras": {c: {"start_s": round(a, 3), "end_s": round(b, 3)} for c, (a, b) in sorted(self.cameras.items())},
            "tracks": [[c, t] for c, t in self.tracks],
            "summary": self.summary(),
        }


class IdentityStage:
    """Cross-camera identities of every query's tracks (see the module docstring).

    Args:
        config: The pipeline file; its `identity` section must be set and
            `sampling.multi_camera` on (identities come from windows of several cameras).
        publish: Where decorated events go (the sinks).

    Raises:
        ConfigError: identity is on without multi-camera windows.
    """

    def __init__(self, config: PipelineConfig, *, publish: Callable[[Event], None]) -> None:
        if config.identity is None:
            raise ConfigError("identity: the section is not set; add identity: {} to the pipeline file", field="identity")
        if not config.sampling.multi_camera:
            raise ConfigError(
                "identity: cross-camera identities need multi-camera windows; set sampling.multi_camera: true",
                field="sampling.multi_camera",
            )
        self.cfg: IdentityConfig = config.identity
        self.engine_config = config.engine
        self._publish = publish
        self._one = set(self.cfg.one_referent)
        self._linkers: dict[str, Linker] = {}
        self._next = 0
        self._pending: list[_Pending] = []
        self._asked: dict[tuple[str, str, int], tuple[int, float]] = {}  # key -> (times asked, last t)
        self._queries: dict[str, str] = {}
        self.stats = IdentityStats()
        self._lock = threading.RLock()
        self._warned_engine = False
        # From the engine (`bind_engine`): how the reference box is written, model input sizes.
        self._convention: Any = "qwen2_vl"
        self._engine_input_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None

    # --- ids ----------------------------------------------------------------------------

    def _new_id(self) -> int:
        v = self._next
        self._next += 1
        return v

    def linker(self, query_id: str) -> Linker:
        """The linker of one query (made on first use)."""
        with self._lock:
            lk = self._linkers.get(query_id)
            if lk is None:
                lk = self._linkers[query_id] = Linker(
                    min_agree=self.cfg.min_agree, max_contradiction=self.cfg.max_contradiction, new_id=self._new_id
                )
            return lk

    def global_id(self, query_id: str, camera: str, track_id: int) -> int:
        """The current identity of a track."""
        with self._lock:
            return self.linker(query_id).global_id((camera, int(track_id)))

    def one_referent(self, query_id: str) -> bool:
        return "*" in self._one or query_id in self._one

    # --- events -------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Forward `event` to the sinks; track events gain their track's `global_id`."""
        if event.track_id is not None and event.query_id is not None and event.kind.startswith("track_"):
            with self._lock:
                lk = self.linker(event.query_id)
                key = (event.camera, int(event.track_id))
                if event.t is not None:
                    lk.track(key, event.t)
                if event.kind == "track_end":
                    lk.end(key, event.t)
                gid = lk.global_id(key)
                if event.query is not None:
                    self._queries[event.query_id] = event.query
            event = event.with_global_id(gid)
        self._publish(event)

    # --- evidence -----------------------------------------------------------------------

    def observe(self, window: Window, query: Query, tracked: dict[int, Detections]) -> None:
        """Votes from one grounded window's tracked boxes (`{image index: tracked boxes}`).

        Single-camera windows only record which tracks were seen together. Multi-camera
        windows vote at once (one-referent queries) or queue correspondence requests.
        """
        with self._lock:
            lk = self.linker(query.id)
            self._queries[query.id] = query.text
            per_cam: dict[str, tuple[int, Detections]] = {}
            for k, det in tracked.items():
                frame = window.frames[k]
                lk.see(frame.camera, frame.pts, det.track_id.tolist(), det.xyxy.tolist())
                if len(det):
                    per_cam[frame.camera] = (k, det)
            if len({f.camera for f in window.frames}) < 2 or len(per_cam) < 2:
                return
            if self.one_referent(query.id):
                keys = [(cam, int(det.track_id[0])) for cam, (_k, det) in sorted(per_cam.items()) if len(det) == 1]
                for a, b in pairs_of(keys):
                    lk.vote(a, b, agree=True, window=window.id)
                    self.stats.votes_agree += 1
                return
            if self.cfg.correspondence and self.cfg.max_requests_per_window > 0:
                self._queue_requests(window, query, per_cam)

    def _queue_requests(self, window: Window, query: Query, per_cam: dict[str, tuple[int, Detections]]) -> None:
        candidates: list[tuple[int, str, int, int, int]] = []  # (times asked, camera, track, image, row)
        for cam, (k, det) in per_cam.items():
            t = window.frames[k].pts
            for i, tid in enumerate(det.track_id.tolist()):
                n, last_t = self._asked.get((query.id, cam, tid), (0, float("-inf")))
                if self.cfg.ask_every_s > 0 and t - last_t < self.cfg.ask_every_s:
                    continue
                candidates.append((n, cam, tid, k, i))
        candidates.sort()
        convention = self._convention
        for n, cam, tid, k, i in candidates[: self.cfg.max_requests_per_window]:
            ref = window.frames[k]
            targets = {c: kd for c, kd in per_cam.items() if c != cam}
            others = [window.frames[kd[0]] for _c, kd in sorted(targets.items())]
            box = per_cam[cam][1].xyxy[i]
            req = CorrespondenceRequest.build(
                query_id=query.id, ref=ref, track_id=tid, ref_xyxy=box.tolist(), others=others,
                window_id=window.id, convention=convention, input_size=self._input_size(ref.size),
            )
            self._pending.append(_Pending(req, {c: kd[1] for c, kd in targets.items()}))
            if len(self._pending) > _MAX_PENDING:  # nobody asks (no engine): keep memory bounded
                self._pending.pop(0)
                self.stats.requests_dropped += 1
            self._asked[(query.id, cam, tid)] = (n + 1, ref.pts)

    def _input_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        if self._convention != "qwen2_5_vl":
            return None
        if self._engine_input_size is not None:
            try:
                return self._engine_input_size(size)
            except Exception:  # an engine's own size helper failing must not lose the request
                log.debug("engine input_size failed", exc_info=True)
        from streamvg.grounding.remote import smart_resize

        h, w = smart_resize(size[1], size[0], min_pixels=self.engine_config.min_pixels, max_pixels=self.engine_config.max_pixels)
        return (w, h)

    def bind_engine(self, engine: GroundingEngine | None) -> None:
        """Learn the engine's box convention (how the reference box is written)."""
        conv = getattr(engine, "convention", None)
        if conv in ("qwen2_vl", "qwen2_5_vl"):
            self._convention = conv
        size = getattr(engine, "input_size", None)
        self._engine_input_size = size if callable(size) else None

    @property
    def pending(self) -> int:
        """Correspondence requests waiting for `ask`."""
        return len(self._pending)

    def ask(self, engine: GroundingEngine, batch_size: int = 4) -> None:
        """Send the queued correspondence requests to `engine` and record the votes.

        A request whose grounding raises is skipped and counted (never fatal: identities
        simply link later). Engines that answer from stored boxes (replay) cannot answer
        correspondence requests: they are dropped, counted, and said once in the log.
        """
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        if _answers_from_storage(engine):
            self.stats.skipped_engine += len(pending)
            if not self._warned_engine:
                self._warned_engine = True
                log.warning(
                    "engine %s answers from stored boxes and cannot answer correspondence requests; only "
                    "one-referent queries (identity.one_referent) get cross-camera links", engine.name,
                )
            return
        for start in range(0, len(pending), max(1, batch_size)):
            chunk = pending[start : start + max(1, batch_size)]
            try:
                answers = engine.ground_many([(p.request.window, p.request.query) for p in chunk])
            except Exception as exc:  # model server down, OOM: identities just wait for later windows
                self.stats.requests_failed += len(chunk)
                log.warning("correspondence requests failed (%s); %d skipped", mask_text(str(exc))[:200], len(chunk))
                continue
            with self._lock:
                self.stats.requests += len(chunk)
                for p, g in zip(chunk, answers, strict=True):
                    if not g.parse_ok:
                        self.stats.unparseable += 1
                    self._record(p, read_answer(p.request, g.detections))

    def _record(self, p: _Pending, answer: dict[str, tuple[float, float, float, float] | None]) -> None:
        req = p.request
        lk = self.linker(req.query_id)
        ref: TrackKey = (req.camera, req.track_id)
        for cam, box in answer.items():
            det = p.tracked.get(cam)
            if box is None or det is None or not len(det):
                continue  # not visible there (or ambiguous): no vote either way
            row = match_track(box, det, self.cfg.match_iou)
            for i, tid in enumerate(det.track_id.tolist()):
                agree = row is not None and i == row
                lk.vote(ref, (cam, int(tid)), agree=agree, window=req.window_id)
                if agree:
                    self.stats.votes_agree += 1
                else:
                    self.stats.votes_contradict += 1

    # --- results ------------------------------------------------------------------------

    def identities(self) -> dict[str, dict[int, list[TrackKey]]]:
        """`{query_id: {global_id: [(camera, track_id), …]}}`."""
        with self._lock:
            return {q: lk.identities() for q, lk in self._linkers.items()}

    def links(self) -> dict[str, int]:
        """Links made and undone over the run, over all queries."""
        with self._lock:
            return {
                "made": sum(lk.links_made for lk in self._linkers.values()),
                "undone": sum(lk.links_undone for lk in self._linkers.values()),
            }

    # --- hand-over (scale-out) ----------------------------------------------------------

    def forget_camera(self, camera: str) -> None:
        """Drop everything known about `camera`'s tracks (its tracker state was not handed
        over, so its track ids start again and must not meet the old ones)."""
        with self._lock:
            for lk in self._linkers.values():
                gone = {k for k in lk.tracks if k[0] == camera}
                if not gone:
                    continue
                for k in gone:
                    lk.tracks.pop(k, None)
                    lk.conflicts.pop(k, None)
                for k in lk.conflicts:
                    lk.conflicts[k] -= gone
                for pair in [p for p in lk.evidence if p[0] in gone or p[1] in gone]:
                    del lk.evidence[pair]
                lk.reset_groups()
            self._asked = {k: v for k, v in self._asked.items() if k[1] != camera}

    def export_state(self) -> bytes:
        """The linkers and the id counter as JSON (never pickled)."""
        with self._lock:
            data = {
                "format": _STATE_FORMAT,
                "next": self._next,
                "linkers": {q: lk.state() for q, lk in self._linkers.items()},
                "asked": [[q, c, t, n, last] for (q, c, t), (n, last) in self._asked.items()],
            }
        return json.dumps(data).encode()

    def import_state(self, data: bytes) -> None:
        """Adopt a state saved by `export_state` (replaces this stage's linkers).

        Raises:
            ValueError: `data` is not such a state.
        """
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != _STATE_FORMAT:
                raise ValueError(f"format {obj.get('format') if isinstance(obj, dict) else None!r}")
            linkers = {str(q): Linker.from_state(s, new_id=self._new_id) for q, s in obj["linkers"].items()}
            asked = {(str(q), str(c), int(t)): (int(n), float(last)) for q, c, t, n, last in obj.get("asked", [])}
            nxt = int(obj["next"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the saved identity state is unreadable ({exc}); identities start afresh") from None
        with self._lock:
            self._linkers = linkers
            self._asked = asked
            self._next = max(nxt, max((lk.max_home_id() + 1 for lk in linkers.values()), default=0))


def _answers_from_storage(engine: GroundingEngine) -> bool:
    from streamvg.grounding.replay import ReplayEngine

    return isinstance(engine, ReplayEngine)


def global_tracks(segments: Sequence[Any], gid_of: Callable[[str, str, int], int]) -> list[GlobalTrack]:
    """Group search segments (one per camera track) into `GlobalTrack`s.

    Args:
        segments: `Segment`s (camera, query_id, query, track_id, start_s, end_s).
        gid_of: `(query_id, camera, track_id) -> global_id`.
    """
    out: dict[tuple[str, int], GlobalTrack] = {}
    for s in segments:
        gid = gid_of(s.query_id, s.camera, s.track_id)
        gt = out.get((s.query_id, gid))
        if gt is None:
            gt = out[(s.query_id, gid)] = GlobalTrack(gid, s.query_id, s.query)
        a, b = gt.cameras.get(s.camera, (s.start_s, s.end_s))
        gt.cameras[s.camera] = (min(a, s.start_s), max(b, s.end_s))
        gt.tracks.append((s.camera, s.track_id))
    return sorted(out.values(), key=lambda g: (g.query_id, min(a for a, _ in g.cameras.values()), g.global_id))
