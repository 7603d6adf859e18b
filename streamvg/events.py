"""Wire events: what StreamVG publishes, one JSON object per event (`schema: "streamvg.event/v1"`).

Kinds:

| kind | when | kind-specific fields |
| --- | --- | --- |
| `grounding` | a query was grounded on a frame (boxes may be empty) | `boxes` (every box of the frame) |
| `track_start` | a track was confirmed | `track_id`, `boxes` (its box) |
| `track_update` | a confirmed track moved (or was lost: `detail: "lost"`) | `track_id`, `boxes` |
| `track_end` | a track ended (lost too long, or end of file) | `track_id`, `boxes` (last box) |
| `source_status` | a camera connected, went down, stalled or ended | `state`, `detail` |

Optional fields (absent or null when unused; old consumers keep working): `global_id` on
track events and on their box, the cross-camera identity of the track (`streamvg.identity`;
null without an `identity:` section). A track's `global_id` can change while evidence comes
in: when two identities are linked the younger takes the older id, when a link is undone the
split-off tracks return to an id of their own.

Every event carries media time `t` (seconds from the source's start), the capture wall
time `wall_time` (Unix seconds, live sources; `null` for files), the processing wall time
`processed_time`, and a deterministic `event_id`: the same input (pipeline, kind, camera,
query, frame, time, track, state) always gives the same id, so a consumer can drop the
duplicates an at-least-once replay may deliver.

Events built by StreamVG itself (`Event.grounding`, `Event.track`, `Event.source_status`)
skip pydantic validation (their inputs are trusted and typed) and serialise with orjson,
so building and publishing one costs a few microseconds; events read back from Redis or
files go through `Event.from_json`, which validates everything.

The builders avoid numpy for the handful of boxes a frame usually has: a numpy call on a
3-element array costs about a microsecond of fixed overhead, more than the arithmetic.
Coordinates are rounded in plain Python with exactly numpy's rule (`x * 10**d`, round half
to even, `/ 10**d`, sign of zero kept), so the wire bytes are the same either way; larger
frames, and NaN/inf values, take the numpy path.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, cast, get_args

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import NotRequired, TypedDict

from streamvg.redaction import mask_text
from streamvg.types import Detections

__all__ = [
    "EVENT_KINDS",
    "SCHEMA",
    "SOURCE_STATES",
    "TRACK_KINDS",
    "Box",
    "Event",
    "EventKind",
    "SourceState",
    "event_json_schema",
    "make_event_id",
]

SCHEMA = "streamvg.event/v1"

EventKind = Literal["grounding", "track_start", "track_update", "track_end", "source_status"]
SourceState = Literal["connecting", "up", "down", "stalled", "ended"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
SOURCE_STATES: tuple[str, ...] = get_args(SourceState)

# Accepted spellings of track kinds -> (wire kind, detail). The tracker's lifecycle words
# (started/updated/lost/ended) map here; "lost" is an update with detail "lost".
TRACK_KINDS: dict[str, tuple[str, str | None]] = {
    "track_start": ("track_start", None),
    "track_update": ("track_update", None),
    "track_end": ("track_end", None),
    "start": ("track_start", None),
    "update": ("track_update", None),
    "end": ("track_end", None),
    "started": ("track_start", None),
    "updated": ("track_update", None),
    "lost": ("track_update", "lost"),
    "ended": ("track_end", None),
}


class Box(TypedDict):
    """One box: `xyxy` in original frame pixels, `image_index` = frame of the window."""

    xyxy: Annotated[list[float], Field(min_length=4, max_length=4)]
    score: float
    track_id: int
    image_index: int
    global_id: NotRequired[int | None]  # cross-camera identity (track events with identity on)


def make_event_id(
    pipeline: str,
    kind: str,
    camera: str,
    query_id: str | None,
    frame_index: int | None,
    t: float | None,
    track_id: int | None = None,
    state: str | None = None,
    wall_time: float | None = None,
) -> str:
    """The deterministic id of an event: 32 hex characters of BLAKE2b over its identity.

    `wall_time` takes part only for `source_status` events (which have no frame).

    Example:
        >>> make_event_id("lobby", "grounding", "door", "vest", 12, 0.48) == \\
        ...     make_event_id("lobby", "grounding", "door", "vest", 12, 0.48)
        True
    """
    ts = "" if t is None else f"{t:.6f}"
    wt = "" if (wall_time is None or kind != "source_status") else f"{wall_time:.6f}"
    key = f"{pipeline}|{kind}|{camera}|{query_id or ''}|{'' if frame_index is None else frame_index}|{ts}|{'' if track_id is None else track_id}|{state or ''}|{wt}"
    return _event_hash(key)


# An empty BLAKE2b-128 state; copying it is cheaper than building one per event (the
# constructor parses its keyword arguments each time). Same digest as
# hashlib.blake2b(key.encode(), digest_size=16).
_EMPTY_ID_HASH = hashlib.blake2b(digest_size=16)


def _event_hash(key: str) -> str:
    """BLAKE2b-128 hex digest of `key` (UTF-8): the event id."""
    h = _EMPTY_ID_HASH.copy()
    h.update(key.encode())
    return h.hexdigest()


# Up to this many boxes the builders round in plain Python (cheaper than numpy's per-call
# overhead); above it numpy's vectorised rounding wins. Both give identical values.
_PY_BOXES_MAX = 8


def _boxes_numpy(det: Detections) -> list[Box]:
    """The reference conversion: numpy rounding (`ndarray.round`), any number of boxes."""
    # ndarray.round (not np.round): the function wrapper costs more than the rounding here.
    xy = det.xyxy.astype(np.float64).round(2).tolist()
    sc = det.score.astype(np.float64).round(4).tolist()
    ti = det.track_id.tolist()
    ii = det.image_index.tolist()
    return [
        {"xyxy": a, "score": b, "track_id": c, "image_index": d}
        for a, b, c, d in zip(xy, sc, ti, ii, strict=True)
    ]


def _boxes(det: Detections | None) -> list[Box]:
    """Columnar `Detections` -> JSON-ready box dicts (coordinates rounded to 0.01 px,
    scores to 1e-4), bit-identical to `_boxes_numpy`.

    `ndarray.round(d)` computes `rint(x * 10**d) / 10**d` in float64; for a finite float
    `round(x * 100.0)` is the same round-half-to-even integer (exact), `int / 100.0` the
    same correctly rounded quotient, and `or x * 0.0` restores the sign of a zero result
    (numpy gives -0.0 for small negatives). NaN/inf make `round` raise; numpy handles those.
    """
    if det is None:
        return []
    xyxy = det.xyxy
    if xyxy.shape[0] > _PY_BOXES_MAX:
        return _boxes_numpy(det)
    out: list[Box] = []
    app = out.append
    try:
        for (x1, y1, x2, y2), s, ti, ii in zip(
            xyxy.tolist(), det.score.tolist(), det.track_id.tolist(), det.image_index.tolist(), strict=True
        ):
            app(
                {
                    "xyxy": [
                        round(x1 * 100.0) / 100.0 or x1 * 0.0,
                        round(y1 * 100.0) / 100.0 or y1 * 0.0,
                        round(x2 * 100.0) / 100.0 or x2 * 0.0,
                        round(y2 * 100.0) / 100.0 or y2 * 0.0,
                    ],
                    "score": round(s * 10000.0) / 10000.0 or s * 0.0,
                    "track_id": ti,
                    "image_index": ii,
                }
            )
    except (ValueError, OverflowError):  # NaN or inf somewhere: numpy keeps them as they are
        return _boxes_numpy(det)
    return out


def _round_xyxy(xyxy: Sequence[float] | np.ndarray) -> list[float]:
    """One box's 4 coordinates as float64, rounded to 0.01 like `np.round(..., 2)`."""
    v = np.asarray(xyxy, dtype=np.float64).reshape(4)
    try:
        x1, y1, x2, y2 = v.tolist()
        return [
            round(x1 * 100.0) / 100.0 or x1 * 0.0,
            round(y1 * 100.0) / 100.0 or y1 * 0.0,
            round(x2 * 100.0) / 100.0 or x2 * 0.0,
            round(y2 * 100.0) / 100.0 or y2 * 0.0,
        ]
    except (ValueError, OverflowError):  # NaN or inf
        return cast(list[float], v.round(2).tolist())


with warnings.catch_warnings():
    # The wire field is called "schema"; it shadows pydantic's deprecated BaseModel.schema().
    warnings.filterwarnings("ignore", message='Field name "schema"', category=UserWarning)

    class Event(BaseModel):
        """One published event (wire format `streamvg.event/v1`).

        Build events with `Event.grounding`, `Event.track` or `Event.source_status`;
        read them with `Event.from_json`. `to_json()` gives the bytes written to Redis/JSONL.
        """

        model_config = ConfigDict(frozen=True, extra="forbid")

        schema: Literal["streamvg.event/v1"] = Field(  # type: ignore[assignment]
            default="streamvg.event/v1", description="Wire format version."
        )
        event_id: str = Field(
            default="",
            description="Deterministic id (32 hex): same input, same id; consumers drop duplicates by it.",
        )
        kind: EventKind = Field(description="grounding, track_start, track_update, track_end or source_status.")
        pipeline: str = Field(description="Pipeline name (Redis keys are streamvg:{pipeline}:…).")
        camera: str = Field(description="Camera (source) name.")
        query_id: str | None = Field(default=None, description="Query id; null for source_status.")
        query: str | None = Field(default=None, description="Query text.")
        t: float | None = Field(default=None, description="Media time in seconds from the source's start.")
        wall_time: float | None = Field(
            default=None, description="Capture time, Unix seconds (live sources); null for files."
        )
        processed_time: float = Field(
            default_factory=time.time, description="When StreamVG built the event, Unix seconds."
        )
        frame_index: int | None = Field(default=None, description="Frame number in its source.")
        frame_size: tuple[int, int] | None = Field(default=None, description="[width, height] in pixels.")
        boxes: list[Box] = Field(
            default_factory=list,
            description="Boxes [{xyxy, score, track_id, image_index}], xyxy in frame pixels.",
        )
        model: str | None = Field(default=None, description="Grounding model name.")
        latency_ms: float | None = Field(
            default=None, description="Capture (or window start) to event, in milliseconds."
        )
        track_id: int | None = Field(default=None, description="Track id (track_* kinds), unique per camera and query.")
        state: SourceState | None = Field(
            default=None, description="source_status: connecting, up, down, stalled or ended."
        )
        detail: str | None = Field(
            default=None, description="Free text: the reason for a source state, 'lost' for a lost track."
        )
        global_id: int | None = Field(
            default=None,
            description="Cross-camera identity of the track (track_* kinds, with identity on): the same "
            "object in every camera of the pipeline has the same global_id; may change as links form.",
        )

        @model_validator(mode="before")
        @classmethod
        def _fill_id(cls, data: Any) -> Any:
            if isinstance(data, dict) and not data.get("event_id"):
                data = dict(data)
                data["event_id"] = make_event_id(
                    str(data.get("pipeline", "")),
                    str(data.get("kind", "")),
                    str(data.get("camera", "")),
                    data.get("query_id"),
                    data.get("frame_index"),
                    data.get("t"),
                    data.get("track_id"),
                    data.get("state"),
                    data.get("wall_time"),
                )
            return data

        @model_validator(mode="after")
        def _kind_fields(self) -> Event:
            if self.kind.startswith("track_") and self.track_id is None:
                raise ValueError(f"a {self.kind} event needs track_id")
            if self.kind == "source_status" and self.state is None:
                raise ValueError("a source_status event needs state")
            if self.kind != "source_status" and self.query_id is None:
                raise ValueError(f"a {self.kind} event needs query_id")
            return self

        # --- fast, trusted construction ---------------------------------------------

        @classmethod
        def _trusted(cls, fields: dict[str, Any]) -> Event:
            """Build without validation (inputs already typed by StreamVG's own builders).

            `fields` must hold every field, in declaration order (the JSON key order).
            """
            ev = _new(cls)
            _set_dict(ev, fields)
            _set_fields_set(ev, set(_FIELD_NAMES))
            _set_extra(ev, None)
            _set_private(ev, None)
            return ev

        @classmethod
        def grounding(
            cls,
            *,
            pipeline: str,
            camera: str,
            query_id: str,
            query: str | None,
            t: float,
            frame_index: int,
            frame_size: tuple[int, int] | Sequence[int],
            detections: Detections | None,
            model: str | None,
            wall_time: float | None = None,
            latency_ms: float | None = None,
            processed_time: float | None = None,
        ) -> Event:
            """A `grounding` event: every box the model found for `query_id` in one frame.

            `detections` are the boxes of that frame (`image_index` says which image of the
            window it was). `latency_ms` defaults to processing time minus `wall_time` for
            live sources.

            Example:
                >>> d = Detections(xyxy=np.array([[10, 20, 110, 220]]), score=np.array([0.9]))
                >>> e = Event.grounding(pipeline="p", camera="door", query_id="vest",
                ...     query="the vest", t=1.5, frame_index=37, frame_size=(640, 360),
                ...     detections=d, model="tiny", processed_time=0.0)
                >>> e.kind, e.boxes[0]["xyxy"], len(e.event_id)
                ('grounding', [10.0, 20.0, 110.0, 220.0], 32)
            """
            now = _time() if processed_time is None else float(processed_time)
            t = float(t)
            frame_index = int(frame_index)
            if wall_time is not None:
                if latency_ms is None:
                    latency_ms = round((now - wall_time) * 1000.0, 3)
                wall_time = float(wall_time)
            # make_event_id(pipeline, "grounding", camera, query_id, frame_index, t), inlined:
            # the key is the same string, built without the generic branches.
            h = _EMPTY_ID_HASH.copy()
            h.update(f"{pipeline}|grounding|{camera}|{query_id or ''}|{frame_index}|{t:.6f}|||".encode())
            fields = {
                "schema": SCHEMA,
                "event_id": h.hexdigest(),
                "kind": "grounding",
                "pipeline": pipeline,
                "camera": camera,
                "query_id": query_id,
                "query": query,
                "t": t,
                "wall_time": wall_time,
                "processed_time": now,
                "frame_index": frame_index,
                "frame_size": (int(frame_size[0]), int(frame_size[1])),
                "boxes": _boxes(detections),
                "model": model,
                "latency_ms": None if latency_ms is None else float(latency_ms),
                "track_id": None,
                "state": None,
                "detail": None,
                "global_id": None,
            }
            # Event._trusted(fields), inlined (one call less per event).
            ev = _new(cls)
            _set_dict(ev, fields)
            _set_fields_set(ev, set(_FIELD_NAMES))
            _set_extra(ev, None)
            _set_private(ev, None)
            return ev

        @classmethod
        def track(
            cls,
            kind: str,
            *,
            pipeline: str,
            camera: str,
            query_id: str,
            query: str | None,
            track_id: int,
            t: float,
            xyxy: Sequence[float] | np.ndarray,
            score: float,
            frame_index: int | None = None,
            frame_size: tuple[int, int] | Sequence[int] | None = None,
            image_index: int = 0,
            model: str | None = None,
            wall_time: float | None = None,
            latency_ms: float | None = None,
            processed_time: float | None = None,
            detail: str | None = None,
            global_id: int | None = None,
        ) -> Event:
            """A track lifecycle event with the track's box.

            `kind` is a wire kind (`track_start`, `track_update`, `track_end`) or the
            tracker's word (`started`, `updated`, `lost`, `ended`; `lost` becomes a
            `track_update` with `detail: "lost"`).

            Raises:
                ValueError: `kind` is not a track kind.
            """
            try:
                wire, default_detail = TRACK_KINDS[kind]
            except KeyError:
                raise ValueError(
                    f"unknown track event kind {kind!r}; use one of {sorted(TRACK_KINDS)}"
                ) from None
            now = _time() if processed_time is None else float(processed_time)
            t = float(t)
            track_id = int(track_id)
            fi = None if frame_index is None else int(frame_index)
            if latency_ms is None and wall_time is not None:
                latency_ms = round((now - wall_time) * 1000.0, 3)
            box: Box = {
                "xyxy": _round_xyxy(xyxy),
                "score": round(float(score), 4),
                "track_id": track_id,
                "image_index": int(image_index),
            }
            if global_id is not None:
                global_id = int(global_id)
                box["global_id"] = global_id
            return cls._trusted(
                {
                    "schema": SCHEMA,
                    "event_id": make_event_id(pipeline, wire, camera, query_id, fi, t, track_id),
                    "kind": wire,
                    "pipeline": pipeline,
                    "camera": camera,
                    "query_id": query_id,
                    "query": query,
                    "t": t,
                    "wall_time": None if wall_time is None else float(wall_time),
                    "processed_time": now,
                    "frame_index": fi,
                    "frame_size": None if frame_size is None else (int(frame_size[0]), int(frame_size[1])),
                    "boxes": [box],
                    "model": model,
                    "latency_ms": None if latency_ms is None else float(latency_ms),
                    "track_id": track_id,
                    "state": None,
                    "detail": detail if detail is not None else default_detail,
                    "global_id": global_id,
                }
            )

        @classmethod
        def source_status(
            cls,
            *,
            pipeline: str,
            camera: str,
            state: str,
            wall_time: float | None = None,
            detail: str = "",
            t: float | None = None,
        ) -> Event:
            """A `source_status` event: a camera is connecting, up, down, stalled or ended.

            `detail` is masked (no password from a camera URL reaches the wire).

            Raises:
                ValueError: `state` is not one of `SOURCE_STATES`.
            """
            if state not in SOURCE_STATES:
                raise ValueError(f"unknown source state {state!r}; use one of {list(SOURCE_STATES)}")
            now = time.time()
            wt = now if wall_time is None else float(wall_time)
            return cls._trusted(
                {
                    "schema": SCHEMA,
                    "event_id": make_event_id(pipeline, "source_status", camera, None, None, t, None, state, wt),
                    "kind": "source_status",
                    "pipeline": pipeline,
                    "camera": camera,
                    "query_id": None,
                    "query": None,
                    "t": None if t is None else float(t),
                    "wall_time": wt,
                    "processed_time": now,
                    "frame_index": None,
                    "frame_size": None,
                    "boxes": [],
                    "model": None,
                    "latency_ms": None,
                    "track_id": None,
                    "state": state,
                    "detail": mask_text(detail) if detail else "",
                    "global_id": None,
                }
            )

        # --- wire -------------------------------------------------------------------

        def to_json(self) -> bytes:
            """The event as compact UTF-8 JSON (what goes into Redis and JSONL files)."""
            return orjson.dumps(self.__dict__)

        @classmethod
        def from_json(cls, data: bytes | str) -> Event:
            """Parse and validate one event.

            Raises:
                pydantic.ValidationError: the data is not a valid `streamvg.event/v1` event.
            """
            return cls.model_validate_json(data)

        @classmethod
        def from_dict(cls, data: Mapping[str, Any]) -> Event:
            """Validate an already-decoded JSON object."""
            return cls.model_validate(dict(data))

        def with_global_id(self, global_id: int | None) -> Event:
            """A copy of this track event carrying `global_id` (top level and on its boxes)."""
            gid = None if global_id is None else int(global_id)
            boxes = [cast(Box, {**b, "global_id": gid}) for b in self.boxes]
            fields = dict(self.__dict__)
            fields["boxes"] = boxes
            fields["global_id"] = gid
            return type(self)._trusted(fields)

        def detections(self) -> Detections:
            """The boxes as columnar `Detections`."""
            return Detections.from_records(cast(list[dict[str, Any]], self.boxes))


# What `Event._trusted` needs, bound once: BaseModel's slot setters (what
# object.__setattr__ would look up on every call) and the field names.
_new = object.__new__
_set_dict = BaseModel.__dict__["__dict__"].__set__
_set_fields_set = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_set_extra = BaseModel.__dict__["__pydantic_extra__"].__set__
_set_private = BaseModel.__dict__["__pydantic_private__"].__set__
_time = time.time
_FIELD_NAMES: frozenset[str] = frozenset(Event.model_fields)


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema of `streamvg.event/v1` (what `streamvg schema` prints)."""
    schema = Event.model_json_schema()
    schema["$id"] = "https://streamvg.dev/schema/streamvg.event/v1.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "StreamVG event (streamvg.event/v1)"
    return schema
