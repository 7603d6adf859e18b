"""Invariants of the value types: Detections columns stay aligned; bad shapes fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamvg.types import Detections, Frame, Query, Window


@st.composite
def detections(draw: st.DrawFn, max_n: int = 20) -> Detections:
    n = draw(st.integers(0, max_n))
    xy = draw(hnp.arrays(np.float32, (n, 2), elements=st.floats(0, 1000, width=32)))
    wh = draw(hnp.arrays(np.float32, (n, 2), elements=st.floats(0, 500, width=32)))
    return Detections(
        xyxy=np.concatenate([xy, xy + wh], axis=1),
        score=draw(hnp.arrays(np.float32, (n,), elements=st.floats(0, 1, width=32))),
        image_index=draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, 5))),
        track_id=draw(hnp.arrays(np.int64, (n,), elements=st.integers(-1, 100))),
    )


def _rows(d: Detections) -> list[tuple[object, ...]]:
    return [
        (tuple(d.xyxy[i].tolist()), float(d.score[i]), int(d.image_index[i]), int(d.track_id[i]))
        for i in range(len(d))
    ]


@given(detections(), st.data())
@settings(max_examples=80, deadline=None)
def test_mask_and_index_slicing_keep_columns_aligned(d: Detections, data: st.DataObject) -> None:
    rows = _rows(d)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=len(d), max_size=len(d))), dtype=bool)
    sub = d[mask]
    assert _rows(sub) == [r for r, m in zip(rows, mask, strict=True) if m]
    if len(d):
        idx = data.draw(st.lists(st.integers(0, len(d) - 1), max_size=10))
        assert _rows(d[np.array(idx, dtype=np.int64)]) == [rows[i] for i in idx]
        i = data.draw(st.integers(-len(d), len(d) - 1))
        assert _rows(d[i]) == [rows[i]]
        assert _rows(d[1:]) == rows[1:]


@given(st.lists(detections(max_n=6), max_size=5))
@settings(max_examples=60, deadline=None)
def test_concat_stacks_rows_in_order(parts: list[Detections]) -> None:
    merged = Detections.concat(parts)
    assert _rows(merged) == [r for p in parts for r in _rows(p)]
    assert merged.xyxy.dtype == np.float32 and merged.track_id.dtype == np.int64


@given(detections())
@settings(max_examples=60, deadline=None)
def test_records_round_trip(d: Detections) -> None:
    back = Detections.from_records(d.to_records())
    assert back == d


def test_defaults_and_dtypes() -> None:
    d = Detections(xyxy=[[1, 2, 3, 4]])
    assert d.xyxy.dtype == np.float32 and d.xyxy.shape == (1, 4)
    assert d.score.tolist() == [1.0]
    assert d.image_index.tolist() == [0]
    assert d.track_id.tolist() == [-1]
    e = Detections.empty()
    assert len(e) == 0 and e.xyxy.shape == (0, 4)
    assert len(Detections.concat([])) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"xyxy": np.zeros((3, 5))}, r"xyxy must have shape \(N, 4\), got \(3, 5\)"),
        ({"xyxy": np.zeros(4)}, r"xyxy must have shape \(N, 4\), got \(4,\)"),
        ({"xyxy": np.zeros((12, 4)), "score": np.zeros(11)}, r"score must have shape \(12,\), got \(11,\)"),
        ({"xyxy": np.zeros((2, 4)), "track_id": np.array([1.5, 2])}, r"track_id must hold whole numbers"),
        ({"xyxy": np.zeros((2, 4)), "image_index": np.zeros((2, 1))}, r"image_index must have shape \(2,\)"),
        ({"xyxy": np.array([["a", "b", "c", "d"]])}, r"xyxy must be numeric"),
    ],
)
def test_bad_shapes_raise_clear_value_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Detections(**kwargs)  # type: ignore[arg-type]


def test_bad_mask_and_index() -> None:
    d = Detections(xyxy=np.zeros((3, 4)))
    with pytest.raises(IndexError, match=r"boolean mask must have shape \(3,\)"):
        d[np.array([True, False])]
    with pytest.raises(IndexError, match="out of range for 3 boxes"):
        d[3]
    with pytest.raises(TypeError, match="element 1 is list"):
        Detections.concat([d, [1, 2]])  # type: ignore[list-item]


def test_validate_boxes_names_the_bad_box() -> None:
    Detections(xyxy=[[0, 0, 1, 1]]).validate_boxes()
    with pytest.raises(ValueError, match="box 1 is not finite"):
        Detections(xyxy=[[0, 0, 1, 1], [np.nan, 0, 1, 1]]).validate_boxes()
    with pytest.raises(ValueError, match="box 0 has x2 < x1"):
        Detections(xyxy=[[5, 0, 1, 1]]).validate_boxes()


def test_area_and_with_track_id() -> None:
    d = Detections(xyxy=[[0, 0, 10, 5], [2, 2, 4, 8]])
    assert d.area.tolist() == [50.0, 12.0]
    t = d.with_track_id([7, 9])
    assert t.track_id.tolist() == [7, 9] and d.track_id.tolist() == [-1, -1]


def test_frame_and_window() -> None:
    img = np.zeros((6, 8, 3), dtype=np.uint8)
    f0 = Frame("cam", 0, 0.0, img)
    f1 = Frame("cam", 5, 0.2, img)
    assert f0.size == (8, 6)
    w = Window((f0, f1))
    assert len(w) == 2 and w.frame_sizes == [(8, 6), (8, 6)]
    assert w.id == Window([f0, f1]).id  # stable id from the frames
    assert w.id != Window((f1, f0)).id
    assert (w.start, w.end) == (0.0, 0.2)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) RGB"):
        Frame("cam", 0, 0.0, np.zeros((6, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        Frame("cam", 0, 0.0, np.zeros((6, 8, 3), dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one frame"):
        Window(())


def test_query_validation() -> None:
    assert Query("q", "a red car").mode == "direct"
    with pytest.raises(ValueError, match="empty text"):
        Query("q", "  ")
    with pytest.raises(ValueError, match="mode must be"):
        Query("q", "x", mode="think")  # type: ignore[arg-type]
