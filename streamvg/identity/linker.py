"""`Linker`: evidence between per-camera tracks of one query → global identities.

Votes come in pairs of tracks of different cameras, each from one window (one instant):
*agree* ("these two boxes are one object") or *contradict* ("the other camera's box of this
object is another track"). A pair is **linked** once agreeing votes came from at least
`min_agree` distinct windows and contradicting votes are at most `max_contradiction` of the
agreeing ones; it is **contradicted** once contradicting votes from `min_agree` windows
outnumber the agreeing ones. A link whose contradictions grow past the limit is undone.

Identities are the connected groups of linked pairs, built greedily from the strongest link
(agree − contradict votes) down, never joining two groups whose votes between them are not
on balance agreeing, or that would hold

- two tracks of one camera that were seen in the same frame (one object is never twice in
  one picture), or
- a contradicted pair.

A group's `global_id` is the smallest home id of its members (each track gets a home id the
first time it is seen), so ids are stable while groups grow: when two groups join, the
younger one takes the older id; when a link is undone, the split-off part returns to the
smallest home id among its own members.

All state is plain (dicts of ints, floats and strings): `state()` / `from_state()` carry
it as JSON, so a scale-out worker can hand it over without pickling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Linker", "PairEvidence", "TrackKey", "TrackSpan"]

TrackKey = tuple[str, int]
"""`(camera, track_id)`: a per-camera track of one query."""

_STATE_FORMAT = "streamvg.linker/v1"


@dataclass
class PairEvidence:
    """Votes about whether two tracks (of different cameras) are one object.

    Attributes:
        agree, contradict: Votes of each kind.
        agree_windows, contradict_windows: Distinct windows that gave such a vote (a window
            asked twice about the same pair counts once here).
    """

    agree: int = 0
    contradict: int = 0
    agree_windows: int = 0
    contradict_windows: int = 0
    last_agree: str = ""
    last_contradict: str = ""


@dataclass
class TrackSpan:
    """When a track was seen (media seconds of its own camera) and its home id."""

    home_id: int
    first_t: float
    last_t: float
    ended: bool = False


@dataclass
class _Counter:
    value: int = 0

    def __call__(self) -> int:
        v = self.value
        self.value += 1
        return v


@dataclass
class Linker:
    """Global identities of one query's tracks across cameras, from accumulated votes.

    Args:
        min_agree: Distinct agreeing windows before two tracks are linked; higher resists
            wrong answers (a 10 % error rate rarely repeats on one pair three times) but
            leaves tracks on their own ids for longer.
        max_contradiction: A link holds while contradicting votes are at most this
            fraction of agreeing ones; lower undoes doubtful links sooner.
        new_id: Source of home ids (share one between linkers for ids unique across queries).
        near_s, far, far_repeats: When are two tracks of one camera "in two places at once"
            (see `see`); 0 repeats turns the rule off (only same-frame tracks conflict).

    Example:
        >>> lk = Linker(min_agree=2)
        >>> lk.see("cam0", 0.0, [1]); lk.see("cam1", 0.0, [7])
        >>> lk.vote(("cam0", 1), ("cam1", 7), agree=True, window="w0")
        >>> lk.global_id(("cam0", 1)) == lk.global_id(("cam1", 7))
        False
        >>> lk.vote(("cam0", 1), ("cam1", 7), agree=True, window="w1")
        >>> lk.global_id(("cam0", 1)) == lk.global_id(("cam1", 7))
        True
    """

    min_agree: int = 3
    max_contradiction: float = 0.5
    new_id: Callable[[], int] = field(default_factory=_Counter)
    tracks: dict[TrackKey, TrackSpan] = field(default_factory=dict)
    evidence: dict[tuple[TrackKey, TrackKey], PairEvidence] = field(default_factory=dict)
    conflicts: dict[TrackKey, set[TrackKey]] = field(default_factory=dict)
    _gid: dict[TrackKey, int] = field(default_factory=dict)
    _status: dict[tuple[TrackKey, TrackKey], int] = field(default_factory=dict)  # 1 linked, -1 contradicted
    _dirty: bool = False
    near_s: float = 1.0
    far: float = 2.0
    far_repeats: int = 2
    _recent: dict[str, dict[TrackKey, tuple[float, float, float, float]]] = field(default_factory=dict)
    _apart: dict[tuple[TrackKey, TrackKey], int] = field(default_factory=dict)  # (a, b): a seen far from b
    _seen: dict[TrackKey, int] = field(default_factory=dict)  # sightings with a box
    links_made: int = 0
    links_undone: int = 0

    def __post_init__(self) -> None:
        if self.min_agree < 1:
            raise ValueError(f"min_agree must be at least 1 window, got {self.min_agree}")
        if not 0.0 <= self.max_contradiction <= 1.0:
            raise ValueError(f"max_contradiction must be in [0, 1], got {self.max_contradiction}")

    # --- observations -----------------------------------------------------------------

    def track(self, key: TrackKey, t: float) -> TrackSpan:
        """Register (or extend) a track seen at media time `t`; returns its span."""
        span = self.tracks.get(key)
        if span is None:
            span = self.tracks[key] = TrackSpan(self.new_id(), float(t), float(t))
            self._gid[key] = span.home_id
        else:
            span.first_t = min(span.first_t, float(t))
            span.last_t = max(span.last_t, float(t))
        return span

    def see(
        self, camera: str, t: float, track_ids: Iterable[int], boxes: Sequence[Sequence[float]] | None = None
    ) -> None:
        """Tracks of `camera` seen together in one frame at media time `t`.

        Tracks seen in one frame are different objects: they never share an identity.
        With `boxes` (one xyxy per track id), so are two tracks of one camera when one was
        seen, for most of its sightings and at least `far_repeats` times, within `near_s`
        seconds of the other and more than `far` box sizes away from it (one object is not
        in two places at once; a few wrong boxes a long track absorbed do not count). This catches a track built from wrong answers that replaced
        the true box, which is never in the same frame as the true track, while two tracks
        the tracker made of one object (seen at the same place) stay free to be joined.
        """
        ids = [int(i) for i in track_ids]
        keys = [(camera, i) for i in ids if i >= 0]
        for k in keys:
            self.track(k, t)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                if a != b:
                    self._conflict(a, b)
        if boxes is None or self.far_repeats <= 0:
            return
        recent = self._recent.setdefault(camera, {})
        for tid, box in zip(ids, boxes, strict=True):
            if tid < 0:
                continue
            a = (camera, tid)
            self._seen[a] = self._seen.get(a, 0) + 1
            cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
            size = max(1.0, ((box[2] - box[0]) + (box[3] - box[1])) / 2.0)
            for b, (tb, bx, by, bs) in list(recent.items()):
                if t - tb > self.near_s:
                    del recent[b]
                    continue
                if b != a and ((cx - bx) ** 2 + (cy - by) ** 2) ** 0.5 > self.far * (size + bs) / 2.0:
                    # a seen away from b: a conflict once that is most of a's (or b's) life, at
                    # least `far_repeats` times; a few wrong boxes a long track absorbed are not.
                    n = self._apart[(a, b)] = self._apart.get((a, b), 0) + 1
                    m = self._apart.get((b, a), 0)
                    if (n >= self.far_repeats and n >= 0.5 * self._seen.get(a, 1)) or (
                        m >= self.far_repeats and m >= 0.5 * self._seen.get(b, 1)
                    ):
                        self._conflict(a, b)
            recent[a] = (float(t), cx, cy, size)

    def _conflict(self, a: TrackKey, b: TrackKey) -> None:
        ca = self.conflicts.setdefault(a, set())
        if b not in ca:
            ca.add(b)
            self.conflicts.setdefault(b, set()).add(a)
            if self._gid.get(a) == self._gid.get(b):
                self._dirty = True  # a group now holds two objects of one camera at once: split it

    def end(self, key: TrackKey, t: float | None = None) -> None:
        """The track ended (its identity stays; nothing new will be seen of it)."""
        span = self.tracks.get(key)
        if span is not None:
            span.ended = True
            if t is not None:
                span.last_t = max(span.last_t, float(t))

    def vote(self, a: TrackKey, b: TrackKey, *, agree: bool, window: str) -> None:
        """One window's vote on whether tracks `a` and `b` are one object.

        Votes between tracks of one camera are ignored: only other cameras link them.
        """
        if a[0] == b[0] or a == b:
            return
        for k in (a, b):
            if k not in self.tracks:
                self.track(k, 0.0)
        pair = (a, b) if a < b else (b, a)
        ev = self.evidence.get(pair)
        if ev is None:
            ev = self.evidence[pair] = PairEvidence()
        if agree:
            ev.agree += 1
            if ev.last_agree != window:
                ev.agree_windows += 1
                ev.last_agree = window
        else:
            ev.contradict += 1
            if ev.last_contradict != window:
                ev.contradict_windows += 1
                ev.last_contradict = window
        status = self._pair_status(ev)
        old = self._status.get(pair, 0)
        if status != old:
            if status:
                self._status[pair] = status
            else:
                self._status.pop(pair, None)
            if old == 1:
                self.links_undone += 1
            if status == 1:
                self.links_made += 1
            self._dirty = True

    def _pair_status(self, ev: PairEvidence) -> int:
        if ev.agree_windows >= self.min_agree and ev.contradict <= self.max_contradiction * ev.agree:
            return 1
        if ev.contradict_windows >= self.min_agree and ev.contradict > ev.agree:
            return -1
        return 0

    # --- identities ---------------------------------------------------------------------

    def linked(self, a: TrackKey, b: TrackKey) -> bool:
        """Whether the evidence links `a` and `b` directly (not through others)."""
        pair = (a, b) if a < b else (b, a)
        return self._status.get(pair, 0) == 1

    def global_id(self, key: TrackKey) -> int:
        """The identity of a track (registers an unknown track with a new home id)."""
        if key not in self.tracks:
            self.track(key, 0.0)
        if self._dirty:
            self._regroup()
        return self._gid[key]

    def identities(self) -> dict[int, list[TrackKey]]:
        """`{global_id: [track keys]}`, every known track in exactly one identity."""
        if self._dirty:
            self._regroup()
        out: dict[int, list[TrackKey]] = {}
        for key in sorted(self.tracks):
            out.setdefault(self._gid[key], []).append(key)
        return out

    def _regroup(self) -> None:
        self._dirty = False
        parent: dict[TrackKey, TrackKey] = {k: k for k in self.tracks}
        members: dict[TrackKey, set[TrackKey]] = {k: {k} for k in self.tracks}

        def find(k: TrackKey) -> TrackKey:
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        cannot: dict[TrackKey, set[TrackKey]] = {k: set(v) for k, v in self.conflicts.items()}
        edges: list[tuple[int, TrackKey, TrackKey]] = []
        for (a, b), st in self._status.items():
            if st == -1:
                cannot.setdefault(a, set()).add(b)
                cannot.setdefault(b, set()).add(a)
            elif st == 1:
                ev = self.evidence[(a, b)]
                edges.append((ev.agree - ev.contradict, a, b))
        edges.sort(key=lambda e: (-e[0], e[1], e[2]))
        for _s, a, b in edges:
            ra, rb = find(a), find(b)
            if ra == rb:
                continue
            ma, mb = members[ra], members[rb]
            if len(ma) > len(mb):
                ra, rb, ma, mb = rb, ra, mb, ma
            if any(cannot.get(x, _EMPTY) & mb for x in ma):
                continue  # would put two objects of one frame, or a contradicted pair, in one identity
            if self._net(ma, mb) <= 0:
                continue  # the groups as wholes disagree more than they agree (a tracker swap, say)
            parent[ra] = rb
            mb |= ma
            del members[ra]
        for root, group in members.items():
            del root
            gid = min(self.tracks[k].home_id for k in group)
            for k in group:
                self._gid[k] = gid

    def reset_groups(self) -> None:
        """Recompute statuses and groups from the evidence (after tracks were removed)."""
        self._status = {p: st for p, e in self.evidence.items() if (st := self._pair_status(e))}
        self._gid = {k: s.home_id for k, s in self.tracks.items()}
        self._recent.clear()
        self._apart = {p: n for p, n in self._apart.items() if p[0] in self.tracks and p[1] in self.tracks}
        self._dirty = True

    def _net(self, ma: set[TrackKey], mb: set[TrackKey]) -> int:
        """Agreeing minus contradicting votes between two groups of tracks."""
        net = 0
        ev = self.evidence
        for x in ma:
            for y in mb:
                e = ev.get((x, y) if x < y else (y, x))
                if e is not None:
                    net += e.agree - e.contradict
        return net

    # --- hand-over ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything as JSON-ready data (`from_state` reads it back)."""
        return {
            "format": _STATE_FORMAT,
            "min_agree": self.min_agree,
            "max_contradiction": self.max_contradiction,
            "tracks": [[k[0], k[1], s.home_id, s.first_t, s.last_t, s.ended] for k, s in self.tracks.items()],
            "evidence": [
                [a[0], a[1], b[0], b[1], e.agree, e.contradict, e.agree_windows, e.contradict_windows, e.last_agree, e.last_contradict]
                for (a, b), e in self.evidence.items()
            ],
            "conflicts": [[a[0], a[1], b[0], b[1]] for a, bs in self.conflicts.items() for b in bs if a < b],
        }

    @classmethod
    def from_state(cls, data: dict[str, Any], *, new_id: Callable[[], int] | None = None) -> Linker:
        """A linker from `state()` data.

        Raises:
            ValueError: `data` is not a linker state of this format.
        """
        if not isinstance(data, dict) or data.get("format") != _STATE_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not a linker state (format {got!r}, expected {_STATE_FORMAT!r})")
        lk = cls(min_agree=int(data["min_agree"]), max_contradiction=float(data["max_contradiction"]))
        if new_id is not None:
            lk.new_id = new_id
        for cam, tid, home, t0, t1, ended in data["tracks"]:
            key = (str(cam), int(tid))
            lk.tracks[key] = TrackSpan(int(home), float(t0), float(t1), bool(ended))
            lk._gid[key] = int(home)
        for ca, ta, cb, tb, ag, co, agw, cow, la, lc in data["evidence"]:
            pair = ((str(ca), int(ta)), (str(cb), int(tb)))
            ev = lk.evidence[pair] = PairEvidence(int(ag), int(co), int(agw), int(cow), str(la), str(lc))
            st = lk._pair_status(ev)
            if st:
                lk._status[pair] = st
        for ca, ta, cb, tb in data["conflicts"]:
            a, b = (str(ca), int(ta)), (str(cb), int(tb))
            lk.conflicts.setdefault(a, set()).add(b)
            lk.conflicts.setdefault(b, set()).add(a)
        lk._dirty = True
        return lk

    def max_home_id(self) -> int:
        """The largest home id in use (-1 when none), to continue a shared counter after a hand-over."""
        return max((s.home_id for s in self.tracks.values()), default=-1)


_EMPTY: frozenset[TrackKey] = frozenset()


def pairs_of(keys: Sequence[TrackKey]) -> list[tuple[TrackKey, TrackKey]]:
    """Every pair of keys from different cameras (for one-referent windows)."""
    return [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :] if a[0] != b[0]]
