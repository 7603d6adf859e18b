"""The time-aware tracker: ByteTrack's two-stage association on a Kalman filter driven by seconds.

Grounding with an MLLM answers 1–2 times a second per camera, not 30. Between two answers a
walking person moves about their own width, so consecutive boxes of one object often no longer
overlap and IoU-only trackers (ByteTrack, SORT) break every track. This tracker instead:

- predicts each track by the **elapsed media seconds** (`kalman.BoxKalman`), whatever the
  rate and however irregular the times;
- gates and scores matches by the **Mahalanobis distance** of a box to the prediction, whose
  spread grows with the time since the track was last seen, plus how sure the prediction is
  (so a long-lost track does not steal a box from a fresh one), with IoU as a second key;
- associates in ByteTrack's stages: confident boxes to confirmed tracks, then weak boxes to
  the confirmed tracks left, then confident boxes to tentative tracks, then new tracks;
- counts lifetimes in **seconds** (`max_lost_s`, and `max_missed_updates` misses in a row
  at high rates) and confirmations in seconds (`confirm_s`, capped by `min_confirm_hits`).

Lifecycle, each transition an event (`pop_events`): tentative → confirmed (`started`) →
matched again (`updated`) / missed (`lost`, once) → found again (`updated`) or gone for more
than `max_lost_s` or missed `max_missed_updates` updates in a row (`ended`, checked before
each update associates, so no box after a longer gap takes an old id, however far the
filter's gate has grown) or, when the frame size is known (`frame_size`), once its predicted
box is mostly outside the frame (`ended` too: an unseen track heading out of the picture has
left, and within a second or two its gate would cover the frame and hand its id to someone
entering elsewhere). Tentative tracks that miss two updates in a row vanish without events.
`hold(t)` tells the tracker the scene was unchanged at `t` (nothing was asked of the model,
so nothing counts as unseen).

Track state is columnar (one numpy row per track), and `track_id` is written through index
arrays, so the work per update is a handful of numpy calls plus one assignment per stage.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

from streamvg.config import TrackerConfig
from streamvg.errors import TrackingError
from streamvg.tracking.kalman import BoxKalman, xyxy_to_cxcywh
from streamvg.types import Detections

__all__ = ["Track", "TrackEvent", "Tracker", "TrackerInputError", "TrackingError"]

TrackEventKind = Literal["started", "updated", "lost", "ended"]
TrackState = Literal["tentative", "tracked", "lost"]
_EVENT_KINDS: tuple[str, ...] = get_args(TrackEventKind)
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

_FORBIDDEN = 1e9
_TENTATIVE_MISSES = 1  # missed updates a tentative track survives
_EXIT_MARGIN = 0.25  # an unseen track ends once its predicted centre is this many box sizes outside the frame
# Per-track arrays (one row per track) and their dtypes: the whole state besides `_t`, `_dt`,
# `_frame_size`, `_next_id` and pending events. `Tracker.state` / `from_state` carry exactly these.
_TRACK_ARRAYS: dict[str, tuple[type, tuple[int, ...]]] = {
    "mean": (np.float64, (8,)),
    "cov": (np.float64, (3, 4)),
    "id": (np.int64, ()),
    "hits": (np.int64, ()),
    "first_t": (np.float64, ()),
    "last_t": (np.float64, ()),
    "score": (np.float64, ()),
    "box": (np.float64, (4,)),
    "lost": (np.bool_, ()),
    "misses": (np.int64, ()),
}


TrackerInputError = TrackingError  # the name this module raised before `streamvg.errors` had it


@dataclass(frozen=True, eq=False)
class TrackEvent:
    """One lifecycle transition of a track.

    Attributes:
        kind: `started` (confirmed, now has an id), `updated` (matched again), `lost`
            (missed for the first time; may come back), `ended` (gone for good).
        track_id: The track's id (≥ 0).
        t: Media seconds: the update's time, except for `ended`, which carries the time the
            track was last seen (so a search segment ends where the object was last seen).
        xyxy: `(4,)` the matched box (`started`/`updated`), the last box seen (`lost`/`ended`).
        score: The score of that box.
    """

    kind: TrackEventKind
    track_id: int
    t: float
    xyxy: NDArray[np.float32]
    score: float


@dataclass(frozen=True, eq=False)
class Track:
    """A snapshot of one live track (see `Tracker.tracks`).

    Attributes:
        track_id: Id once confirmed; `-1` while tentative.
        state: `tentative`, `tracked` (matched at the last update) or `lost`.
        xyxy: `(4,)` the filter's current box estimate, in pixels.
        velocity: `(2,)` centre velocity, pixels per second.
        score: Score of the last matched box.
        first_t: Media time the object was first detected (before confirmation).
        last_t: Media time it was last matched.
        hits: Number of matched updates.
    """

    track_id: int
    state: TrackState
    xyxy: NDArray[np.float32]
    velocity: NDArray[np.float32]
    score: float
    first_t: float
    last_t: float
    hits: int


def _iou(a: F64, b: F64) -> F64:
    """`(len(a), len(b))` IoU of xyxy boxes (each with x2 ≥ x1 and y2 ≥ y1)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    wh = np.minimum(a[:, None, 2:], b[None, :, 2:]) - lt
    np.maximum(wh, 0.0, out=wh)
    inter = wh[:, :, 0] * wh[:, :, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter  # 0 only when both boxes are empty
    return np.asarray(inter / np.maximum(union, 1e-12))


def _assign(gated: F64, allowed: NDArray[np.bool_], rows: I64, cols: I64) -> tuple[I64, I64, I64, I64]:
    """Optimal assignment of tracks `rows` to boxes `cols` within the gate.

    `gated` is the cost with `_FORBIDDEN` outside the gate `allowed`. Returns matched rows,
    their matched cols, the free rows and the free cols.
    """
    if len(rows) == 0 or len(cols) == 0:
        return rows[:0], cols[:0], rows, cols
    ok = allowed.take(rows, axis=0).take(cols, axis=1)
    if not ok.any():
        return rows[:0], cols[:0], rows, cols
    sub = gated.take(rows, axis=0).take(cols, axis=1)
    if sub.shape[0] == 1 or sub.shape[1] == 1:  # one track or one box: the cheapest pair
        r, k = np.unravel_index([int(sub.argmin())], sub.shape)
    else:
        r, k = linear_sum_assignment(sub)
    keep = ok[r, k]
    r, k = r[keep], k[keep]
    free_r = np.ones(len(rows), bool)
    free_r[r] = False
    free_k = np.ones(len(cols), bool)
    free_k[k] = False
    return rows[r], cols[k], rows[free_r], cols[free_k]


def _check_frame_size(size: Any) -> tuple[float, float] | None:
    """`(width, height)` as floats, or `None` (unknown); anything else is a `TrackingError`."""
    if size is None:
        return None
    try:
        w, h = size
        ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < float(v) < math.inf for v in (w, h))
    except (TypeError, ValueError):  # not a pair
        ok = False
    if not ok:
        raise TrackingError(f"frame_size must be (width, height) in positive pixels, or None if unknown; got {size!r}")
    return (float(w), float(h))


def _cxcywh_to_xyxy(b: F64) -> F64:
    half = np.maximum(b[:, 2:4], 0.0) * 0.5
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


@dataclass(frozen=True)
class _UpdateCost:
    """What one update's association cost (read by the offline pass): the summed gated cost
    of its matches, and how many tracks were recovered by overlap, started and missed."""

    matched: float = 0.0
    recovered: int = 0
    started: int = 0
    missed: int = 0


class Tracker:
    """Multi-object tracker for one (camera, query), fed by media time.

    Args:
        config: The settings (`streamvg.config.TrackerConfig`; every field documents its
            unit and trade-off). Defaults hold from 1 to 30 updates per second.
        interval_s: The expected seconds between updates when known beforehand (the
            sampler's `1 / fps`), so confirmation is right from the first update; later
            the measured interval is used.
        frame_size: `(width, height)` of the frames in pixels, if known; `update(...,
            frame_size=)` changes it as frames arrive. With it, an unseen track whose
            predicted box is mostly outside the frame ends; `None` (unknown) keeps such
            tracks until `max_lost_s`.
        **overrides: Fields to change from `config` (or the defaults), e.g.
            `Tracker(max_lost_s=5.0)`; validated like the pipeline file.

    Example:
        >>> trk = Tracker(min_confirm_hits=2)
        >>> box = lambda x: Detections(np.array([[x, 10, x + 40, 110]]), np.array([0.9]))
        >>> trk.update(box(0), t=0.0).track_id.tolist()      # tentative: not reported yet
        []
        >>> trk.update(box(60), t=0.6).track_id.tolist()     # no overlap with the first box
        [0]
        >>> [e.kind for e in trk.pop_events()]
        ['started']
        >>> trk.update(Detections.empty(), t=1.2).track_id.tolist(), trk.pop_events()[0].kind
        ([], 'lost')
        >>> trk.update(box(170), t=1.8).track_id.tolist()    # missed once, same id
        [0]
    """

    def __init__(
        self,
        config: TrackerConfig | None = None,
        *,
        interval_s: float | None = None,
        frame_size: tuple[float, float] | None = None,
        **overrides: Any,
    ) -> None:
        base = config if config is not None else TrackerConfig()
        self.config = base.model_copy(update=overrides) if overrides else base
        if overrides:  # model_copy does not validate
            self.config = TrackerConfig.model_validate(self.config.model_dump())
        c = self.config
        self._kf = BoxKalman(
            measurement_noise=c.measurement_noise,
            velocity_change=c.velocity_change,
            initial_speed=c.initial_speed,
            velocity_memory_s=c.velocity_memory_s,
        )
        self._gate_d2 = c.gate_sigmas**2
        self._next_id = 0
        if interval_s is not None and not (math.isfinite(interval_s) and interval_s > 0):
            raise TrackingError(f"interval_s must be positive seconds, got {interval_s!r}")
        self._interval_s = interval_s
        self._last_cost = _UpdateCost()
        # Kept over reset() like interval_s: a property of the stream, not of its tracks.
        self._frame_size = _check_frame_size(frame_size)
        self.reset()

    # --- state ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every track and event and restart ids at 0 (a new video or scene).

        The frame size stays; give a new video's with its first `update(..., frame_size=)`."""
        self._mean: F64 = np.zeros((0, 8))
        self._cov: F64 = np.zeros((0, 3, 4))  # see kalman.BoxKalman
        self._id: I64 = np.zeros(0, np.int64)  # -1 = tentative
        self._hits: I64 = np.zeros(0, np.int64)
        self._first_t: F64 = np.zeros(0)
        self._last_t: F64 = np.zeros(0)
        self._score: F64 = np.zeros(0)
        self._box: F64 = np.zeros((0, 4))  # last matched box, xyxy
        self._lost = np.zeros(0, bool)
        self._misses: I64 = np.zeros(0, np.int64)  # consecutive missed updates
        self._t: float | None = None
        self._dt: float | None = self._interval_s  # the last positive interval between updates
        self._events: list[TrackEvent] = []
        self._next_id = 0

    def state(self) -> tuple[dict[str, Any], dict[str, NDArray[Any]]]:
        """The whole tracker as JSON-safe values and plain numpy arrays (no pickle), so a
        camera's tracks can move to another process (scale-out hand-over) and go on with
        the same ids; `Tracker.from_state` rebuilds it."""
        meta = {
            "config": self.config.model_dump(mode="json"),
            "t": self._t,
            "dt": self._dt,
            "interval_s": self._interval_s,
            "frame_size": None if self._frame_size is None else list(self._frame_size),
            "next_id": self._next_id,
            "events": [[e.kind, int(e.track_id), float(e.t), float(e.score)] for e in self._events],
        }
        arrays: dict[str, NDArray[Any]] = {name: getattr(self, "_" + name) for name in _TRACK_ARRAYS}
        arrays["event_xyxy"] = np.array([e.xyxy for e in self._events], np.float32).reshape(-1, 4)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, NDArray[Any]]) -> Tracker:
        """Rebuild a tracker saved by `state()`.

        Raises:
            TrackingError: the state is incomplete or its arrays have the wrong shapes.
        """
        try:
            interval = meta.get("interval_s")  # absent in older states
            trk = cls(TrackerConfig.model_validate(meta["config"]), interval_s=None if interval is None else float(interval))
            n = len(arrays["id"])
            for name, (dtype, shape) in _TRACK_ARRAYS.items():
                a = np.asarray(arrays[name])
                if a.shape != (n, *shape) or not np.can_cast(a.dtype, dtype, "same_kind"):
                    raise ValueError(f"{name} has shape {a.shape} and dtype {a.dtype}, expected {(n, *shape)} {np.dtype(dtype)}")
                setattr(trk, "_" + name, a.astype(dtype, copy=True))
            trk._t = None if meta["t"] is None else float(meta["t"])
            trk._dt = None if meta.get("dt") is None else float(meta["dt"])  # absent in older states
            trk._frame_size = _check_frame_size(meta.get("frame_size"))  # absent in older states: unknown
            trk._next_id = int(meta["next_id"])
            xyxy = np.asarray(arrays["event_xyxy"], np.float32).reshape(-1, 4)
            if any(e[0] not in _EVENT_KINDS for e in meta["events"]):
                raise ValueError(f"unknown event kind in {meta['events']!r}")
            trk._events = [
                TrackEvent(kind, int(tid), float(t), xyxy[i].copy(), float(sc))
                for i, (kind, tid, t, sc) in enumerate(meta["events"])
            ]
        except (KeyError, TypeError, ValueError, IndexError, TrackingError) as exc:
            raise TrackingError(f"saved tracker state is incomplete or malformed ({exc}); start a new Tracker") from None
        return trk

    @property
    def t(self) -> float | None:
        """Media time of the last update (`None` before the first)."""
        return self._t

    @property
    def frame_size(self) -> tuple[float, float] | None:
        """`(width, height)` of the frames in pixels as last given (`None`: unknown)."""
        return self._frame_size

    @property
    def tracks(self) -> list[Track]:
        """Snapshots of the live tracks (tentative ones have `track_id == -1`)."""
        boxes = _cxcywh_to_xyxy(self._mean[:, :4]).astype(np.float32)
        out = []
        for i in range(len(self._id)):
            state: TrackState = "tentative" if self._id[i] < 0 else "lost" if self._lost[i] else "tracked"
            out.append(Track(
                track_id=int(self._id[i]), state=state, xyxy=boxes[i],
                velocity=self._mean[i, 4:6].astype(np.float32), score=float(self._score[i]),
                first_t=float(self._first_t[i]), last_t=float(self._last_t[i]), hits=int(self._hits[i]),
            ))
        return out

    def first_seen(self) -> dict[int, float]:
        """Media time each confirmed live track's object was first detected (before the
        track was confirmed), by track id: where a search segment starts."""
        conf = self._id >= 0
        return dict(zip(self._id[conf].tolist(), self._first_t[conf].tolist(), strict=True))

    def pop_events(self) -> list[TrackEvent]:
        """Lifecycle events since the last call, in the order they happened."""
        events, self._events = self._events, []
        return events

    # --- updates ----------------------------------------------------------------------

    def update(self, detections: Detections, t: float, *, frame_size: tuple[float, float] | None = None) -> Detections:
        """Advance to media time `t` and associate the boxes of one frame.

        Args:
            detections: Boxes of one frame in pixels (`score` splits confident from weak
                boxes). All rows must share one `image_index`; use `update_window` for a
                window of several frames.
            t: Media seconds of that frame; never less than the previous update's time
                (equal is allowed, irregular gaps are fine).
            frame_size: `(width, height)` of that frame in pixels; when given it replaces
                the stored size (a stream's size can change, e.g. a restarted encoder),
                and `None` keeps the stored one.

        Returns:
            The rows of `detections` that belong to confirmed tracks, in input order, with
            `track_id` set (≥ 0) and every other column unchanged. Boxes of tentative
            tracks and unmatched boxes are left out.

        Raises:
            TrackingError: `detections` is not `Detections`, a box is NaN/inf or has
                x2 < x1 / y2 < y1, rows span several frames, `t` is not finite or goes back,
                or `frame_size` is not two positive numbers.
        """
        return self._update(detections, t, frame_size=frame_size)

    def _update(
        self, detections: Detections, t: float, first: tuple[I64, I64] | None = None, *,
        frame_size: tuple[float, float] | None = None,
    ) -> Detections:
        """`update`, with the first stage's (tracks, boxes) pairs given by `first` when the
        offline pass (`streamvg.tracking.offline`) has chosen them."""
        t = self._check_time(t)
        dets = self._check_detections(detections)
        if frame_size is not None:
            self._frame_size = _check_frame_size(frame_size)
        z, gated, allowed, s, high, low = self._advance(dets, t)
        confirmed = (self._id >= 0).nonzero()[0]
        tentative = (self._id < 0).nonzero()[0]
        if first is None:
            tr1, de1, free_tr, free_high = _assign(gated, allowed, confirmed, high)
        else:
            tr1, de1 = first
            free_tr = np.setdiff1d(confirmed, tr1, assume_unique=True)
            free_high = np.setdiff1d(high, de1, assume_unique=True)
        tr2, de2, free_tr, _ = _assign(gated, allowed, free_tr, low)
        # Recovery: a confirmed track the prediction missed (a bounce off the frame edge,
        # a sudden stop) is re-found by a confident box overlapping where it was last seen.
        tr_r, de_r, free_high = self._recover(free_tr, free_high, dets)
        tr3, de3, _, new = _assign(gated, allowed, tentative, free_high)
        rows = np.concatenate([tr1, tr2, tr_r, tr3])
        cols = np.concatenate([de1, de2, de_r, de3])

        self._apply_matches(rows, cols, z, s, dets, t)
        if len(tr_r):  # the motion model just failed: re-learn the velocity like a new track's
            self._mean[tr_r], self._cov[tr_r] = self._kf.initiate(z[de_r])
        self._last_cost = _UpdateCost(
            float(gated[tr1, de1].sum() + gated[tr2, de2].sum() + gated[tr3, de3].sum()),
            len(tr_r), len(new), len(confirmed) - len(tr1) - len(tr2) - len(tr_r),
        )
        new_rows = self._spawn(new, z, dets, t)
        out_rows, out_ids = self._lifecycle(np.concatenate([rows, new_rows]), np.concatenate([cols, new]), dets, t)

        order = np.argsort(out_rows, kind="stable")
        idx = out_rows[order]
        return Detections(dets.xyxy[idx], dets.score[idx], dets.image_index[idx], out_ids[order])

    def _advance(self, dets: Detections, t: float) -> tuple[F64, F64, NDArray[np.bool_], F64, I64, I64]:
        """Move to time `t` (end tracks gone too long, predict) and score every (track, box)
        pair: returns the boxes as cxcywh, the gated cost, the gate, the innovation
        variances and the confident and weak box indices."""
        # Tracks unseen for longer than max_lost_s end before association: after a long
        # gap (a camera outage, a paused stream) a lost track's gate has grown to cover
        # the frame, and any box would otherwise take its old id.
        # So do tracks that missed max_missed_updates updates in a row: at high rates that
        # many misses are strong evidence the object is gone, and a lost track's growing
        # gate would otherwise take a box of whoever passes where it was. Tentative tracks
        # keep their own rule (one dropped answer allowed), whatever max_missed_updates is.
        c = self.config
        self._end((t - self._last_t > c.max_lost_s) | ((self._misses >= c.max_missed_updates) & (self._id >= 0)))
        dt = 0.0 if self._t is None else t - self._t
        self._t = t
        if dt > 0:
            self._dt = dt
        self._mean, self._cov = self._kf.predict(self._mean, self._cov, dt)
        self._end_outside_frame()
        score = dets.score.astype(np.float64)
        high = (score >= c.high_score).nonzero()[0]
        low = ((score >= c.low_score) & (score < c.high_score)).nonzero()[0]
        z = xyxy_to_cxcywh(dets.xyxy)
        gated, allowed, s = self._costs(z, dets.xyxy)
        return z, gated, allowed, s, high, low

    def _first_stage(
        self, detections: Detections, t: float, frame_size: tuple[float, float] | None = None
    ) -> tuple[F64, NDArray[np.bool_], I64, I64]:
        """The first stage's problem at `t` (gated cost, gate, confirmed tracks, confident
        boxes) without changing this tracker: what the offline pass chooses among."""
        trial = self._clone()
        if frame_size is not None:
            trial._frame_size = _check_frame_size(frame_size)
        dets = trial._check_detections(detections)
        _, gated, allowed, _, high, _ = trial._advance(dets, trial._check_time(t))
        return gated, allowed, (trial._id >= 0).nonzero()[0], high

    def _clone(self) -> Tracker:
        """An independent copy (arrays copied; config and filter shared, they never change)."""
        trial = copy.copy(self)
        for name in _TRACK_ARRAYS:
            setattr(trial, "_" + name, getattr(self, "_" + name).copy())
        trial._events = list(self._events)
        return trial

    def _recover(self, tracks: I64, boxes: I64, dets: Detections) -> tuple[I64, I64, I64]:
        """Match left-over confirmed tracks seen at the previous update to left-over
        confident boxes by overlap with the track's last box (≥ `recover_iou`); returns
        (tracks, boxes, boxes still free).

        The caller restarts the velocity of a recovered track: the motion model has just
        failed for it, and nudging the old velocity by one box would leave the next
        prediction off again (a fast object turning back at 25 fps is lost a frame later)."""
        # Only tracks seen at the previous update: the prediction just failed (a bounce),
        # not an object that was gone and whose place a newcomer now takes.
        tracks = tracks[self._misses.take(tracks) == 0]
        if len(tracks) == 0 or len(boxes) == 0 or self.config.recover_iou >= 1.0:
            return tracks[:0], boxes[:0], boxes
        iou_last = _iou(self._box, dets.xyxy.astype(np.float64))
        allowed = iou_last >= self.config.recover_iou
        rows, cols, _, free = _assign(np.where(allowed, -iou_last, _FORBIDDEN), allowed, tracks, boxes)
        return rows, cols, free

    def update_window(
        self, detections: Detections, times: Sequence[float], *, frame_size: tuple[float, float] | None = None
    ) -> Detections:
        """Feed a window's detections frame by frame, in time order.

        Args:
            detections: Boxes of the whole window; `image_index` k belongs to frame k.
            times: Media seconds of each frame of the window (`times[k]` for image k).
            frame_size: `(width, height)` of the window's frames in pixels, as in `update`.

        Returns:
            The tracked rows of every frame, concatenated in time order, `image_index` kept.
        """
        dets = self._check_detections(detections, one_frame=False)
        if frame_size is not None:
            self._frame_size = _check_frame_size(frame_size)
        times = [float(x) for x in times]
        if len(dets) and (dets.image_index.min() < 0 or dets.image_index.max() >= len(times)):
            raise TrackingError(
                f"detections.image_index must lie in [0, {len(times) - 1}] for a window of "
                f"{len(times)} times, got {sorted(set(dets.image_index.tolist()))}; give one time per frame"
            )
        parts = []
        for k in sorted(range(len(times)), key=lambda k: times[k]):
            parts.append(self.update(dets[dets.image_index == k], times[k]))
        return Detections.concat(parts)

    def hold(self, t: float) -> Detections:
        """The scene did not change up to media time `t` (the gating stage skipped the frame).

        Nothing was asked of the model, so nothing can be "lost": every track that was
        matched at the last update (or held since) counts as seen at `t`, keeps its box and
        stops moving (its velocity is set to zero; the Kalman filter is not advanced, so
        its uncertainty does not grow over a still stretch). Tracks already lost before the
        still stretch keep counting and end once unseen for more than `max_lost_s`, as in
        `update`. Tentative tracks neither gain nor lose a hit. No lifecycle events are
        produced for held tracks.

        Args:
            t: Media seconds of the unchanged frame; never less than the last update's.

        Returns:
            The held confirmed tracks: their last matched box and score, `image_index` 0,
            `track_id` set, in track order (what the carried-over answer shows).

        Raises:
            TrackingError: `t` is not finite or goes back.
        """
        t = self._check_time(t)
        self._end(self._lost & (t - self._last_t > self.config.max_lost_s))
        self._t = t
        seen = ~self._lost
        self._last_t[seen] = t
        self._mean[seen, 4:] = 0.0  # a still scene: nothing moves
        rows = (seen & (self._id >= 0)).nonzero()[0]
        return Detections(
            self._box[rows].astype(np.float32), self._score[rows].astype(np.float32),
            np.zeros(len(rows), np.int64), self._id[rows].copy(),
        )

    def finish(self, t: float) -> None:
        """End every track now (end of the video): confirmed ones emit `ended`; ids keep counting."""
        self._check_time(t)
        self._end(np.ones(len(self._id), bool))

    # --- internals ----------------------------------------------------------------------

    def _check_time(self, t: float) -> float:
        try:
            t = float(t)
        except (TypeError, ValueError):
            raise TrackingError(f"tracker time t must be a number of media seconds, got {t!r}") from None
        if not math.isfinite(t):
            raise TrackingError(f"tracker time t must be finite media seconds, got {t}")
        if self._t is not None and t < self._t:
            raise TrackingError(
                f"tracker time went back from {self._t:.3f}s to {t:.3f}s; feed frames in time "
                "order, or call reset()/use a new Tracker when the clock restarts"
            )
        return t

    def _check_detections(self, detections: Detections, *, one_frame: bool = True) -> Detections:
        if not isinstance(detections, Detections):
            raise TrackingError(
                f"tracker input must be streamvg.types.Detections, got {type(detections).__name__}"
            )
        try:
            detections.validate_boxes("tracker input")
        except ValueError as exc:
            raise TrackingError(str(exc)) from None
        if one_frame and len(detections) and detections.image_index.min() != detections.image_index.max():
            raise TrackingError(
                "tracker input spans several frames (image_index "
                f"{sorted(set(detections.image_index.tolist()))}); use update_window(detections, times)"
            )
        return detections

    def _costs(self, z: F64, det_xyxy: NDArray[np.float32]) -> tuple[F64, NDArray[np.bool_], F64]:
        """Association cost and gate `(tracks, boxes)`, and the innovation variances `(tracks, 4)`.

        The cost is `_FORBIDDEN` outside the gate.
        """
        pred, s, spread = self._kf.innovation(self._mean, self._cov)
        n, m = len(pred), len(z)
        if n == 0 or m == 0:
            return np.zeros((n, m)), np.zeros((n, m), bool), s
        d2 = self._kf.mahalanobis(pred, s, z)
        iou = _iou(_cxcywh_to_xyxy(pred), det_xyxy.astype(np.float64))
        allowed = (d2 <= self._gate_d2) | (iou >= self.config.min_iou)
        # Negative log-likelihood of the box under the prediction (relative to a perfectly
        # known track), minus an IoU bonus: sure, close, overlapping tracks win ties.
        cost = d2 + spread[:, None] - self.config.iou_weight * iou
        return np.where(allowed, cost, _FORBIDDEN), allowed, s

    def _apply_matches(self, rows: I64, cols: I64, z: F64, s: F64, dets: Detections, t: float) -> None:
        if len(rows) == 0:
            return
        self._mean[rows], self._cov[rows] = self._kf.update(self._mean[rows], self._cov[rows], z[cols], s[rows])
        self._hits[rows] += 1
        self._last_t[rows] = t
        self._score[rows] = dets.score[cols]
        self._box[rows] = dets.xyxy[cols]

    def _lifecycle(self, rows: I64, cols: I64, dets: Detections, t: float) -> tuple[I64, I64]:
        """Confirm, update, lose and end tracks; returns (detection rows, track ids) to report."""
        c = self.config
        matched = np.zeros(len(self._id), bool)
        matched[rows] = True
        confirm = (self._id[rows] < 0) & (self._hits[rows] >= self._hits_to_confirm())
        n_new = int(confirm.sum())
        self._id[rows[confirm]] = np.arange(self._next_id, self._next_id + n_new)
        self._next_id += n_new
        report = self._id[rows] >= 0
        out_rows, out_ids = cols[report], self._id[rows[report]]
        self._lost[rows[report]] = False
        kinds: list[TrackEventKind] = ["started" if new else "updated" for new in confirm[report].tolist()]
        self._events.extend(
            TrackEvent(kind, tid, t, box, sc)
            for kind, tid, box, sc in zip(
                kinds, out_ids.tolist(), dets.xyxy[out_rows], dets.score[out_rows].tolist(), strict=True
            )
        )
        newly_lost = ~matched & (self._id >= 0) & ~self._lost
        for r in newly_lost.nonzero()[0].tolist():
            self._lost[r] = True
            self._events.append(TrackEvent(
                "lost", int(self._id[r]), t, self._box[r].astype(np.float32), float(self._score[r])
            ))
        self._misses[matched] = 0
        self._misses[~matched] += 1
        # A tentative track may miss one update (a dropped answer), never two: its gate
        # widens with time, and a stray box far away must not confirm it.
        gone = ~matched & (((self._id < 0) & (self._misses > _TENTATIVE_MISSES)) | (t - self._last_t > c.max_lost_s))
        self._end(gone)
        return out_rows, out_ids

    def _hits_to_confirm(self) -> int:
        """Hits a new track needs: `min_confirm_hits`, fewer when updates are sparse.

        As many hits as updates fit in `confirm_s` (plus the first), capped by
        `min_confirm_hits`: two at 25 updates/s with the defaults, one below 10."""
        c = self.config
        if self._dt is None or c.confirm_s <= 0:
            return c.min_confirm_hits
        return max(1, min(c.min_confirm_hits, 1 + math.floor(c.confirm_s / self._dt + 1e-9)))

    def _end(self, gone: NDArray[np.bool_]) -> None:
        if not gone.any():
            return
        for r in (gone & (self._id >= 0)).nonzero()[0].tolist():
            self._events.append(TrackEvent(
                "ended", int(self._id[r]), float(self._last_t[r]), self._box[r].astype(np.float32),
                float(self._score[r]),
            ))
        keep = ~gone
        self._mean, self._cov = self._mean[keep], self._cov[keep]
        self._id, self._hits, self._lost = self._id[keep], self._hits[keep], self._lost[keep]
        self._first_t, self._last_t = self._first_t[keep], self._last_t[keep]
        self._score, self._box, self._misses = self._score[keep], self._box[keep], self._misses[keep]

    def _end_outside_frame(self) -> None:
        """End the tracks unseen at the last update whose prediction has left the frame.

        Kept, such a track's gate grows with every second unseen until it covers the frame,
        and the next person entering anywhere would take its id. "Left" is most of the
        predicted box outside (the centre past the edge by `_EXIT_MARGIN` of the box): an
        object whose centre has just crossed is still half in view and often comes back (a
        dropped answer at 25 fps, a turn at the edge); ending it at the centre cost .07–.14
        IDF1 on the benchmark's synthetic scenes at 25 fps. Tracks matched at the last
        update stay, whatever the prediction: a box at the edge may match them again.
        Tentative tracks unseen at the last update end too (they would vanish anyway).
        """
        if self._frame_size is None or len(self._id) == 0:
            return
        w, h = self._frame_size
        cx, cy = self._mean[:, 0], self._mean[:, 1]
        mx, my = _EXIT_MARGIN * np.maximum(self._mean[:, 2], 0.0), _EXIT_MARGIN * np.maximum(self._mean[:, 3], 0.0)
        outside = (cx < -mx) | (cx > w + mx) | (cy < -my) | (cy > h + my)
        self._end(outside & (self._misses > 0))

    def _spawn(self, new: I64, z: F64, dets: Detections, t: float) -> I64:
        """Start tentative tracks from boxes `new`; returns their rows (for `_lifecycle`)."""
        n, start = len(new), len(self._id)
        if n == 0:
            return np.zeros(0, np.int64)
        mean, cov = self._kf.initiate(z[new])
        self._mean = np.concatenate([self._mean, mean])
        self._cov = np.concatenate([self._cov, cov])
        self._id = np.concatenate([self._id, np.full(n, -1, np.int64)])
        self._hits = np.concatenate([self._hits, np.ones(n, np.int64)])
        self._first_t = np.concatenate([self._first_t, np.full(n, t)])
        self._last_t = np.concatenate([self._last_t, np.full(n, t)])
        self._score = np.concatenate([self._score, dets.score[new].astype(np.float64)])
        self._box = np.concatenate([self._box, dets.xyxy[new].astype(np.float64)])
        self._lost = np.concatenate([self._lost, np.zeros(n, bool)])
        self._misses = np.concatenate([self._misses, np.zeros(n, np.int64)])
        return np.arange(start, start + n, dtype=np.int64)
