"""Peak memory of ONNX Runtime running the vision graph: windowed attention vs the dense graph; prints JSON.

Both graphs are exported from the same random-weight vision tower with Qwen2.5-VL-7B's
attention geometry (16 heads x head_dim 80, window 112 px, merge 2, one windowed and one
full-attention block: peak memory is one layer's attention, so more blocks change nothing
but time). Each graph runs in its own process (`ru_maxrss`, the process's peak resident
memory) on `--images` frames of `--size`x`--size` pixels; the baseline is the same process
loading the session without running it. The figure is the ratio dense / windowed of the
peak added by running.

The dense graph holds N x N scores per head (N = all patches of the call): at 4 x 448² it is
16 x 4096² x 4 B = 1 GiB per score tensor. `--large-images` frames (default 8 x 448², N = 8192)
are run through the windowed graph only, next to the dense graph's computed need
(scores + softmax output, 2 x 16 x N² x 4 B = 8.6 GB), which is not run.

    python benchmarks/onnx_memory.py                     # ~2-4 min on 2 cores
    python benchmarks/onnx_memory.py --heads 2 --images 2 --large-images 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def export(out: Path, heads: int, attention: str) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from streamvg.grounding.onnx_export import export_vision_onnx

    model_dir = out / "model"
    if not model_dir.exists():
        text = {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 1, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4}}
        vision = {"depth": 2, "hidden_size": 80 * heads, "intermediate_size": 256, "num_heads": heads, "out_hidden_size": 32,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [1]}
        ids = {"image_token_id": 300, "video_token_id": 301, "vision_start_token_id": 302, "vision_end_token_id": 303}
        torch.manual_seed(0)
        Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)).save_pretrained(model_dir)
    engine = out / attention
    export_vision_onnx(model_dir, engine, max_pixels=448 * 448, max_images=4, attention=attention)
    return engine


def run_child(engine: str, images: int, size: int, execute: bool) -> dict[str, Any]:
    """In this process: load the session, optionally encode `images` frames; peak RSS in bytes."""
    import torch

    from streamvg.grounding.trt import OnnxRuntimeVisionEncoder

    encoder = OnnxRuntimeVisionEncoder(engine)
    side = size // 14 // 2 * 2
    grid = torch.tensor([[1, side, side]] * images)
    pixels = torch.randn(int(grid.prod(-1).sum()), encoder.spec.patch_dim)
    t0 = time.perf_counter()
    if execute:
        encoder.encode(pixels, grid)
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": time.perf_counter() - t0,
            "patches": int(grid.prod(-1).sum())}


def measure(engine: Path, images: int, size: int) -> dict[str, Any]:
    def child(execute: bool) -> dict[str, Any]:
        out = subprocess.run([sys.executable, __file__, "--child", str(engine), "--images", str(images), "--size", str(size),
                              *(["--execute"] if execute else [])], check=True, capture_output=True, text=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    idle, ran = child(False), child(True)
    return {"patches": ran["patches"], "peak_bytes": ran["peak_bytes"], "added_bytes": max(ran["peak_bytes"] - idle["peak_bytes"], 1),
            "seconds": round(ran["seconds"], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=16, help="attention heads (7B: 16); head_dim stays 80")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--large-images", type=int, default=8, help="frames of --size for the windowed-only large run")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--execute", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.images, args.size, args.execute)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        windowed, dense = export(root, args.heads, "windowed"), export(root, args.heads, "dense")
        w = measure(windowed, args.images, args.size)
        d = measure(dense, args.images, args.size)
        large = measure(windowed, args.large_images, args.size)
    n_large = large["patches"]
    result = {
        "benchmark": "onnx_vision_memory",
        "geometry": {"heads": args.heads, "head_dim": 80, "window_px": 112, "frames": args.images, "size": args.size},
        "windowed": w,
        "dense_baseline": d,
        "dense_over_windowed_added_memory": round(d["added_bytes"] / w["added_bytes"], 2),
        "large": {
            "frames": args.large_images, "patches": n_large, "windowed_peak_bytes": large["peak_bytes"],
            "windowed_added_bytes": large["added_bytes"], "seconds": large["seconds"],
            "dense_would_need_bytes": 2 * args.heads * n_large * n_large * 4,  # scores + softmax output, fp32
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
