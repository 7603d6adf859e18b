"""What the visual-token cache's content key costs per frame, against the image processor; prints JSON.

The `content` key (BLAKE2b over the pixels) is the default because a (camera, index, pts,
size) name can come back with new pixels; this measures what that safety costs per frame
at 480p, 720p and 1080p next to the work a cache miss does anyway: the Qwen image
processor's resize + normalise + patchify (at Qwen2.5-VL's default max_pixels and at
448²). The vision encoder itself, much slower still, is not counted. Ratio: hash / processor.

    python benchmarks/cache_key.py          # ~20 s
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def median_s(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from streamvg.grounding.cache import content_key, frame_key
    from streamvg.types import Frame

    rng = np.random.default_rng(0)
    rows = []
    for name, (w, h) in {"480p": (640, 480), "720p": (1280, 720), "1080p": (1920, 1080)}.items():
        frame = Frame(camera="c", index=1, pts=0.04, image=rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        row = {
            "frame": name,
            "content_key_ms": median_s(lambda f=frame: content_key(f), 20) * 1e3,
            "frame_key_ms": median_s(lambda f=frame: frame_key(f), 20) * 1e3,
        }
        for label, max_pixels in (("processor_448_ms", 448 * 448), ("processor_default_ms", 12845056)):
            proc = Qwen2VLImageProcessorPil(max_pixels=max_pixels)
            row[label] = median_s(lambda p=proc, f=frame: p(images=[f.image], return_tensors="pt"), 5) * 1e3
        row["content_key_over_processor_448"] = row["content_key_ms"] / row["processor_448_ms"]
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    print(json.dumps({"benchmark": "cache_key", "per_frame": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
