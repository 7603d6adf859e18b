"""`Detections.to_supervision` / `from_supervision`: every column survives the round trip,
and supervision's own annotators and filters work on the result."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from streamvg.types import Detections

sv = pytest.importorskip("supervision")


@st.composite
def detections(draw: st.DrawFn) -> Detections:
    n = draw(st.integers(0, 12))
    corner = draw(arrays(np.float32, (n, 2), elements=st.floats(0, 4000, width=32)))
    size = draw(arrays(np.float32, (n, 2), elements=st.floats(0, 500, width=32)))
    return Detections(
        xyxy=np.concatenate([corner, corner + size], axis=1),
        score=draw(arrays(np.float32, (n,), elements=st.floats(0, 1, width=32))),
        image_index=draw(arrays(np.int64, (n,), elements=st.integers(0, 7))),
        track_id=draw(arrays(np.int64, (n,), elements=st.integers(-1, 10**9))),
    )


@settings(max_examples=60, deadline=None)
@given(detections())
def test_round_trip_keeps_every_column(d: Detections) -> None:
    s = d.to_supervision()
    assert isinstance(s, sv.Detections) and len(s) == len(d)
    np.testing.assert_array_equal(s.xyxy, d.xyxy)
    np.testing.assert_array_equal(s.confidence, d.score)
    np.testing.assert_array_equal(s.tracker_id, d.track_id)
    np.testing.assert_array_equal(s.data["image_index"], d.image_index)
    back = Detections.from_supervision(s)
    assert back == d
    for col in ("xyxy", "score", "image_index", "track_id"):
        assert getattr(back, col).dtype == getattr(d, col).dtype
    # Slicing in supervision slices our columns together too.
    if len(d):
        mask = d.score >= 0.5
        assert Detections.from_supervision(s[mask]) == d[mask]


def test_from_supervision_fills_missing_columns_and_refuses_other_types() -> None:
    s = sv.Detections(xyxy=np.array([[1, 2, 3, 4]], dtype=np.float32))
    d = Detections.from_supervision(s)
    assert d.score.tolist() == [1.0] and d.track_id.tolist() == [-1] and d.image_index.tolist() == [0]
    with pytest.raises(TypeError, match=r"needs a supervision\.Detections"):
        Detections.from_supervision([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"class_id must have shape \(1,\)"):
        d.to_supervision(class_id=[0, 1])


def test_supervision_annotators_draw_our_boxes() -> None:
    img = np.zeros((60, 80, 3), dtype=np.uint8)
    d = Detections(xyxy=np.array([[10, 20, 50, 40]]), score=np.array([0.9]), track_id=np.array([7]))
    out = sv.BoxAnnotator(thickness=2, color_lookup=sv.ColorLookup.TRACK).annotate(img.copy(), d.to_supervision())
    drawn = np.argwhere(out.any(axis=2))
    assert drawn[:, 1].min() >= 9 and drawn[:, 1].max() <= 51 and drawn[:, 0].min() >= 19 and drawn[:, 0].max() <= 41
    assert out[20, 30].any() and not out[30, 30].any()  # the box's edge, not its inside
    # The default (by class) lookup works as well: class_id is filled in.
    assert sv.BoxAnnotator().annotate(img.copy(), d.to_supervision()).any()
