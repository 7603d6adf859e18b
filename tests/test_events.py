"""Wire events: deterministic ids, exact JSON round trips, validation of what is read back."""

from __future__ import annotations

import doctest

import jsonschema
import numpy as np
import orjson
import pytest
from pydantic import ValidationError

import streamvg.events as events_mod
from streamvg.events import EVENT_KINDS, Event, event_json_schema
from streamvg.types import Detections


def _det() -> Detections:
    return Detections(
        xyxy=np.array([[10.123, 20.5, 110.0, 220.25], [0, 0, 5, 5]]),
        score=np.array([0.91234, 0.4]),
        image_index=np.array([1, 3]),
        track_id=np.array([7, -1]),
    )


def _grounding(**kw: object) -> Event:
    args: dict = dict(
        pipeline="p", camera="door", query_id="vest", query="the man in the yellow vest",
        t=12.48, frame_index=312, frame_size=(1280, 720), detections=_det(), model="tiny-qwen2vl",
        wall_time=1_700_000_000.0, processed_time=1_700_000_000.25,
    )
    args.update(kw)
    return Event.grounding(**args)  # type: ignore[arg-type]


def test_grounding_fields_and_boxes() -> None:
    e = _grounding()
    assert e.schema == "streamvg.event/v1" and e.kind == "grounding"
    assert e.frame_size == (1280, 720)
    assert e.boxes[0] == {"xyxy": [10.12, 20.5, 110.0, 220.25], "score": 0.9123, "track_id": 7, "image_index": 1}
    assert e.latency_ms == pytest.approx(250.0)
    d = e.detections()
    assert d.track_id.tolist() == [7, -1] and d.image_index.tolist() == [1, 3]


def test_event_id_is_deterministic_and_input_sensitive() -> None:
    a, b = _grounding(), _grounding(processed_time=5.0)
    assert a.event_id == b.event_id  # processing time is not part of the identity
    assert _grounding(frame_index=313).event_id != a.event_id
    assert _grounding(query_id="hat").event_id != a.event_id
    assert _grounding(camera="gate").event_id != a.event_id
    # A validated event built without an id gets the same id as the fast builder.
    fields = {k: v for k, v in a.__dict__.items() if k != "event_id"}
    assert Event(**fields).event_id == a.event_id


@pytest.mark.parametrize("kind", ["grounding", "track", "status"])
def test_json_round_trip_is_exact(kind: str) -> None:
    if kind == "grounding":
        e = _grounding()
    elif kind == "track":
        e = Event.track("started", pipeline="p", camera="c", query_id="q", query="x", track_id=3,
                        t=1.5, xyxy=np.array([1, 2, 3, 4], dtype=np.float32), score=0.8, frame_index=9)
    else:
        e = Event.source_status(pipeline="p", camera="c", state="down", detail="rtsp://u:pw@cam/1 timed out")
    back = Event.from_json(e.to_json())
    assert back == e
    assert back.to_json() == e.to_json()
    jsonschema.validate(orjson.loads(e.to_json()), event_json_schema())


def test_track_kinds_map_the_tracker_words() -> None:
    base = dict(pipeline="p", camera="c", query_id="q", query=None, track_id=1, t=0.0, xyxy=[0, 0, 1, 1], score=1.0)
    assert Event.track("started", **base).kind == "track_start"  # type: ignore[arg-type]
    lost = Event.track("lost", **base)  # type: ignore[arg-type]
    assert (lost.kind, lost.detail) == ("track_update", "lost")
    assert Event.track("ended", **base).kind == "track_end"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown track event kind 'vanished'"):
        Event.track("vanished", **base)  # type: ignore[arg-type]


def test_source_status_masks_passwords_and_checks_state() -> None:
    e = Event.source_status(pipeline="p", camera="c", state="down", detail="rtsp://admin:hunter2@10.0.0.5/s refused")
    assert "hunter2" not in e.to_json().decode()
    with pytest.raises(ValueError, match="unknown source state"):
        Event.source_status(pipeline="p", camera="c", state="sleeping")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(kind="explosion"), "kind"),
        (lambda d: d.update(schema="streamvg.event/v9"), "schema"),
        (lambda d: d["boxes"][0].update(xyxy=[1, 2, 3]), "xyxy"),
        (lambda d: d.update(kind="track_end", track_id=None), "track_id"),
        (lambda d: d.update(surprise=1), "surprise"),
    ],
)
def test_invalid_data_is_rejected(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    d = orjson.loads(_grounding().to_json())
    mutate(d)
    with pytest.raises(ValidationError, match=match):
        Event.from_json(orjson.dumps(d))


def test_schema_lists_every_kind() -> None:
    s = event_json_schema()
    assert set(s["properties"]["kind"]["enum"]) == set(EVENT_KINDS)
    assert s["properties"]["schema"]["const"] == "streamvg.event/v1"


def test_doctests() -> None:
    assert doctest.testmod(events_mod, optionflags=doctest.ELLIPSIS).failed == 0
