"""Single- and multi-camera windows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from streamvg.sources import open_source
from streamvg.types import Frame
from streamvg.windows import MultiCameraWindows, windows

IMG = np.zeros((4, 4, 3), np.uint8)


def _frames(cam: str, times: list[float], *, wall: bool = False) -> list[Frame]:
    return [Frame(cam, i, t, IMG, (1000.0 + t) if wall else None) for i, t in enumerate(times)]


@pytest.mark.parametrize(
    ("n", "size", "stride", "expected"),
    [
        (7, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5], [3, 4, 5, 6]]),
        (6, 4, 2, [[0, 1, 2, 3], [2, 3, 4, 5]]),
        (6, 3, 3, [[0, 1, 2], [3, 4, 5]]),
        (2, 4, 2, [[0, 1]]),
        (0, 4, 2, []),
        (9, 2, 4, [[0, 1], [4, 5], [8]]),
        (5, 1, 1, [[0], [1], [2], [3], [4]]),
    ],
)
def test_windows_sizes_and_coverage(n: int, size: int, stride: int, expected: list[list[int]]) -> None:
    out = list(windows(iter(_frames("a", [i * 0.5 for i in range(n)])), size, stride))
    assert [[f.index for f in w] for w in out] == expected
    assert len({w.id for w in out}) == len(out)


def test_window_ids_are_stable() -> None:
    a = [w.id for w in windows(_frames("a", [0, 1, 2, 3]), 2, 1)]
    b = [w.id for w in windows(_frames("a", [0, 1, 2, 3]), 2, 1)]
    assert a == b


def test_windows_bad_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        list(windows([], 0, 1))
    with pytest.raises(ValueError, match="stride"):
        list(windows([], 2, 0))


def test_windows_over_a_real_source(scene_cfr: Any) -> None:
    with open_source(scene_cfr.cameras["cam0"], fps=2.0) as src:
        out = list(windows(src, 4, 2))
    assert [len(w) for w in out] == [4, 4, 4, 4, 4]
    assert [w.start for w in out] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(w.frames[-1].pts - w.frames[0].pts == pytest.approx(1.5, abs=0.05) for w in out)


def test_multicamera_aligns_within_tolerance() -> None:
    mc = MultiCameraWindows(["a", "b", "c"], tolerance_s=0.1)
    a = _frames("a", [0.0, 1.0, 2.0, 3.0])
    b = _frames("b", [0.03, 1.05, 2.2, 3.01])  # 2.2 is too far from 2.0
    c = _frames("c", [0.0, 0.98, 1.99, 2.97])
    out = []
    for trio in zip(a, b, c, strict=True):
        for f in trio:
            out += mc.push(f)
    out += mc.flush()
    got = [(tuple(round(f.pts, 2) for f in w), w.missing) for w in out]
    assert got == [
        ((0.0, 0.03, 0.0), ()),
        ((1.0, 1.05, 0.98), ()),
        ((2.0, 1.99), ("b",)),
        ((2.2,), ("a", "c")),
        ((3.0, 3.01, 2.97), ()),
    ]
    assert next(w.cameras for w in out) == ("a", "b", "c")


def test_multicamera_waits_for_slow_pts_camera_but_not_for_an_ended_one() -> None:
    mc = MultiCameraWindows(["a", "b"], tolerance_s=0.1)
    # Camera a runs ahead (a faster decoder); nothing is decided until b shows up.
    out = []
    for f in _frames("a", [0.0, 1.0, 2.0]):
        out += mc.push(f)
    assert out == []
    out = mc.push(_frames("b", [0.02])[0]) + mc.push(Frame("b", 1, 1.5, IMG))
    # 0.0 pairs; a@1.0 and b@1.5 have no partner within 0.1 s; a@2.0 still waits for b.
    assert [(tuple(f.pts for f in w), w.missing) for w in out] == [
        ((0.0, 0.02), ()), ((1.0,), ("b",)), ((1.5,), ("a",))]
    # b ends: the rest of a is emitted with b missing.
    out = mc.flush("b")
    assert [(tuple(f.pts for f in w), w.missing) for w in out] == [((2.0,), ("b",))]


def test_multicamera_wall_clock_does_not_wait_for_a_dead_camera() -> None:
    mc = MultiCameraWindows(["a", "b"], tolerance_s=0.1, clock="wall", max_wait_s=0.5)
    out = []
    for f in _frames("a", [0.0, 0.2, 0.4, 0.6, 0.8, 1.05], wall=True):
        out += mc.push(f)
    # b never sends: frames more than tolerance + max_wait behind the newest are emitted.
    assert [(w.frames[0].pts, w.missing) for w in out] == [(0.0, ("b",)), (0.2, ("b",)), (0.4, ("b",))]
    with pytest.raises(ValueError, match="wall_time"):
        mc.push(Frame("a", 9, 2.0, IMG, None))


def test_multicamera_offsets_and_validation() -> None:
    mc = MultiCameraWindows(["a", "b"], tolerance_s=0.05, offsets_s={"b": 0.5})
    out = mc.push(Frame("a", 0, 0.5, IMG)) + mc.push(Frame("b", 0, 0.0, IMG)) + mc.flush()
    assert [(w.cameras, w.missing) for w in out] == [(("a", "b"), ())]
    with pytest.raises(ValueError, match="not one of"):
        mc.push(Frame("z", 0, 0.0, IMG))
    with pytest.raises(ValueError, match="unique"):
        MultiCameraWindows(["a", "a"], tolerance_s=0.1)


def test_multicamera_on_real_videos(scene_multi: Any) -> None:
    names = sorted(scene_multi.cameras)
    mc = MultiCameraWindows(names, tolerance_s=0.05)
    sources = [open_source(scene_multi.cameras[n], fps=2.0, camera=n) for n in names]
    out = []
    # Interleave like three camera threads would.
    for trio in zip(*sources, strict=True):
        for f in trio:
            out += mc.push(f)
    for n in names:
        out += mc.flush(n)
    for s in sources:
        s.close()
    assert len(out) == 8
    for w in out:
        assert w.cameras == tuple(names) and w.missing == ()
        assert max(f.pts for f in w) - min(f.pts for f in w) <= 0.05
