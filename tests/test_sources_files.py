"""File sources: sampling by container PTS (exact and keyframe), decord vs PyAV, bad input,
and `streamvg probe`. Everything runs on real encoded video (synthetic and shared clips)."""

from __future__ import annotations

import bisect
import json
import logging
import math
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from streamvg.cli import main as cli_main
from streamvg.errors import ConfigError, SourceNotFoundError, StreamVGError, UnsupportedSourceError
from streamvg.sources import FileSource, SourceStatus, is_live, open_source
from streamvg.testing.synthetic import write_scene

MEDIA = Path(__file__).resolve().parent / "media"  # copies of ../shared/media (see its README)
CLIPS = ["bigbuckbunny.mp4", "carphone.mp4", "cup.mp4"]


def _reference(path: Path) -> tuple[list[float], list[float], dict[float, np.ndarray]]:
    """Every frame's PTS (seconds, sorted), keyframe PTS, and RGB images, decoded with plain PyAV."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        keys = sorted(float(p.pts * s.time_base) for p in c.demux(s) if p.size and p.is_keyframe)
    with av.open(str(path)) as c:
        images = {float(f.pts * f.time_base): f.to_ndarray(format="rgb24") for f in c.decode(video=0)}
    return sorted(images), keys, images


def _videos(request: pytest.FixtureRequest) -> list[Path]:
    vids = [request.getfixturevalue("scene_cfr").cameras["cam0"], request.getfixturevalue("scene_vfr").cameras["cam0"]]
    return vids + [MEDIA / c for c in CLIPS]


@pytest.fixture(scope="module")
def references(request: pytest.FixtureRequest) -> dict[Path, Any]:
    return {p: _reference(p) for p in _videos(request)}


def test_shared_clips_present() -> None:
    missing = [c for c in CLIPS if not (MEDIA / c).is_file()]
    assert not missing, f"shared test clips missing from {MEDIA}: {missing}"


@pytest.mark.parametrize("fps", [1.0, 2.5])
def test_exact_sampling_returns_container_frames_by_pts(references: dict[Path, Any], fps: float) -> None:
    for path, (pts, _keys, images) in references.items():
        with open_source(path, fps=fps, snap="exact", camera="c") as src:
            frames = list(src)
        # Expected: for each target t0 + k/fps, the first frame at or after it (by PTS, not index/fps).
        expected: list[float] = []
        k = 0
        while (t := pts[0] + k / fps) <= pts[-1] + 1e-9:
            j = bisect.bisect_left(pts, t - 1e-6)
            if j < len(pts) and (not expected or pts[j] != expected[-1]):
                expected.append(pts[j])
            k += 1
        got = [f.pts for f in frames]
        assert got == pytest.approx(expected, abs=1e-9), path.name
        for f in frames:
            assert f.index == pts.index(f.pts) and f.camera == "c" and f.wall_time is None
            assert np.array_equal(f.image, images[f.pts]), (path.name, f.pts)


def test_every_frame_when_fps_is_none(references: dict[Path, Any], scene_vfr: Any) -> None:
    path = scene_vfr.cameras["cam0"]
    pts, _keys, _images = references[path]
    with open_source(path) as src:
        assert [f.pts for f in src] == pytest.approx(pts, abs=1e-9)
    gt = [f["pts"] for f in scene_vfr.ground_truth["cameras"]["cam0"]["frames"]]
    assert gt == pytest.approx(pts, abs=1e-9)


@pytest.mark.parametrize("fps", [1.0, 0.5, 3.0])
def test_keyframe_snapping(references: dict[Path, Any], fps: float) -> None:
    for path, (pts, keys, images) in references.items():
        tol = 0.5 / fps
        with open_source(path, fps=fps, snap="keyframe") as ksrc:
            kframes = list(ksrc)
            decoded_key = ksrc.stats.frames_decoded
        with open_source(path, fps=fps, snap="exact") as esrc:
            n_exact = len(list(esrc))
            decoded_exact = esrc.stats.frames_decoded
        got = [f.pts for f in kframes]
        assert got == sorted(set(got)), "keyframe mode must not repeat or reorder frames"
        targets = [pts[0] + k / fps for k in range(math.floor((pts[-1] - pts[0]) * fps + 1e-9) + 1)]
        for t in targets:
            near_keys = [k for k in keys if abs(k - t) <= tol + 1e-9]
            in_window = [p for p in got if abs(p - t) <= tol + 1e-9]
            assert in_window, f"{path.name}: no frame within {tol} s of {t}"
            if near_keys:
                assert any(p in keys for p in in_window), f"{path.name}: target {t} should snap to a keyframe"
        for f in kframes:
            assert np.array_equal(f.image, images[f.pts])
        assert len(kframes) <= n_exact + 1
        assert decoded_key <= decoded_exact, path.name


def test_keyframe_mode_decodes_only_keyframes_when_they_are_close(scene_cfr: Any) -> None:
    # GOP 2 s, one sample every 2 s: every target is a keyframe, nothing else is decoded.
    with open_source(scene_cfr.cameras["cam0"], fps=0.5, snap="keyframe") as src:
        frames = list(src)
        assert [f.pts for f in frames] == [0.0, 2.0, 4.0]
        assert src.stats.frames_decoded == 3
    with open_source(scene_cfr.cameras["cam0"], fps=0.5, snap="exact", tolerance_s=0.1) as src:
        assert [f.pts for f in src] == [0.0, 2.0, 4.0]


def test_keyframe_tolerance(scene_cfr: Any) -> None:
    # Targets 0.9, 1.9, ... with tolerance 0.15 s: 1.9 snaps to the keyframe at 2.0.
    with open_source(scene_cfr.cameras["cam0"], fps=1.0, snap="keyframe", tolerance_s=0.15) as src:
        pts = [f.pts for f in src]
    assert 2.0 in pts and 4.0 in pts
    assert pts[1] == pytest.approx(0.88)  # no keyframe near 1.0: the earliest frame within 0.15 s


def test_thread_choice_follows_the_plan_and_never_changes_pixels(scene_cfr: Any) -> None:
    path = scene_cfr.cameras["cam0"]  # GOP 2 s at 25 fps
    with open_source(path, fps=1.0) as sparse, open_source(path, fps=None) as dense:
        assert sparse.thread_type == "SLICE"  # two wanted frames per GOP: seek-heavy
        assert dense.thread_type == "AUTO"  # every frame: long decoding runs
    for fps in (1.0, 10.0):
        outs = []
        for thread_type in ("AUTO", "SLICE", "NONE"):
            with FileSource(path, fps=fps, thread_type=thread_type) as src:  # type: ignore[arg-type]
                outs.append(list(src))
        for other in outs[1:]:
            assert [f.pts for f in other] == [f.pts for f in outs[0]]
            assert all(np.array_equal(a.image, b.image) for a, b in zip(outs[0], other, strict=True))


@pytest.mark.parametrize("name", ["scene_cfr", "scene_vfr", "cup.mp4", "carphone.mp4"])
@pytest.mark.parametrize("snap", ["exact", "keyframe"])
def test_decord_and_pyav_agree(name: str, snap: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(name).cameras["cam0"] if name.startswith("scene") else MEDIA / name
    with open_source(path, fps=2.0, snap=snap, backend="decord") as d, open_source(path, fps=2.0, snap=snap, backend="pyav") as p:
        assert d.info.backend == "decord" and p.info.backend == "pyav"
        a, b = list(d), list(p)
    assert [f.pts for f in a] == [f.pts for f in b]
    assert [f.index for f in a] == [f.index for f in b]
    diffs = [float(np.abs(x.image.astype(np.int16) - y.image).mean()) for x, y in zip(a, b, strict=True)]
    assert max(diffs) < 1.0, diffs


def test_decord_falls_back_to_pyav_when_it_cannot_open(tmp_path: Path) -> None:
    # A raw H.264 elementary stream: decord refuses it, PyAV reads it (no timestamps in
    # such a stream, so times are index / nominal fps: the one case where they must be).
    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            img = np.full((48, 64, 3), i * 20, np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode(None))
    import decord

    with pytest.raises(Exception):  # noqa: B017 - decord raises its own error types
        decord.VideoReader(str(path))
    with open_source(path, fps=5.0, backend="decord") as src:
        assert src.info.backend == "pyav"
        assert src.info.fps == 25.0  # FFmpeg's nominal rate for raw H.264 without timing info
        frames = list(src)
    assert [(f.index, f.pts) for f in frames] == [(0, 0.0), (5, 0.2)]
    assert [int(f.image.mean()) for f in frames] == pytest.approx([0, 100], abs=4)


def test_info_and_status(scene_cfr: Any) -> None:
    seen: list[SourceStatus] = []
    with open_source(scene_cfr.cameras["cam0"], fps=1.0, camera="front", on_status=seen.append) as src:
        info = src.info
        assert (info.codec, info.width, info.height) == ("h264", 640, 360)
        assert info.fps == pytest.approx(25.0) and info.duration_s == pytest.approx(6.0, abs=0.05)
        assert info.keyframe_interval_s == pytest.approx(2.0) and info.frames == 150
        n = len(list(src))
        assert src.stats.frames_in == n == 6 and src.stats.frames_dropped == 0
    assert [s.state for s in seen] == ["ended"] and seen[0].camera == "front"
    assert not is_live(str(scene_cfr.cameras["cam0"]))


# --- bad input ------------------------------------------------------------------------------


def test_missing_file() -> None:
    with pytest.raises(SourceNotFoundError, match=r"/no/such/video.mp4 does not exist"):
        open_source("/no/such/video.mp4")


def test_not_a_video(tmp_path: Path) -> None:
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 100)
    with pytest.raises(UnsupportedSourceError, match="is not a video file"):
        open_source(bad)
    with pytest.raises(UnsupportedSourceError, match="directory"):
        open_source(tmp_path)


def test_unsupported_scheme_masks_password() -> None:
    with pytest.raises(UnsupportedSourceError) as ei:
        open_source("ftp://admin:hunter2@cam.local/stream")
    assert "hunter2" not in str(ei.value) and "'ftp://' is not supported" in str(ei.value)


def test_unknown_option() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        open_source(str(MEDIA / "cup.mp4"), rtsp_transport="tcp")


def test_truncated_file_decodes_what_is_there(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scene = write_scene(tmp_path / "s", width=160, height=96, duration_s=4.0, faststart=True, seed=2)
    full = scene.cameras["cam0"].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full[: int(len(full) * 0.6)])
    seen: list[SourceStatus] = []
    with caplog.at_level(logging.WARNING, logger="streamvg"), open_source(cut, fps=2.0, on_status=seen.append) as src:
        frames = list(src)
    assert 2 <= len(frames) < 8
    assert frames[-1].pts < 3.5
    assert seen[-1].state == "ended" and "truncated" in seen[-1].detail
    warning = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warning) == 1 and "of 4.00 s" in warning[0] and str(cut) in warning[0]

    # Without faststart the MP4 index is at the end: nothing is readable, said clearly.
    plain = write_scene(tmp_path / "p", width=160, height=96, duration_s=2.0, seed=2).cameras["cam0"]
    cut2 = tmp_path / "cut2.mp4"
    cut2.write_bytes(plain.read_bytes()[: plain.stat().st_size // 2])
    with pytest.raises(UnsupportedSourceError, match="truncated"):
        open_source(cut2)


# --- streamvg probe -----------------------------------------------------------------------


def test_probe_cli(scene_vfr: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = scene_vfr.cameras["cam0"]
    assert cli_main(["probe", str(path), "--fps", "2", "--snap", "keyframe", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    info, frames = lines[0], lines[1:]
    assert info["codec"] == "h264" and info["width"] == 640 and info["keyframe_interval_s"] == pytest.approx(2.0, abs=0.2)
    with FileSource(path, fps=2.0, snap="keyframe") as src:
        assert [(f["index"], f["pts"]) for f in frames] == [(f.index, round(f.pts, 6)) for f in src]


def test_probe_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["probe", "/no/such.mp4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0] and "Traceback" not in err[0]
    assert issubclass(SourceNotFoundError, StreamVGError)


def test_close_from_another_thread_ends_iteration(scene_cfr: Any) -> None:
    import threading

    from streamvg.testing.servers import wait_until

    src = open_source(scene_cfr.cameras["cam0"])  # every frame: long enough to interrupt
    got: list[float] = []
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            for f in src:
                got.append(f.pts)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    wait_until(lambda: len(got) >= 3, timeout=10, what="first frames")
    src.close()
    t.join(5)
    assert not t.is_alive() and not errors
    assert 3 <= len(got) < 150
