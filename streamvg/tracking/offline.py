"""The offline pass of search: the online tracker, with each ambiguous decision deferred.

Online, a tracker must decide which box continues which track the moment a frame arrives.
At grounding rates (1–2 answers a second) that is where identities are lost: two people
pass each other or walk side by side, a new track has no velocity yet, and the cheapest
pairing *now* is the wrong one, which the next sightings would have shown. Offline search has
the whole video, so each decision can wait for them: this is multiple-hypothesis tracking
with one step deferred and a short horizon (N-scan pruning).

For every update, the first stage of `Tracker` (confident boxes to confirmed tracks) is
solved as online; then alternative pairings are made from it (two tracks exchange their
boxes, or a track takes a free box instead), each costing at most `max_extra_cost` more
at this frame, the `max_alternatives` cheapest kept. Each alternative, and the online
choice, is played forward on a copy of the tracker through the next `horizon` updates
(online decisions there), and the one whose updates cost least in total is kept: the sum
of the matches' costs (the tracker's own: squared standard deviations of the prediction,
see `Tracker`), plus `start_cost` for each track started (or re-found by overlap, which
restarts its motion) and `miss_cost` for each confirmed track left without a box. Then the next update.

Measured on TUD with noisy boxes (`benchmarks/tracking.py`, 10 seeds): IDF1 at 1.7
updates/s .768 → .786 (0.84× → 0.86× of the true-id ceiling), at 5/s .889 → .898, at 25/s
unchanged; up to +.06 on the held-out settings at 1–2.5 updates/s.

Cost: (1 + alternatives) × (1 + horizon) tracker updates for frames with an alternative, one
otherwise; a 10-minute video grounded at 2 fps with a few objects takes seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from streamvg.config import TrackerConfig
from streamvg.tracking.tracker import Tracker, TrackEvent, _assign
from streamvg.types import Detections

__all__ = ["OfflineConfig", "OfflineResult", "track_offline"]

I64 = NDArray[np.int64]
Size = tuple[float, float]


@dataclass(frozen=True)
class OfflineConfig:
    """Settings of the offline pass (the tracker's own are `TrackerConfig`'s).

    Attributes:
        horizon: Updates played forward to judge a decision; more sees further past a
            crossing, at proportional cost.
        max_alternatives: Alternative pairings tried per update besides the online one.
        max_extra_cost: How much worse than the online pairing (at its own frame, squared
            standard deviations) an alternative may be and still be tried.
        start_cost: Cost of starting a track, against matching a box to an existing one.
        miss_cost: Cost of a confirmed track left without a box at an update.
    """

    horizon: int = 4
    max_alternatives: int = 12
    max_extra_cost: float = 20.0
    start_cost: float = 12.0
    miss_cost: float = 6.0

    def __post_init__(self) -> None:
        if self.horizon < 0 or self.max_alternatives < 0:
            raise ValueError("OfflineConfig.horizon and max_alternatives must be ≥ 0")
        for name in ("max_extra_cost", "start_cost", "miss_cost"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"OfflineConfig.{name} must be ≥ 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class OfflineResult:
    """What the offline pass made.

    Attributes:
        tracked: Per update, the rows of its detections that belong to confirmed tracks,
            `track_id` set (as `Tracker.update` returns them).
        events: Every lifecycle event, in order (as `Tracker.pop_events` would give them),
            ending with `ended` for the tracks alive at the last update.
        first_seen: Track id → media time the object was first detected.
        changed: Updates where a pairing other than the online one was kept.
    """

    tracked: list[Detections]
    events: list[TrackEvent]
    first_seen: dict[int, float]
    changed: int


def _alternatives(trk: Tracker, dets: Detections, t: float, size: Size | None, cfg: OfflineConfig) -> list[tuple[I64, I64]]:
    """The online first-stage pairing, then up to `max_alternatives` others, cheapest first."""
    gated, allowed, rows, cols = trk._first_stage(dets, t, size)
    r0, c0, _, free = _assign(gated, allowed, rows, cols)
    online = (r0, c0)
    if cfg.max_alternatives == 0 or len(r0) == 0:
        return [online]
    base = gated[r0, c0]
    # Candidates as flat arrays (swaps, then free boxes; each with its extra cost), and only
    # the `max_alternatives` cheapest made into pairings: a crowd of m boxes has ~m²/2 swaps.
    cand_d, cand_a, cand_b, cand_free = [], [], [], []
    m = len(r0)
    if m > 1:  # two tracks exchange their boxes
        cross = gated[np.ix_(r0, c0)]  # cross[i, j]: track r0[i] with box c0[j]
        ok = allowed[np.ix_(r0, c0)]
        i, j = np.triu_indices(m, 1)
        d = cross[i, j] + cross[j, i] - base[i] - base[j]
        keep = ok[i, j] & ok[j, i] & (d <= cfg.max_extra_cost)
        cand_d.append(d[keep])
        cand_a.append(i[keep])
        cand_b.append(j[keep])
        cand_free.append(np.zeros(int(keep.sum()), bool))
    if len(free):  # a track takes a box nobody took instead of its own
        sub = gated[np.ix_(r0, free)]
        ok = allowed[np.ix_(r0, free)]
        d = sub - base[:, None]
        a, k = np.nonzero(ok & (d <= cfg.max_extra_cost))
        cand_d.append(d[a, k])
        cand_a.append(a)
        cand_b.append(k)
        cand_free.append(np.ones(len(a), bool))
    if not cand_d:
        return [online]
    dd, aa, bb, ff = (np.concatenate(x) for x in (cand_d, cand_a, cand_b, cand_free))
    out = [online]
    for n in np.argsort(dd, kind="stable")[: cfg.max_alternatives].tolist():
        c = c0.copy()
        a_, b_ = int(aa[n]), int(bb[n])
        if ff[n]:
            c[a_] = free[b_]
        else:
            c[a_], c[b_] = c0[b_], c0[a_]
        out.append((r0, c))
    return out


def _cost(trk: Tracker, cfg: OfflineConfig) -> float:
    c = trk._last_cost
    return c.matched + cfg.start_cost * (c.started + c.recovered) + cfg.miss_cost * c.missed


def track_offline(
    frames: Sequence[tuple[Detections, float]],
    config: TrackerConfig | None = None,
    *,
    offline: OfflineConfig | None = None,
    interval_s: float | None = None,
    frame_sizes: Sequence[Size | None] | None = None,
) -> OfflineResult:
    """Track a whole sequence of one (camera, query) with deferred decisions.

    Args:
        frames: `(detections of one frame, media seconds)` in time order, as `Tracker.update`
            takes them.
        config: The tracker's settings (defaults if None).
        offline: The deferral's settings (see `OfflineConfig`).
        interval_s: Seconds between updates when known (the sampler's `1 / fps`).
        frame_sizes: `(width, height)` of each frame, as `Tracker.update`'s `frame_size`
            (None: unknown, or unchanged from the frame before).

    Returns:
        An `OfflineResult`; ids are numbered as the online tracker would.

    Raises:
        TrackingError: as `Tracker.update` (bad boxes, time going back).
    """
    cfg = offline or OfflineConfig()
    trk = Tracker(config, interval_s=interval_s)
    tracked: list[Detections] = []
    events: list[TrackEvent] = []
    first_seen: dict[int, float] = {}
    changed = 0
    if frame_sizes is not None and len(frame_sizes) != len(frames):
        raise ValueError(f"frame_sizes needs one entry per frame, got {len(frame_sizes)} for {len(frames)} frames")
    sizes = list(frame_sizes) if frame_sizes is not None else [None] * len(frames)
    for i, (dets, t) in enumerate(frames):
        choice: tuple[I64, I64] | None = None
        alts = _alternatives(trk, dets, t, sizes[i], cfg)
        if len(alts) > 1:
            totals = []
            for alt in alts:
                trial = trk._clone()
                trial._update(dets, t, alt, frame_size=sizes[i])
                total = _cost(trial, cfg)
                for j in range(i + 1, min(i + 1 + cfg.horizon, len(frames))):
                    trial.update(frames[j][0], frames[j][1], frame_size=sizes[j])
                    total += _cost(trial, cfg)
                totals.append(total)
            best = int(np.argmin(totals))
            choice = alts[best]
            changed += best != 0
        tracked.append(trk._update(dets, t, choice, frame_size=sizes[i]))
        now = trk.pop_events()
        started = [e.track_id for e in now if e.kind == "started"]
        if started:  # a track's first sighting is known once it is confirmed
            times = trk.first_seen()
            first_seen.update((tid, times[tid]) for tid in started)
        events.extend(now)
    if frames:
        trk.finish(float(frames[-1][1]))
        events.extend(trk.pop_events())
    return OfflineResult(tracked, events, first_seen, changed)
