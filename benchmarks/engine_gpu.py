"""GeM-VG engine throughput on a GPU: HF eager bf16 vs the optimized paths installed; prints JSON.

What it measures: windows/s and latency of `generate()` on a GeM-VG-7B-shaped model
(Qwen2.5-VL-7B config dims, random bf16 weights, nothing downloaded) for windows of
`--frames` frames of `--size`x`--size` pixels, at batch 1 and 8, with a fixed number of new
tokens (EOS suppressed) so every path does the same work. Paths:

- `hf_eager_bf16`     transformers as loaded: dynamic KV cache, no compilation (the baseline).
- `hf_static_compile` static KV cache; transformers compiles the decode step with
                      torch.compile (CUDA graphs, mode "reduce-overhead") on GPU.
- `trt_vision`        `hf_static_compile` + the vision encoder as a TensorRT engine (only with
                      `--trt` and `tensorrt` installed: export + build add minutes).
- `ort_vision`        (--dry-run only) the exported vision graph in ONNX Runtime, to exercise
                      the export + encoder-swap code path on CPU.
- `shared_prefix_q4`  four queries of one window: the shared visual prefix (prefill once,
                      decode each query on a copy of the KV cache) against one prompt per
                      query in one batch; latency, prefill tokens and same-tokens check.

Each result also carries `vision_s`, the vision encoder alone on the same frames. Ratios are
against `hf_eager_bf16` measured in the same run. `--dry-run` runs everything on CPU with a
tiny config in seconds (the test suite does this); on one H100 the default run takes about
4-6 minutes (model init ~20 s, torch.compile ~1-2 min per batch size), within 8 minutes;
`--time-budget-s` skips what would not fit and says so in the JSON.

    python benchmarks/engine_gpu.py                 # GPU, PyTorch + transformers only
    python benchmarks/engine_gpu.py --trt           # also build and time the TensorRT encoder
    python benchmarks/engine_gpu.py --dry-run       # CPU, tiny model, ~10 s
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Qwen2.5-VL-7B-Instruct dimensions (config.json of the released model).
_7B_TEXT = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643, "tie_word_embeddings": False,
}
_7B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_channels": 3,
}
_7B_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653}

_TINY_TEXT = {
    "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
_TINY_VISION = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 32,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
    "fullatt_block_indexes": [1],
}
_TINY_IDS = {"image_token_id": 290, "video_token_id": 291, "vision_start_token_id": 292, "vision_end_token_id": 293}


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A Qwen2.5-VL (7B-shaped or tiny) with random weights, built directly on `device`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision, ids = (_TINY_TEXT, _TINY_VISION, _TINY_IDS) if tiny else (_7B_TEXT, _7B_VISION, _7B_IDS)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly: ~8B random weights in seconds
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def make_inputs(model: Any, batch: int, frames: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A window batch as the Qwen processor would give it: frames of size x size pixels."""
    cfg = model.config
    vc = cfg.vision_config
    side = size // vc.patch_size
    side -= side % vc.spatial_merge_size
    per_image = side * side
    tokens = per_image // vc.spatial_merge_size**2
    prompt: list[int] = [10, 11, 12, 13]
    for _ in range(frames):
        prompt += [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens + [cfg.vision_end_token_id]
    prompt += list(range(20, 44))  # the question
    input_ids = torch.tensor([prompt] * batch, device=device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixel_values = torch.randn(batch * frames * per_image, patch_dim, generator=gen).to(device, model.dtype)
    grid = torch.tensor([[1, side, side]] * (batch * frames), device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values, "image_grid_thw": grid}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, *, static: bool, repeats: int, device: torch.device) -> float:
    """Median seconds of one `generate()` call, after one warm-up (which also compiles)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
        "pad_token_id": model.config.text_config.pad_token_id,
    }
    if static:
        kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = device.type != "cuda"
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(**inputs, **kwargs)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
            if out.shape[1] - inputs["input_ids"].shape[1] != new_tokens:
                raise RuntimeError(f"generated {out.shape[1] - inputs['input_ids'].shape[1]} tokens, expected {new_tokens}")
    times.sort()
    return times[len(times) // 2]


def time_vision(visual: Any, inputs: dict[str, torch.Tensor], *, repeats: int, device: torch.device) -> float:
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def time_shared_prefix(model: Any, frames: int, size: int, new_tokens: int, *, queries: int, repeats: int,
                       device: torch.device) -> dict[str, Any]:
    """`queries` queries of one window: the shared visual prefix (`streamvg.grounding.prefix`,
    prefill once, each query on a copy of the KV cache) against one full prompt per query in
    one batch (the plain path), both from the same precomputed visual tokens. Median seconds
    of each, prefill tokens of each, and whether they generated the same tokens."""
    from types import SimpleNamespace

    from streamvg.grounding.cache import CacheEntry
    from streamvg.grounding.prefix import generate_shared
    from streamvg.grounding.vision import HFVisionEncoder, split_tokens

    cfg = model.config
    one = make_inputs(model, 1, frames, size, device)
    grid = one["image_grid_thw"]
    with torch.inference_mode():
        tokens = HFVisionEncoder(model).encode(one["pixel_values"], grid)
    entries = [CacheEntry(t, (int(g[0]), int(g[1]), int(g[2])))
               for t, g in zip(split_tokens(tokens, grid.cpu(), cfg.vision_config.spatial_merge_size), grid.tolist(), strict=True)]
    prefix = one["input_ids"][0, :-24].tolist()
    rows = [prefix + [20 + q + k for k in range(24 + q)] for q in range(queries)]  # a different question each
    pad = int(cfg.text_config.pad_token_id)
    eos = int(cfg.text_config.eos_token_id)
    width = max(len(r) for r in rows)
    ids = torch.full((queries, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    plain_inputs = {
        "input_ids": ids.to(device), "attention_mask": mask.to(device),
        "mm_token_type_ids": (ids == cfg.image_token_id).to(torch.int32).to(device),
        "image_grid_thw": grid.repeat(queries, 1),
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=tuple(e.tokens for e in entries) * queries)},
    }
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad}
    shim = SimpleNamespace(
        model=model, pad_id=pad, image_token_id=int(cfg.image_token_id), device=device, eos_ids=[eos],
        tokenizer=SimpleNamespace(convert_tokens_to_ids=lambda _t: int(cfg.vision_end_token_id)),
    )

    def timed(fn: Any) -> tuple[float, torch.Tensor]:
        times, out = [], None
        with torch.inference_mode():
            for i in range(repeats + 1):
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
        times.sort()
        assert out is not None
        return times[len(times) // 2], out

    plain_s, plain_out = timed(lambda: model.generate(**plain_inputs, **kwargs))
    shared_s, shared = timed(lambda: generate_shared(shim, plain_inputs, kwargs, rows, [entries] * queries))
    assert shared is not None
    shared_seq = shared.sequences if not isinstance(shared, torch.Tensor) else shared
    return {
        "queries": queries, "frames": frames,
        "plain_s": round(plain_s, 4), "shared_s": round(shared_s, 4), "speedup": round(plain_s / shared_s, 3),
        "prefill_tokens_plain": sum(len(r) for r in rows), "prefill_tokens_shared": sum(shared.prefill_tokens),
        "same_tokens": bool(torch.equal(plain_out[:, width:].cpu(), shared_seq[:, width:].cpu())),
    }


def export_tower(model: Any, out_dir: Path, *, max_pixels: int, max_images: int, precision: str, attention: str = "windowed") -> Path:
    """Save the vision tower (config + weights) and export it with `streamvg engine export`'s code."""
    from safetensors.torch import save_file

    from streamvg.grounding.onnx_export import export_vision_onnx

    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(model_dir)
    state = {f"model.visual.{k}": v.detach().to("cpu").contiguous() for k, v in model.model.visual.state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"))
    engine_dir = out_dir / "engine"
    export_vision_onnx(model_dir, engine_dir, max_pixels=max_pixels, max_images=max_images, precision=precision, attention=attention)
    return engine_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny config, few tokens: checks the script runs.")
    ap.add_argument("--tiny", action="store_true", help="Tiny config instead of 7B dims (implied by --dry-run).")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu.")
    ap.add_argument("--batches", default="1,8", help="Comma-separated window batch sizes.")
    ap.add_argument("--frames", type=int, default=4, help="Frames per window.")
    ap.add_argument("--size", type=int, default=448, help="Frame side in pixels (square frames).")
    ap.add_argument("--new-tokens", type=int, default=32, help="Tokens generated per window (fixed).")
    ap.add_argument("--repeats", type=int, default=3, help="Timed calls per case (median reported).")
    ap.add_argument("--no-compile", action="store_true", help="Skip the static-cache + torch.compile path.")
    ap.add_argument("--trt", action="store_true", help="Also export + build the TensorRT vision encoder (minutes).")
    ap.add_argument("--trt-precision", default="bf16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--vision-attention", default="windowed", choices=["windowed", "dense"],
                    help="Attention of the exported vision graph (dense: the old N x N graph, for comparison).")
    ap.add_argument("--attn", default="sdpa,flash_attention_2,eager",
                    help="Attention kernels timed on the eager path (flash_attention_2 only where flash-attn is installed).")
    ap.add_argument("--work-dir", default=None, help="Where engines are written (default: a temp dir).")
    ap.add_argument("--time-budget-s", type=float, default=450.0, help="Skip cases that start after this many seconds.")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    tiny = args.tiny or args.dry_run
    if args.dry_run:
        args.new_tokens = min(args.new_tokens, 4)
        args.repeats = 1
        args.size = min(args.size, 112)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    import transformers

    report: dict[str, Any] = {
        "benchmark": "engine_gpu",
        "model": "qwen2.5-vl tiny (random)" if tiny else "qwen2.5-vl-7b-shaped (random weights)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "frames_per_window": args.frames,
        "frame_size": [args.size, args.size],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "results": [],
        "skipped": {},
        "errors": {},
    }
    t0 = time.perf_counter()
    model = build_model(tiny, device, dtype)
    report["model_init_s"] = round(time.perf_counter() - t0, 2)

    def over_budget() -> bool:
        return time.perf_counter() - started > args.time_budget_s

    def record(path: str, batch: int, latency: float, vision: float) -> None:
        report["results"].append({
            "path": path, "batch": batch,
            "compiled": not path.startswith("hf_eager_bf16") and device.type == "cuda" and not args.no_compile,
            "latency_s": round(latency, 4),
            "windows_per_s": round(batch / latency, 3), "vision_s": round(vision, 4),
        })

    paths: list[tuple[str, bool]] = [("hf_eager_bf16", False)]
    if args.no_compile:
        report["skipped"]["hf_static_compile"] = "--no-compile"
    else:
        paths.append(("hf_static_compile", True))
    for path, static in paths:
        for batch in batches:
            if over_budget():
                report["skipped"][f"{path}@{batch}"] = "time budget"
                continue
            try:
                inputs = make_inputs(model, batch, args.frames, args.size, device)
                vision = time_vision(model.model.visual, inputs, repeats=args.repeats, device=device)
                latency = time_generate(model, inputs, args.new_tokens, static=static, repeats=args.repeats, device=device)
            except Exception as exc:  # report and go on: one failing path must not lose the others
                report["errors"][f"{path}@{batch}"] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            record(path, batch, latency, vision)

    # Q = 4 standing queries of one window: shared visual prefix vs one prompt per query (issue 18).
    if over_budget():
        report["skipped"]["shared_prefix_q4"] = "time budget"
    else:
        try:
            report["shared_prefix_q4"] = time_shared_prefix(
                model, args.frames, args.size, args.new_tokens, queries=4, repeats=args.repeats, device=device
            )
        except Exception as exc:
            report["errors"]["shared_prefix_q4"] = f"{type(exc).__name__}: {exc}"[:500]
    # Other attention kernels on the eager path (Qwen2.5-VL's windowed vision attention is one
    # varlen call with flash_attention_2, a Python loop over windows with sdpa/eager).
    import importlib.util

    for kernel in [k for k in args.attn.split(",") if k and k != "sdpa"]:
        name = f"hf_eager_bf16[{kernel}]"
        if kernel == "flash_attention_2" and (importlib.util.find_spec("flash_attn") is None or device.type != "cuda"):
            report["skipped"][name] = "flash-attn not installed" if device.type == "cuda" else "no GPU"
            continue
        try:
            model.set_attn_implementation(kernel)
        except Exception as exc:
            report["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
            continue
        try:
            for batch in batches:
                if over_budget():
                    report["skipped"][f"{name}@{batch}"] = "time budget"
                    continue
                try:
                    inputs = make_inputs(model, batch, args.frames, args.size, device)
                    vision = time_vision(model.model.visual, inputs, repeats=args.repeats, device=device)
                    latency = time_generate(model, inputs, args.new_tokens, static=False, repeats=args.repeats, device=device)
                except Exception as exc:
                    report["errors"][f"{name}@{batch}"] = f"{type(exc).__name__}: {exc}"[:500]
                    continue
                record(name, batch, latency, vision)
        finally:
            model.set_attn_implementation("sdpa")

    # The exported vision encoder in place of the model's tower: TensorRT on GPU, ONNX Runtime in the dry run.
    encoder_path = None
    if args.trt:
        try:
            import tensorrt  # noqa: F401

            encoder_path = "trt_vision" if device.type == "cuda" else None
            if encoder_path is None:
                report["skipped"]["trt_vision"] = "no GPU"
        except ImportError:
            report["skipped"]["trt_vision"] = "tensorrt not installed (pip install 'streamvg[trt]')"
    elif args.dry_run:
        encoder_path = "ort_vision"
    else:
        report["skipped"]["trt_vision"] = "not requested (--trt)"
    if encoder_path and not over_budget():
        from streamvg.grounding.trt import (
            OnnxRuntimeVisionEncoder,
            TensorRTVisionEncoder,
            attach_vision_encoder,
            build_engine,
        )

        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir or tmp)
            t0 = time.perf_counter()
            engine_dir = export_tower(model, work, max_pixels=args.size * args.size, max_images=args.frames, precision=args.trt_precision,
                                      attention=args.vision_attention)
            report["vision_attention"] = args.vision_attention
            report["export_s"] = round(time.perf_counter() - t0, 2)
            if encoder_path == "trt_vision":
                t0 = time.perf_counter()
                build_engine(engine_dir)
                report["trt_build_s"] = round(time.perf_counter() - t0, 2)
                encoder: Any = TensorRTVisionEncoder(engine_dir, device=device, dtype=dtype)
            else:
                encoder = OnnxRuntimeVisionEncoder(engine_dir, dtype=dtype)
            original = attach_vision_encoder(model, encoder)
            try:
                for batch in batches:
                    if over_budget():
                        report["skipped"][f"{encoder_path}@{batch}"] = "time budget"
                        continue
                    try:
                        inputs = make_inputs(model, batch, args.frames, args.size, device)
                        vision = time_vision(model.model.visual, inputs, repeats=args.repeats, device=device)
                        latency = time_generate(model, inputs, args.new_tokens, static=not args.no_compile, repeats=args.repeats, device=device)
                    except Exception as exc:
                        report["errors"][f"{encoder_path}@{batch}"] = f"{type(exc).__name__}: {exc}"[:500]
                        continue
                    record(encoder_path, batch, latency, vision)
            finally:
                model.model.visual = original
                encoder.close()

    base = {r["batch"]: r for r in report["results"] if r["path"] == "hf_eager_bf16"}
    report["speedup_vs_hf_eager"] = {
        f"{r['path']}@{r['batch']}": {
            "windows_per_s": round(r["windows_per_s"] / base[r["batch"]]["windows_per_s"], 3),
            "vision": round(base[r["batch"]]["vision_s"] / r["vision_s"], 3) if r["vision_s"] else None,
        }
        for r in report["results"]
        if r["path"] != "hf_eager_bf16" and r["batch"] in base
    }
    report["wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
