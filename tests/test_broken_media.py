"""Broken real-world media, built in the tests from real clips and real encoders.

* container `pts` out of display order (±100 ms jumps, steady `dts`): sampled times equal
  `ffprobe`'s `best_effort_timestamp_time`, and each frame's picture is the one FFmpeg
  decodes at that position;
* MPEG-TS clips concatenated (timestamps restart, 320×240 → 640×480): every sample time once,
  one warning;
* a truncated MP4 whose index is at the end: named as such;
* a frame-size guard: huge frames downscaled on decode, for files, live streams and devices,
  with a peak-memory bound in a separate process.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.cli import main as cli_main
from streamvg.config import SamplingConfig
from streamvg.errors import UnsupportedSourceError
from streamvg.sources import DEFAULT_MAX_PIXELS, open_source
from streamvg.sources.devices import DeviceSource
from streamvg.sources.files import timestamps_suspect
from streamvg.sources.live import LiveSource
from streamvg.testing.broken_media import (
    write_concatenated_ts,
    write_huge_mjpeg,
    write_jittered_pts,
    write_truncated_mp4,
    write_ts_clip,
)

MEDIA = Path(__file__).parent / "media"


def ffprobe_frames(path: Path) -> list[dict[str, Any]]:
    """Every video frame as ffprobe (Debian's binary, not PyAV) reports it, in output order."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-of", "json", "-show_entries",
         "frame=best_effort_timestamp_time,pts_time,key_frame,width,height", str(path)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return list(json.loads(out)["frames"])


def monotonic_line(times: list[float]) -> list[int]:
    """Output positions whose time comes before every later one (the sampler's time line)."""
    keep: list[int] = []
    low = float("inf")
    for n in range(len(times) - 1, -1, -1):
        if times[n] < low:
            keep.append(n)
            low = times[n]
    return keep[::-1]


def exact_choice(line: list[float], fps: float) -> list[float]:
    """For each sample time t0 + k/fps, the first time on `line` at or after it, once each."""
    out: list[float] = []
    k = 0
    while line[0] + k / fps <= line[-1] + 1e-9:
        target = line[0] + k / fps
        t = next(x for x in line if x >= target - 1e-6)
        if not out or t != out[-1]:
            out.append(t)
        k += 1
    return out


def decoded_pictures(path: Path) -> list[np.ndarray]:
    """Every picture FFmpeg's decoder outputs, in output order (the reference content)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


# --- non-monotonic pts -----------------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=[("carphone.mp4", 0), ("carphone.mp4", 1), ("carphone.mp4", 2), ("cup.mp4", 3)],
    ids=lambda p: f"{p[0][:-4]}-pattern{p[1]}",
)
def jittered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    # A different pattern of ±100 ms jumps per seed (exploring, not one hand-picked case), on
    # a clip with B-frames (carphone) and one without at a non-integer rate (cup).
    clip, seed = request.param
    rng = np.random.default_rng(seed)
    pattern = [int(x) for x in rng.choice([-1, 0, 1], size=int(rng.integers(3, 9)))]
    pattern[0], pattern[1] = 1, -1  # at least one jump each way
    path = write_jittered_pts(MEDIA / clip, tmp_path_factory.mktemp("jit") / clip, pattern=pattern)
    return path, ffprobe_frames(path)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_exact_sampling_follows_ffprobe_best_effort(jittered: tuple[Path, list[dict[str, Any]]], backend: str) -> None:
    path, probe = jittered
    best = [float(f["best_effort_timestamp_time"]) for f in probe]
    pts = [float(f["pts_time"]) for f in probe]
    assert any(b < a for a, b in itertools.pairwise(pts)), "the file's pts should be out of display order"
    line = [best[n] for n in monotonic_line(best)]
    expected = exact_choice(line, fps=4.0)
    naive = exact_choice(sorted(pts), fps=4.0)  # what sorting the container's pts gives
    assert naive != expected

    with open_source(path, fps=4.0, backend=backend) as src:
        frames = list(src)
        assert src.info.timestamps == "best_effort" and src.info.backend == "pyav"
    assert [f.pts for f in frames] == pytest.approx(expected, abs=1e-6)
    pictures = decoded_pictures(path)
    for f in frames:
        # The frame at output position f.index is the one ffprobe times at f.pts ...
        assert best[f.index] == pytest.approx(f.pts, abs=1e-6)
        # ... and its picture is that frame's picture.
        assert np.array_equal(f.image, pictures[f.index])


def test_keyframe_sampling_follows_ffprobe_best_effort(jittered: tuple[Path, list[dict[str, Any]]]) -> None:
    path, probe = jittered
    best = [float(f["best_effort_timestamp_time"]) for f in probe]
    line = monotonic_line(best)
    fps, tol = 4.0, 0.125
    with open_source(path, fps=fps, snap="keyframe") as src:
        frames = list(src)
    times = [f.pts for f in frames]
    assert times == sorted(set(times)) and len(times) >= 0.8 * (best[line[-1]] - best[line[0]]) * fps
    t0 = best[line[0]]
    for f in frames:
        assert f.index in line and best[f.index] == pytest.approx(f.pts, abs=1e-6)
        k = round((f.pts - t0) * fps)
        assert abs(f.pts - (t0 + k / fps)) <= tol + 1e-6
    # A keyframe within the tolerance of a sample time is what that sample takes.
    chosen = {round((f.pts - t0) * fps): f.index for f in frames}
    for n in line:
        k = round((best[n] - t0) * fps)
        if probe[n]["key_frame"] and abs(best[n] - (t0 + k / fps)) <= tol:
            assert probe[chosen[k]]["key_frame"]


@settings(max_examples=100, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 9000), min_size=2, max_size=80),
    depth=st.integers(0, 3),
    data=st.data(),
)
def test_sane_timestamps_are_never_suspect(gaps: list[int], depth: int, data: st.DataObject) -> None:
    # Any frame times (constant or variable rate) in any decode order a decoder reordering
    # `depth` frames can output, with dts from the sorted pts as encoders write them: the
    # cheap packet check must not send such a file to the slow best-effort decode.
    pts = list(itertools.accumulate(gaps))
    order: list[int] = []
    for i in range(0, len(pts), depth + 1):  # reordered within blocks of depth + 1 frames
        order += data.draw(st.permutations(pts[i : i + depth + 1]))
    dts = [p - (pts[depth] - pts[0] if depth < len(pts) else 0) for p in sorted(pts)]
    assert not timestamps_suspect(list(zip(order, dts, strict=True)), depth)


@given(start=st.integers(0, 3000), at=st.integers(2, 38), depth=st.integers(0, 3))
def test_a_restart_is_always_suspect(start: int, at: int, depth: int) -> None:
    ticks = list(range(0, 3600 * 40, 3600))
    restarted = ticks[:at] + [t - ticks[at] + start for t in ticks[at:]]  # back to near 0
    assert timestamps_suspect([(t, t) for t in restarted], depth)


@pytest.mark.parametrize("clip", ["carphone.mp4", "cup.mp4", "bigbuckbunny.mp4"])
def test_sane_files_keep_container_pts(clip: str) -> None:
    # Sane pts: FFmpeg's best effort is the pts itself, and the file is still read by seeking.
    probe = ffprobe_frames(MEDIA / clip)
    best = sorted(float(f["best_effort_timestamp_time"]) for f in probe)
    with open_source(MEDIA / clip, fps=3.0) as src:
        assert src.index.sequential is None and src.info.timestamps == "container"  # type: ignore[attr-defined]
        times = [f.pts for f in src]
    assert times == pytest.approx(exact_choice(best, 3.0), abs=1e-6)


# --- concatenated MPEG-TS ----------------------------------------------------------------


CLIPS = {
    "two": [(320, 240, 2.0), (640, 480, 2.0)],
    "three": [(640, 360, 1.2), (320, 180, 1.6), (640, 360, 1.0)],
}


@pytest.fixture(scope="module", params=sorted(CLIPS))
def concatenated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_concatenated_ts(tmp_path_factory.mktemp("ts") / f"{request.param}.ts", CLIPS[request.param])


def carried_line(raw: list[float]) -> list[float]:
    """ffprobe's times with each restart moved to one frame after the clip before it."""
    step = raw[1] - raw[0]
    line = [raw[0]]
    offset = 0.0
    for a, b in itertools.pairwise(raw):
        if b < a - 0.5:  # a restart (these clips' own reordering is a few frames)
            offset = line[-1] + step - b
        line.append(b + offset)
    return line


@pytest.mark.parametrize("snap", ["exact", "keyframe"])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_concatenated_ts_yields_every_sample_time_once(
    concatenated: Path, snap: str, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    clips = CLIPS[concatenated.stem]
    probe = ffprobe_frames(concatenated)
    raw = [float(f["best_effort_timestamp_time"]) for f in probe]
    assert sum(b < a - 0.5 for a, b in itertools.pairwise(raw)) == len(clips) - 1  # the restarts
    # Each clip continues one frame after the one before: their summed length, 25 fps.
    line = carried_line(raw)
    assert line == sorted(line) and line[-1] - line[0] == pytest.approx(sum(d for *_, d in clips) - 0.04, abs=1e-6)
    fps = 5.0
    with caplog.at_level(logging.WARNING, logger="streamvg"), open_source(
        concatenated, fps=fps, snap=snap, backend=backend  # type: ignore[arg-type]
    ) as src:
        frames = list(src)
    times = [f.pts for f in frames]
    targets = [line[0] + k / fps for k in range(math.floor((line[-1] - line[0]) * fps + 1e-9) + 1)]
    assert times == sorted(set(times)), "every sample time once, in order"
    if snap == "exact":
        assert times == pytest.approx(exact_choice(line, fps), abs=1e-6)
    assert len(times) == len(targets)  # none lost, none doubled
    for t, target in zip(times, targets, strict=True):
        assert abs(t - target) <= 0.5 / fps + 1e-6
    for f in frames:  # each sample's picture comes from its own clip, at that clip's size
        assert f.image.shape[:2] == (probe[f.index]["height"], probe[f.index]["width"])
        clip = np.searchsorted(np.cumsum([d for *_, d in clips]), f.pts - line[0] + 1e-6, side="right")
        assert f.image.shape[1] == clips[clip][0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    sizes = " → ".join(f"{w}×{h}" for w, h, _ in clips)
    assert f"restart {len(clips) - 1} time(s)" in warnings[0] and sizes in warnings[0] and str(concatenated) in warnings[0]


def test_concatenated_ts_every_frame(concatenated: Path) -> None:
    n = len(ffprobe_frames(concatenated))
    with open_source(concatenated) as src:
        times = [f.pts for f in src]
        assert src.info.duration_s == pytest.approx(sum(d for *_, d in CLIPS[concatenated.stem]), abs=0.05)
        assert src.info.timestamps == "best_effort" and src.info.frames == n
    assert len(times) == n and all(b > a for a, b in itertools.pairwise(times))


# --- truncated MP4 -------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.97])
def test_truncated_moov_at_end_is_named(tmp_path: Path, keep: float, capsys: pytest.CaptureFixture[str]) -> None:
    cut = write_truncated_mp4(MEDIA / "bigbuckbunny.mp4", tmp_path / "cut.mp4", keep=keep)
    with pytest.raises(UnsupportedSourceError) as err:
        open_source(cut)
    msg = str(err.value)
    assert msg.startswith(f"{cut} is a truncated MP4 (its index is missing)")
    assert "re-export" in msg and "-movflags faststart" in msg and "not a video file" not in msg
    # The probe command says the same sentence, without a traceback.
    capsys.readouterr()
    assert cli_main(["probe", str(cut)]) != 0
    err_text = capsys.readouterr().err
    assert "truncated MP4 (its index is missing)" in err_text and "Traceback" not in err_text


def test_whole_moov_at_end_and_non_video_files(tmp_path: Path) -> None:
    whole = write_truncated_mp4(MEDIA / "carphone.mp4", tmp_path / "whole.mp4", keep=1.0)
    with open_source(whole, fps=2.0) as src:
        assert len(list(src)) == 8
    junk = tmp_path / "notes.mp4"
    junk.write_bytes(b"these are notes, not a video\n" * 100)
    with pytest.raises(UnsupportedSourceError, match="is not a video file"):
        open_source(junk)


# --- frame-size guard ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_mjpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_huge_mjpeg(tmp_path_factory.mktemp("big") / "big.mkv", 4096, 2048, frames=2)


def test_sampling_config_has_a_frame_pixel_limit() -> None:
    assert SamplingConfig().max_frame_pixels == DEFAULT_MAX_PIXELS == 3840 * 2160
    assert SamplingConfig(max_frame_pixels=None).max_frame_pixels is None
    with pytest.raises(ValueError, match="max_frame_pixels"):
        SamplingConfig(max_frame_pixels=0)


@pytest.mark.parametrize("limit", [DEFAULT_MAX_PIXELS, 1_000_000, 50_000])
def test_file_frames_above_the_limit_are_downscaled(big_mjpeg: Path, limit: int) -> None:
    with open_source(big_mjpeg, max_pixels=limit) as src:
        frames = list(src)
    assert len(frames) == 2
    for f in frames:
        h, w = f.image.shape[:2]
        assert w * h <= limit and w * h > 0.9 * limit  # as big as allowed, not smaller
        assert w / h == pytest.approx(2.0, rel=0.02)  # aspect kept
        assert int(f.image.mean()) == 128  # the flat grey picture survives the scaling


def test_small_frames_are_untouched_and_the_guard_can_be_off(big_mjpeg: Path) -> None:
    with open_source(MEDIA / "cup.mp4", fps=1.0) as src:
        assert {f.image.shape for f in src} == {(480, 640, 3)}
    with open_source(big_mjpeg, max_pixels=None) as src:
        assert next(src).image.shape == (2048, 4096, 3)


def test_decord_frames_are_downscaled(tmp_path: Path) -> None:
    big = tmp_path / "big.mp4"
    with av.open(str(MEDIA / "carphone.mp4")) as c:
        pictures = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])][:20]
    with av.open(str(big), "w") as out:  # a real H.264 file decord can read
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = 352, 288, "yuv420p"
        for img in pictures:
            for p in st.encode(av.VideoFrame.from_ndarray(np.kron(img, np.ones((2, 2, 1), np.uint8)), format="rgb24")):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    with open_source(big, fps=5.0, backend="decord", max_pixels=176 * 144) as src:
        frames = list(src)
        assert src.backend == "decord"  # type: ignore[attr-defined]
    assert frames and {f.image.shape for f in frames} == {(144, 176, 3)}


def test_live_and_device_frames_are_downscaled(big_mjpeg: Path) -> None:
    live = LiveSource(str(big_mjpeg), camera="big", max_pixels=1_000_000, max_reconnects=0, queue_size=8).start()
    try:
        f = next(live)
        h, w = f.image.shape[:2]
        assert 0.9e6 < w * h <= 1_000_000 and w / h == pytest.approx(2.0, rel=0.01)
    finally:
        live.close()
    dev = DeviceSource(str(MEDIA / "carphone.mp4"), camera="desk", max_pixels=88 * 72, max_reconnects=0, queue_size=8).start()
    try:
        f = next(dev)
        assert f.image.shape == (72, 88, 3)
    finally:
        dev.close()


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS when it forked.
_PEAK_RSS = """
import re, sys
from streamvg.sources import open_source
with open_source(sys.argv[1]) as src:
    shapes = [f.image.shape for f in src]
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(hwm // 1024, shapes)
"""


def test_huge_mjpeg_peak_memory_stays_small(tmp_path: Path) -> None:
    # 16000×16000: a full-size decode is 256 MB of grey and 768 MB as RGB (3 GB measured
    # before the guard); with the guard it decodes at 1/4 size and is resized to 4K UHD.
    path = write_huge_mjpeg(tmp_path / "huge.mkv", 16000, 16000, frames=2)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_PEAK_RSS), str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak_mb, shapes = r.stdout.split(" ", 1)
    assert shapes.strip() == "[(2880, 2880, 3), (2880, 2880, 3)]"
    assert int(peak_mb) < 400, f"peak RSS {peak_mb} MB"


def test_pipeline_grounds_every_sample_time_of_a_concatenated_file_once(tmp_path: Path) -> None:
    # End to end: sources → windows (overlapping) → engine (replay, no model) → events.
    import uuid

    from streamvg.config import EngineConfig, PipelineConfig, QueryConfig, SourceConfig
    from streamvg.demo import EventCollector
    from streamvg.pipeline import Pipeline

    ts = write_concatenated_ts(tmp_path / "two.ts", CLIPS["two"])
    answers = tmp_path / "none.jsonl"
    answers.write_text("")
    cfg = PipelineConfig(
        name=f"t-{uuid.uuid4().hex[:6]}",
        sources=[SourceConfig(name="cat", uri=str(ts))],
        sampling=SamplingConfig(fps=2.0, window_size=3, stride=1, max_frame_pixels=50_000),
        queries=[QueryConfig(id="q", text="anything")],
        engine=EngineConfig(kind="replay", replay_path=str(answers)),
    )
    collector = EventCollector()
    Pipeline(cfg, sinks=[collector]).run()
    with open_source(ts, fps=2.0) as src:
        planned = src.planned  # type: ignore[attr-defined]
    times = [e.t for e in collector.events if e.kind == "grounding" and e.camera == "cat"]
    assert len(planned) == 8 and sorted(times) == pytest.approx(planned, abs=1e-6)


@pytest.mark.parametrize("snap", ["exact", "keyframe"])
def test_size_change_with_continuous_timestamps_keeps_seeking(tmp_path: Path, snap: str) -> None:
    # The same two clips joined by ffmpeg's concat demuxer: timestamps continue, only the frame
    # size changes; the container's pts are sane, so the file is still read by seeking.
    parts = [write_ts_clip(tmp_path / f"{n}.ts", w, h, d, seed=n) for n, (w, h, d) in enumerate(CLIPS["two"])]
    (tmp_path / "list.txt").write_text("".join(f"file '{p}'\n" for p in parts))
    joined = tmp_path / "joined.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(tmp_path / "list.txt"),
                    "-c", "copy", str(joined)], check=True, timeout=60)
    probe = ffprobe_frames(joined)
    line = sorted(float(f["best_effort_timestamp_time"]) for f in probe)
    with open_source(joined, fps=5.0, snap=snap) as src:  # type: ignore[arg-type]
        frames = list(src)
        assert src.info.timestamps == "container"  # type: ignore[attr-defined]
    if snap == "exact":
        assert [f.pts for f in frames] == pytest.approx(exact_choice(line, 5.0), abs=1e-6)
    for f in frames:
        assert f.image.shape[:2] == (probe[f.index]["height"], probe[f.index]["width"])
    assert {f.image.shape[1] for f in frames} == {320, 640}
