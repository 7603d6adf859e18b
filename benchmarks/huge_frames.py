"""Peak memory of reading huge frames, with and without the frame-size guard; prints JSON.

A 16000×16000 MJPEG video (flat grey JPEGs written by hand, so the file is 2 MB) is read by
`open_source` in a fresh process per setting, and the process's peak RSS is reported (VmHWM;
a child's ru_maxrss starts at its parent's RSS): the guard (`max_pixels`, default 3840×2160)
decodes at 1/4 size (FFmpeg `lowres`) and resizes inside the RGB conversion; without it each
frame is 256 MB of grey and 768 MB of RGB. Baseline: the same read with `max_pixels=None`,
in the same run. Target: ≤ 0.2x.

    python benchmarks/huge_frames.py                 # ~15 s on 2 cores, ~2 GB for the baseline
    python benchmarks/huge_frames.py --size 8000 --frames 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

_CHILD = """
import re, sys, time
from streamvg.sources import open_source
limit = None if sys.argv[2] == "none" else int(sys.argv[2])
t = time.perf_counter()
with open_source(sys.argv[1], max_pixels=limit) as src:
    shapes = [list(f.image.shape) for f in src]
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(hwm / 1024, time.perf_counter() - t, shapes[0])
"""


def _run(path: Path, limit: str) -> dict[str, object]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), limit], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split(" ", 2)
    return {"peak_rss_mb": round(float(out[0]), 1), "read_s": round(float(out[1]), 2),
            "frame_shape": json.loads(out[2]), "process_s": round(time.perf_counter() - t, 2)}


def main() -> None:
    from streamvg.sources import DEFAULT_MAX_PIXELS
    from streamvg.testing.broken_media import write_huge_mjpeg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16000, help="frame width and height (multiple of 8)")
    ap.add_argument("--frames", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = write_huge_mjpeg(Path(d) / "huge.mkv", args.size, args.size, frames=args.frames)
        guard = _run(path, str(DEFAULT_MAX_PIXELS))
        baseline = _run(path, "none")
    ratio = guard["peak_rss_mb"] / baseline["peak_rss_mb"]  # type: ignore[operator]
    print(json.dumps({
        "frame": f"{args.size}x{args.size} MJPEG, {args.frames} frames",
        "guard_max_pixels": DEFAULT_MAX_PIXELS,
        "guard": guard,
        "baseline_no_guard": baseline,
        "peak_rss_ratio_vs_no_guard": round(ratio, 3),
        "targets": {"peak_rss_le_0.2x": ratio <= 0.2},
    }, indent=2))


if __name__ == "__main__":
    main()
