"""The offline linker: join tracklets across gaps using the whole trajectory, both ways.

Offline search has the whole video, so it need not decide online. After the online pass
(`Tracker`), each track is a tracklet; the linker

1. fits each tracklet's motion at its two ends (a straight line through the centres seen
   in the last / first `fit_s` seconds: smoothed position and velocity),
2. scores every pair (A ends, B starts later, at most `max_gap_s` after): A predicted
   forward to B's start and B predicted backward to A's end must both land near the other
   (in box heights, the allowance growing with the gap), the box size must agree, and the
   implied speed must be possible,
3. picks the links by one global assignment (Hungarian) over all (end, start) pairs, so a
   tracklet is continued by at most one other and the cheapest consistent set wins,
4. drops chains with fewer than `min_hits` boxes (false boxes that made a short track).

Two tracklets seen at the same time are never joined (a link needs A's last box strictly
before B's first), so two objects present together never become one.

Example:
    >>> t = np.array([0.0, 0.5, 1.0, 3.0, 3.5, 4.0])
    >>> x = 100 + 50 * t                      # one object walking right, unseen for 2 s
    >>> xyxy = np.stack([x, np.full(6, 100.0), x + 40, np.full(6, 200.0)], axis=1)
    >>> ids = np.array([0, 0, 0, 1, 1, 1])    # the online tracker gave it a new id
    >>> link_tracks(ids, t, xyxy).track_id.tolist()
    [0, 0, 0, 0, 0, 0]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

__all__ = ["LinkResult", "LinkerConfig", "link_tracks"]

_FORBIDDEN = 1e9


@dataclass(frozen=True, kw_only=True)
class LinkerConfig:
    """Offline linking settings, in media seconds and box heights.

    Attributes:
        max_gap_s: Longest gap (seconds) a link may bridge; longer joins more occlusions
            but risks joining two objects that passed the same place.
        min_gap_s: Shortest gap a link may bridge. The online tracker already bridged
            gaps up to its `max_lost_s` with a tighter gate, so a track that ended and
            one that began within that time are most often two objects; set it to the
            tracker's `max_lost_s` to join only what the online pass could not.
        fit_s: Seconds of each tracklet end used to fit its motion; longer smooths noisy
            boxes but follows turns worse.
        position_sigma: Allowed miss of a prediction at zero gap, in box heights (one
            standard deviation).
        sigma_per_s: How much that allowance grows per second of gap, in box heights
            (unknown acceleration while unseen).
        size_sigma: Allowed change of box height and width across a link, as a log ratio
            (one standard deviation).
        max_speed: Fastest plausible motion across a gap, in box heights per second.
        max_cost: Gate on a link's cost (a squared-deviation sum); lower joins less.
        min_hits: Chains with fewer boxes are dropped as false (a stray box or two).
    """

    max_gap_s: float = 10.0
    min_gap_s: float = 0.0
    fit_s: float = 1.5
    position_sigma: float = 0.35
    sigma_per_s: float = 0.35
    size_sigma: float = 0.25
    max_speed: float = 3.0
    max_cost: float = 9.0
    min_hits: int = 2

    def __post_init__(self) -> None:
        for name in ("max_gap_s", "fit_s", "position_sigma", "size_sigma", "max_speed", "max_cost"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinkerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.min_gap_s < 0 or self.min_gap_s >= self.max_gap_s:
            raise ValueError(f"LinkerConfig.min_gap_s must lie in [0, max_gap_s = {self.max_gap_s}), got {self.min_gap_s}")
        if self.sigma_per_s < 0 or self.min_hits < 1:
            raise ValueError("LinkerConfig.sigma_per_s must be ≥ 0 and min_hits ≥ 1")


@dataclass(frozen=True)
class LinkResult:
    """What linking did.

    Attributes:
        track_id: `(N,)` the linked id of each input row (the id of its chain's first
            tracklet), `-1` for rows of dropped chains.
        id_map: Old track id → linked id (`-1`: dropped).
        links: `(A, B)` pairs joined, A's end continued by B's start.
    """

    track_id: NDArray[np.int64]
    id_map: dict[int, int]
    links: list[tuple[int, int]]


def _end_fit(t: NDArray[np.float64], c: NDArray[np.float64], fit_s: float, at_end: bool) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """Smoothed centre and velocity `(2,)` at one end of a tracklet, and that end's time."""
    t_end = float(t[-1] if at_end else t[0])
    sel = (t >= t_end - fit_s) if at_end else (t <= t_end + fit_s)
    if sel.sum() < 2:
        sel = np.zeros(len(t), bool)
        if at_end:
            sel[-min(2, len(t)):] = True
        else:
            sel[: min(2, len(t))] = True
    ts, cs = t[sel], c[sel]
    if len(ts) < 2 or float(ts.max() - ts.min()) < 1e-6:
        return cs.mean(axis=0), np.zeros(2), t_end
    dt = ts - t_end
    a = np.stack([np.ones_like(dt), dt], axis=1)
    coef, *_ = np.linalg.lstsq(a, cs, rcond=None)
    return coef[0], coef[1], t_end


def link_tracks(
    track_id: NDArray[np.integer],
    t: NDArray[np.floating],
    xyxy: NDArray[np.floating],
    score: NDArray[np.floating] | None = None,
    config: LinkerConfig | None = None,
) -> LinkResult:
    """Join the tracklets of one (camera, query) across gaps (see the module docstring).

    Args:
        track_id: `(N,)` online track id of each box (≥ 0).
        t: `(N,)` media seconds of each box.
        xyxy: `(N, 4)` the boxes, in pixels.
        score: `(N,)` box scores (unused by the cost today; kept for the interface).
        config: Settings; defaults hold from 1 to 25 updates per second.

    Returns:
        A `LinkResult` with one linked id per row.
    """
    cfg = config or LinkerConfig()
    ids = np.asarray(track_id, np.int64)
    tt = np.asarray(t, np.float64)
    boxes = np.asarray(xyxy, np.float64).reshape(-1, 4)
    if not (len(ids) == len(tt) == len(boxes)):
        raise ValueError(f"track_id, t and xyxy need one row each, got {len(ids)}, {len(tt)}, {len(boxes)}")
    if len(ids) == 0:
        return LinkResult(ids.copy(), {}, [])
    uniq = np.unique(ids)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    wh = np.maximum(boxes[:, 2:] - boxes[:, :2], 1e-3)
    n = len(uniq)
    t0, t1 = np.zeros(n), np.zeros(n)
    c0, c1, v0, v1 = (np.zeros((n, 2)) for _ in range(4))
    s0, s1 = np.zeros((n, 2)), np.zeros((n, 2))
    hits = np.zeros(n, np.int64)
    order = np.lexsort((tt, ids))
    starts = np.searchsorted(ids[order], uniq, side="left")
    stops = np.searchsorted(ids[order], uniq, side="right")
    for k in range(n):
        rows = order[starts[k] : stops[k]]
        tk, ck, wk = tt[rows], centres[rows], wh[rows]
        hits[k] = len(rows)
        c0[k], v0[k], t0[k] = _end_fit(tk, ck, cfg.fit_s, at_end=False)
        c1[k], v1[k], t1[k] = _end_fit(tk, ck, cfg.fit_s, at_end=True)
        s0[k] = np.median(wk[tk <= t0[k] + cfg.fit_s], axis=0)
        s1[k] = np.median(wk[tk >= t1[k] - cfg.fit_s], axis=0)

    # Pair costs: tails (rows, A) × heads (cols, B).
    gap = t0[None, :] - t1[:, None]
    ok = (gap > max(cfg.min_gap_s, 1e-9)) & (gap <= cfg.max_gap_s)
    h = 0.5 * (s1[:, None, 1] + s0[None, :, 1])
    g = np.maximum(gap, 0.0)
    fwd = c1[:, None, :] + v1[:, None, :] * g[..., None] - c0[None, :, :]
    bwd = c0[None, :, :] - v0[None, :, :] * g[..., None] - c1[:, None, :]
    e = 0.5 * (np.linalg.norm(fwd, axis=2) + np.linalg.norm(bwd, axis=2)) / h
    sigma = cfg.position_sigma + cfg.sigma_per_s * g
    size = np.abs(np.log(s0[None, :, :] / s1[:, None, :])).max(axis=2) / cfg.size_sigma
    speed = np.linalg.norm(c0[None, :, :] - c1[:, None, :], axis=2) / h / np.maximum(g, 1e-9)
    cost = (e / sigma) ** 2 + size**2 + g / cfg.max_gap_s
    ok &= (cost <= cfg.max_cost) & (speed <= cfg.max_speed)
    links: list[tuple[int, int]] = []
    nxt = np.full(n, -1, np.int64)
    has_prev = np.zeros(n, bool)
    if ok.any():
        r_any, c_any = np.flatnonzero(ok.any(axis=1)), np.flatnonzero(ok.any(axis=0))
        sub = np.where(ok, cost, _FORBIDDEN)[np.ix_(r_any, c_any)]
        rr, cc = linear_sum_assignment(sub)
        for a, b in zip(r_any[rr].tolist(), c_any[cc].tolist(), strict=True):
            if ok[a, b]:
                nxt[a] = b
                has_prev[b] = True
                links.append((int(uniq[a]), int(uniq[b])))

    chain = np.full(n, -1, np.int64)
    id_map: dict[int, int] = {}
    for k in np.argsort(t0, kind="stable").tolist():
        if has_prev[k]:
            continue
        members = [k]
        while nxt[members[-1]] >= 0:
            members.append(int(nxt[members[-1]]))
        keep = hits[members].sum() >= cfg.min_hits
        new = int(uniq[k]) if keep else -1
        for m in members:
            chain[m] = new
            id_map[int(uniq[m])] = new
    out = chain[np.searchsorted(uniq, ids)]
    return LinkResult(out, id_map, links)

