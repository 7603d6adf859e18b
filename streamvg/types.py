"""The value types every stage speaks: `Frame`, `Window`, `Detections`, `Query`.

In-process types are dataclasses over numpy arrays (wire events are pydantic, in
`streamvg.events`). `Detections` is columnar in the manner of `supervision.Detections`:
parallel arrays, validated once at construction, sliced together by one indexer, so no
stage builds a Python object per box.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = ["Detections", "Frame", "Query", "QueryMode", "Window"]

QueryMode = Literal["direct", "reason"]


@dataclass(frozen=True, eq=False)
class Frame:
    """One decoded picture.

    Attributes:
        camera: Name of the source the frame came from (a pipeline's `sources[].name`).
        index: Frame number in its source (0-based, decode order of presentation).
        pts: Presentation time in media seconds from the source's start, read from the
            container (FFmpeg's best-effort time where the container's timestamps are
            out of display order; carried on across timestamp restarts within a file),
            never derived from `index / nominal_fps`.
        image: `(H, W, 3)` uint8 array in **RGB** order.
        wall_time: Unix seconds at capture for live sources; `None` for files.
    """

    camera: str
    index: int
    pts: float
    image: NDArray[np.uint8]
    wall_time: float | None = None

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
            shape = getattr(img, "shape", type(img).__name__)
            raise ValueError(f"Frame.image must be an (H, W, 3) RGB array, got {shape}")
        if img.dtype != np.uint8:
            raise ValueError(f"Frame.image must be uint8, got {img.dtype}")

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """`(width, height)` in pixels."""
        return (int(self.image.shape[1]), int(self.image.shape[0]))

    def __repr__(self) -> str:
        return (
            f"Frame(camera={self.camera!r}, index={self.index}, pts={self.pts:.3f}, "
            f"size={self.width}x{self.height}, wall_time={self.wall_time})"
        )


@dataclass(frozen=True, eq=False)
class Window:
    """The unit of grounding: an ordered tuple of frames with a stable `id`.

    A window holds one camera over time (`frames` in time order) or several cameras at
    one instant (one frame per present camera, `missing` naming the cameras that had no
    frame within the alignment tolerance).

    Attributes:
        id: Stable identifier, derived from the frames' cameras and indices unless given,
            so the same frames always make the same id (re-runs and replays agree).
        frames: The frames, in the order the model sees them (image k = `frames[k]`).
        missing: Cameras that a multi-camera window expected but could not fill.
    """

    frames: tuple[Frame, ...]
    id: str = ""
    missing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.frames, tuple):
            object.__setattr__(self, "frames", tuple(self.frames))
        if not self.frames:
            raise ValueError("Window.frames must hold at least one frame")
        if not self.id:
            key = "|".join(f"{f.camera}:{f.index}" for f in self.frames)
            object.__setattr__(self, "id", hashlib.sha1(key.encode()).hexdigest()[:16])

    def __len__(self) -> int:
        return len(self.frames)

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __getitem__(self, i: int) -> Frame:
        return self.frames[i]

    @property
    def cameras(self) -> tuple[str, ...]:
        """Camera of each frame, in frame order."""
        return tuple(f.camera for f in self.frames)

    @property
    def frame_sizes(self) -> list[tuple[int, int]]:
        """`(width, height)` of each frame, in frame order."""
        return [f.size for f in self.frames]

    @property
    def start(self) -> float:
        """Media time (s) of the first frame."""
        return self.frames[0].pts

    @property
    def end(self) -> float:
        """Media time (s) of the last frame."""
        return self.frames[-1].pts


@dataclass(frozen=True)
class Query:
    """A natural-language question asked of every window.

    Attributes:
        id: Short stable identifier used in events and Redis keys.
        text: The question, e.g. "the man in the yellow vest".
        mode: `direct` answers at once; `reason` lets the model think first
            (`<think>…</think><answer>…</answer>`), slower but better on hard queries.
        min_score: Boxes scoring below this are dropped before tracking.
    """

    id: str
    text: str
    mode: QueryMode = "direct"
    min_score: float = 0.0

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("Query.id must be a non-empty string")
        if not self.text.strip():
            raise ValueError(f"Query {self.id!r} has empty text; give the question to ask")
        if self.mode not in ("direct", "reason"):
            raise ValueError(f"Query {self.id!r}: mode must be 'direct' or 'reason', got {self.mode!r}")


_COLUMNS = ("xyxy", "score", "image_index", "track_id")

IndexLike = int | slice | Sequence[int] | NDArray[Any]


@dataclass(eq=False)
class Detections:
    """Boxes as parallel numpy columns, one row per box.

    Attributes:
        xyxy: `(N, 4)` float32, `x1, y1, x2, y2` in **original frame pixels**.
        score: `(N,)` float32 confidence in [0, 1].
        image_index: `(N,)` int64, which frame of the window the box is in (0-based).
        track_id: `(N,)` int64, track identity; `-1` means not tracked (yet).

    Columns are validated once here: wrong shapes or dtypes raise `ValueError` naming the
    column, the expected shape and the one given. Integer, slice, index-array and boolean
    mask indexing slice all columns together and always return `Detections`.

    Example:
        >>> d = Detections(xyxy=np.array([[0, 0, 10, 10], [5, 5, 20, 30]]),
        ...                score=np.array([0.9, 0.3]))
        >>> len(d), d.track_id.tolist()
        (2, [-1, -1])
        >>> d[d.score >= 0.5].xyxy.tolist()
        [[0.0, 0.0, 10.0, 10.0]]
    """

    xyxy: NDArray[np.float32]
    score: NDArray[np.float32] = field(default=None)  # type: ignore[assignment,arg-type]
    image_index: NDArray[np.int64] = field(default=None)  # type: ignore[assignment,arg-type]
    track_id: NDArray[np.int64] = field(default=None)  # type: ignore[assignment,arg-type]

    def __post_init__(self) -> None:
        xyxy = self.xyxy
        if type(xyxy) is np.ndarray and xyxy.dtype == np.float32 and xyxy.ndim == 2 and xyxy.shape[1] == 4:
            # Fast path: columns sliced from another Detections are already well-typed;
            # this is every stage's hot path (no dtype lattice walks).
            n = xyxy.shape[0]
            self.xyxy = xyxy if xyxy.flags.c_contiguous else np.ascontiguousarray(xyxy)
            self.score = self._column("score", self.score, n, np.float32, 1.0)
            self.image_index = self._column("image_index", self.image_index, n, np.int64, 0)
            self.track_id = self._column("track_id", self.track_id, n, np.int64, -1)
            return
        xyxy = np.asarray(xyxy)
        if xyxy.size == 0 and xyxy.ndim != 2:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ValueError(f"xyxy must have shape (N, 4), got {xyxy.shape}")
        if not np.issubdtype(xyxy.dtype, np.number) or np.issubdtype(xyxy.dtype, np.complexfloating):
            raise ValueError(f"xyxy must be numeric, got dtype {xyxy.dtype}")
        n = xyxy.shape[0]
        self.xyxy = np.ascontiguousarray(xyxy, dtype=np.float32)
        self.score = self._column("score", self.score, n, np.float32, 1.0)
        self.image_index = self._column("image_index", self.image_index, n, np.int64, 0)
        self.track_id = self._column("track_id", self.track_id, n, np.int64, -1)

    @staticmethod
    def _column(name: str, value: Any, n: int, dtype: type, default: float) -> NDArray[Any]:
        if value is None:
            return np.full(n, default, dtype=dtype)
        if type(value) is np.ndarray and value.dtype == dtype and value.shape == (n,):
            return value if value.flags.c_contiguous else np.ascontiguousarray(value)
        arr = np.asarray(value)
        if arr.ndim == 0:
            raise ValueError(f"{name} must have shape ({n},), got a scalar")
        if arr.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        if (
            np.issubdtype(dtype, np.integer)
            and np.issubdtype(arr.dtype, np.floating)
            and arr.size
            and not np.all(np.isfinite(arr) & (arr == np.round(arr)))
        ):
            raise ValueError(f"{name} must hold whole numbers, got {arr[:5].tolist()}…")
        return np.ascontiguousarray(arr, dtype=dtype)

    # --- construction -------------------------------------------------------------

    @classmethod
    def empty(cls) -> Detections:
        """No boxes; every column has length 0."""
        return cls(xyxy=np.zeros((0, 4), dtype=np.float32))

    @classmethod
    def concat(cls, parts: Iterable[Detections]) -> Detections:
        """Stack several `Detections` row-wise, keeping the columns aligned.

        Raises:
            TypeError: an element is not `Detections`.
        """
        items = list(parts)
        for i, p in enumerate(items):
            if not isinstance(p, Detections):
                raise TypeError(f"Detections.concat: element {i} is {type(p).__name__}, not Detections")
        if not items:
            return cls.empty()
        if len(items) == 1:
            return items[0]
        return cls(
            xyxy=np.concatenate([p.xyxy for p in items]),
            score=np.concatenate([p.score for p in items]),
            image_index=np.concatenate([p.image_index for p in items]),
            track_id=np.concatenate([p.track_id for p in items]),
        )

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> Detections:
        """Build from `[{"xyxy": [x1, y1, x2, y2], "score": s, "image_index": i, "track_id": t}]`.

        `score`, `image_index` and `track_id` may be omitted (1.0, 0 and -1).
        """
        recs = list(records)
        if not recs:
            return cls.empty()
        try:
            return cls(
                xyxy=np.array([r["xyxy"] for r in recs], dtype=np.float32).reshape(-1, 4),
                score=np.array([r.get("score", 1.0) for r in recs], dtype=np.float32),
                image_index=np.array([r.get("image_index", 0) for r in recs], dtype=np.int64),
                track_id=np.array([r.get("track_id", -1) for r in recs], dtype=np.int64),
            )
        except KeyError as exc:
            raise ValueError(f"Detections.from_records: a record has no {exc.args[0]!r} field") from exc

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per box (JSON-ready Python numbers); the inverse of `from_records`."""
        xy = self.xyxy.tolist()
        sc = self.score.tolist()
        ii = self.image_index.tolist()
        ti = self.track_id.tolist()
        return [
            {"xyxy": xy[i], "score": sc[i], "image_index": ii[i], "track_id": ti[i]}
            for i in range(len(xy))
        ]

    # --- supervision interop ----------------------------------------------------------

    def to_supervision(self, class_id: NDArray[np.int64] | Sequence[int] | None = None) -> Any:
        """These boxes as a `supervision.Detections`, so its annotators and tools apply.

        `xyxy` → `xyxy`, `score` → `confidence`, `track_id` → `tracker_id` (−1 stays −1,
        "not tracked"), `image_index` → `data["image_index"]`. supervision's annotators
        colour by class by default, so `class_id` is all zeros unless given; colour by
        track with `sv.ColorLookup.TRACK`.

        Raises:
            ImportError: supervision is not installed (`pip install 'streamvg[supervision]'`).

        Example:
            >>> d = Detections(xyxy=np.array([[0, 0, 10, 10]]), score=np.array([0.5]), track_id=np.array([3]))
            >>> sv = d.to_supervision()
            >>> sv.tracker_id.tolist(), Detections.from_supervision(sv) == d
            ([3], True)
        """
        sv = _supervision()
        n = len(self)
        cid = np.zeros(n, dtype=np.int64) if class_id is None else np.asarray(class_id, dtype=np.int64)
        if cid.shape != (n,):
            raise ValueError(f"class_id must have shape ({n},), got {cid.shape}")
        return sv.Detections(
            xyxy=self.xyxy.copy(), confidence=self.score.copy(), class_id=cid,
            tracker_id=self.track_id.copy(), data={"image_index": self.image_index.copy()},
        )

    @classmethod
    def from_supervision(cls, detections: Any) -> Detections:
        """Build from a `supervision.Detections` (the inverse of `to_supervision`).

        Missing columns take StreamVG's defaults: `confidence` None → score 1.0,
        `tracker_id` None → −1, no `data["image_index"]` → 0. `class_id`, masks and other
        `data` columns have no StreamVG counterpart and are left out.
        """
        xyxy = getattr(detections, "xyxy", None)
        if xyxy is None:
            raise TypeError(f"from_supervision needs a supervision.Detections, got {type(detections).__name__}")
        data = getattr(detections, "data", None) or {}
        image_index = data.get("image_index")
        # None columns take the defaults in __post_init__ (typed as arrays for callers).
        columns: dict[str, Any] = {
            "score": None if detections.confidence is None else np.asarray(detections.confidence, dtype=np.float32),
            "image_index": None if image_index is None else np.asarray(image_index, dtype=np.int64),
            "track_id": None if detections.tracker_id is None else np.asarray(detections.tracker_id, dtype=np.int64),
        }
        return cls(xyxy=np.asarray(xyxy, dtype=np.float32).reshape(-1, 4), **columns)

    # --- access ---------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.xyxy.shape[0])

    def __getitem__(self, index: IndexLike) -> Detections:
        if isinstance(index, (int, np.integer)):
            n = len(self)
            if not -n <= int(index) < n:
                raise IndexError(f"Detections index {index} out of range for {n} boxes")
            index = [int(index)]
        if isinstance(index, np.ndarray) and index.dtype == np.bool_ and index.shape != (len(self),):
            raise IndexError(f"boolean mask must have shape ({len(self)},), got {index.shape}")
        return Detections(
            xyxy=self.xyxy[index],
            score=self.score[index],
            image_index=self.image_index[index],
            track_id=self.track_id[index],
        )

    def __iter__(self) -> Iterator[Detections]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Detections):
            return NotImplemented
        return all(np.array_equal(getattr(self, c), getattr(other, c)) for c in _COLUMNS)

    def __repr__(self) -> str:
        return f"Detections(n={len(self)}, xyxy={self.xyxy.tolist()}, score={self.score.tolist()}, image_index={self.image_index.tolist()}, track_id={self.track_id.tolist()})"

    @property
    def area(self) -> NDArray[np.float32]:
        """`(N,)` box areas in square pixels."""
        wh = np.clip(self.xyxy[:, 2:] - self.xyxy[:, :2], 0, None)
        return (wh[:, 0] * wh[:, 1]).astype(np.float32)

    def with_track_id(self, track_id: NDArray[np.int64] | Sequence[int]) -> Detections:
        """A copy whose `track_id` column is replaced."""
        return Detections(self.xyxy, self.score, self.image_index, np.asarray(track_id))

    def validate_boxes(self, what: str = "detections") -> None:
        """Raise `ValueError` if any box is not finite or has `x2 < x1` / `y2 < y1`."""
        if not len(self):
            return
        if not np.all(np.isfinite(self.xyxy)):
            bad = int(np.argmax(~np.all(np.isfinite(self.xyxy), axis=1)))
            raise ValueError(f"{what}: box {bad} is not finite: {self.xyxy[bad].tolist()}")
        inverted = (self.xyxy[:, 2] < self.xyxy[:, 0]) | (self.xyxy[:, 3] < self.xyxy[:, 1])
        if np.any(inverted):
            bad = int(np.argmax(inverted))
            raise ValueError(
                f"{what}: box {bad} has x2 < x1 or y2 < y1: {self.xyxy[bad].tolist()}; "
                "boxes must be x1, y1, x2, y2 with x1 <= x2 and y1 <= y2"
            )


def _supervision() -> Any:
    try:
        import supervision
    except ImportError:
        raise ImportError(
            "Detections.to_supervision needs the supervision package; pip install 'streamvg[supervision]'"
        ) from None
    return supervision
