"""Sparse sampling speed: StreamVG's file sampling vs FFmpeg decoding every frame.

Generates (or takes) an H.264 video, then measures in one run:

- baseline: `ffmpeg -i VIDEO -f null -` (decode every frame, FFmpeg's own threads);
- StreamVG `open_source(VIDEO, fps=1, snap="exact")` and `snap="keyframe"` with the PyAV
  backend (seek + skip_frame), and the same with the decord backend, each including the
  conversion of every handed-out frame to an RGB numpy array.

Each measurement runs in a fresh child process (best of `--repeat`), so peak RSS is the
reader's own; peak RSS is also measured on a video a quarter as long, to show that memory
follows the window, not the video's length. The figure of merit is "video frames covered
per second" (the video's frame count / wall seconds) and its ratio to FFmpeg's.

    python benchmarks/sampling.py                      # 60 s 1280x720 30 fps, GOP 60, B-frames
    python benchmarks/sampling.py --background panning # textured, camera-like bitrate

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _child(video: str, fps: float, snap: str, backend: str) -> None:
    """Run one sampling pass and print its JSON (runs in a fresh process)."""
    sys.path.insert(0, str(ROOT))
    import av  # imports are not sampling work: load them before the clock starts

    from streamvg.sources import open_source

    if backend == "decord":
        import decord  # noqa: F401
    del av
    t0 = time.perf_counter()
    n = 0
    with open_source(video, fps=fps, snap=snap, backend=backend) as src:  # type: ignore[arg-type]
        for frame in src:
            n += int(frame.image.shape[0] > 0)
        total = src.info.frames or 0
        decoded = src.stats.frames_decoded
    elapsed = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"elapsed_s": elapsed, "frames_out": n, "frames_decoded": decoded,
                      "video_frames": total, "peak_rss_mb": rss_mb}))


def _run_child(video: Path, fps: float, snap: str, backend: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(video), str(fps), snap, backend],
        check=True, capture_output=True, text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _ffmpeg_decode_all(video: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(video), "-f", "null", "-"], check=True)
    return time.perf_counter() - t0


def _count_frames(video: Path) -> int:
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        return sum(1 for p in c.demux(s) if p.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, help="Use this video instead of generating one.")
    ap.add_argument("--duration", type=float, default=60.0, help="Generated video length, seconds.")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--video-fps", type=float, default=30.0)
    ap.add_argument("--gop", type=int, default=60, help="Keyframe interval, frames.")
    ap.add_argument("--bframes", type=int, default=2)
    ap.add_argument("--background", choices=["static", "panning"], default="static")
    ap.add_argument("--fps", type=float, default=1.0, help="Sampling rate, frames per second.")
    ap.add_argument("--repeat", type=int, default=3, help="Best of this many runs per measurement.")
    ap.add_argument("--no-decord", action="store_true", help="Skip the decord backend.")
    ap.add_argument("--workdir", type=Path, help="Where generated videos go (default: a temp dir).")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        sys.exit("ffmpeg is not installed; install Debian's ffmpeg package (apt-get install ffmpeg)")

    sys.path.insert(0, str(ROOT))
    from streamvg.testing.synthetic import write_scene

    work = args.workdir or Path(tempfile.mkdtemp(prefix="streamvg-bench-"))
    gen: dict[str, Any] = {"width": args.width, "height": args.height, "fps": args.video_fps, "gop": args.gop,
                           "bframes": args.bframes, "background": args.background, "objects": 4}
    t0 = time.perf_counter()
    if args.video is None:
        video = write_scene(work / "full", duration_s=args.duration, **gen).cameras["cam0"]
    else:
        video = args.video
    short = write_scene(work / "short", duration_s=max(2.0, args.duration / 4), **gen).cameras["cam0"]
    gen_s = time.perf_counter() - t0
    frames = _count_frames(video)

    ff = min(_ffmpeg_decode_all(video) for _ in range(args.repeat))
    ff_rate = frames / ff
    result: dict[str, Any] = {
        "video": {"path": str(video), "frames": frames, "duration_s": args.duration if args.video is None else None,
                  "size_mb": round(video.stat().st_size / 1e6, 2), **({} if args.video else gen)},
        "sampling_fps": args.fps,
        "cpus": os.cpu_count(),
        "generate_s": round(gen_s, 2),
        "baseline": {"what": "ffmpeg -i VIDEO -f null - (decode all)", "elapsed_s": round(ff, 3),
                     "frames_covered_per_s": round(ff_rate, 1)},
        "streamvg": {},
    }
    backends = ["pyav"] + ([] if args.no_decord else ["decord"])
    for backend in backends:
        for snap in ("exact", "keyframe"):
            runs = [_run_child(video, args.fps, snap, backend) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["elapsed_s"])
            short_run = _run_child(short, args.fps, snap, backend)
            rate = frames / best["elapsed_s"]
            result["streamvg"][f"{backend}_{snap}"] = {
                "elapsed_s": round(best["elapsed_s"], 3),
                "frames_out": best["frames_out"],
                "frames_decoded": best["frames_decoded"],
                "frames_covered_per_s": round(rate, 1),
                "ratio_vs_ffmpeg_decode_all": round(rate / ff_rate, 2),
                "peak_rss_mb": round(best["peak_rss_mb"], 1),
                "peak_rss_mb_quarter_length_video": round(short_run["peak_rss_mb"], 1),
            }
    # Where every sample time has a keyframe within tolerance (one sample per GOP), keyframe
    # mode decodes keyframes only: the upper bound of what snapping buys.
    gop_fps = args.video_fps / args.gop if args.video is None else args.fps / 2
    runs = [_run_child(video, gop_fps, "keyframe", "pyav") for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["elapsed_s"])
    result["streamvg"]["pyav_keyframe_one_sample_per_gop"] = {
        "sampling_fps": round(gop_fps, 4),
        "elapsed_s": round(best["elapsed_s"], 3),
        "frames_out": best["frames_out"],
        "frames_decoded": best["frames_decoded"],
        "frames_covered_per_s": round(frames / best["elapsed_s"], 1),
        "ratio_vs_ffmpeg_decode_all": round(frames / best["elapsed_s"] / ff_rate, 2),
        "peak_rss_mb": round(best["peak_rss_mb"], 1),
    }
    s = result["streamvg"]
    result["targets"] = {
        "exact_ge_1.5x": s["pyav_exact"]["ratio_vs_ffmpeg_decode_all"] >= 1.5,
        "keyframe_ge_4x": s["pyav_keyframe"]["ratio_vs_ffmpeg_decode_all"] >= 4.0,
    }
    print(json.dumps(result, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _child(sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
