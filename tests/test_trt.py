"""TensorRT engine: build / runtime errors on a machine without TensorRT or a GPU, the plan
cache key, the encoder swap inside `generate()`, and the GPU benchmark's CPU dry run.

On a machine with `tensorrt` and a GPU, `test_build_or_clear_error` builds the tiny engine for
real and checks the TensorRT encoder against ONNX Runtime instead of checking the error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_onnx_export import save_tiny_model

from streamvg.config import EngineConfig
from streamvg.errors import ConfigError, EngineUnavailableError
from streamvg.grounding.onnx_export import VisionSpec, export_vision_onnx, read_build_config
from streamvg.grounding.trt import (
    OnnxRuntimeVisionEncoder,
    VisualAdapter,
    attach_vision_encoder,
    build_engine,
    create_trt_engine,
    engine_cache_key,
    find_plan,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trt")
    model_dir = save_tiny_model("qwen2_5_vl", root / "model")
    out = root / "engine"
    export_vision_onnx(model_dir, out, max_pixels=224 * 224, max_images=2)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "streamvg", *args], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_build_or_clear_error(engine_dir: Path) -> None:
    proc = _cli("engine", "build", str(engine_dir))
    if HAS_TRT and HAS_GPU:  # a GPU machine: the build is real
        assert proc.returncode == 0, proc.stderr
        from streamvg.grounding.trt import TensorRTVisionEncoder

        cfg = read_build_config(engine_dir)
        spec = VisionSpec.from_dict(cfg["vision"])
        grid = torch.tensor([[1, 16, 16], [1, 8, 12]])
        pixels = torch.randn(int(grid.prod(-1).sum()), spec.patch_dim)
        ref = OnnxRuntimeVisionEncoder(engine_dir).encode(pixels, grid)
        out = TensorRTVisionEncoder(engine_dir).encode(pixels, grid).float().cpu()
        assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
        return
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one sentence, no traceback
    assert "Traceback" not in proc.stderr
    if not HAS_TRT:
        assert "`tensorrt` Python package" in lines[0] and "pip install 'streamvg[trt]'" in lines[0]
    else:
        assert "needs an NVIDIA GPU" in lines[0]


def test_build_checks_the_folder_first(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no build_config\.json; run `streamvg engine export"):
        build_engine(tmp_path)
    proc = _cli("engine", "build", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "no build_config.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="checks the message shown where TensorRT cannot run")
def test_gemvg_trt_without_tensorrt_explains_what_to_install(engine_dir: Path) -> None:
    cfg = EngineConfig(kind="gemvg-trt", model="/models/gem-vg-7b", engine_dir=str(engine_dir))
    with pytest.raises(EngineUnavailableError) as info:
        create_trt_engine(cfg)
    msg = str(info.value)
    assert "engine kind 'gemvg-trt'" in msg and len(msg.splitlines()) == 1
    assert ("pip install 'streamvg[trt]'" in msg and "engine kind 'gemvg'" in msg) if not HAS_TRT else ("NVIDIA GPU" in msg)
    try:
        from streamvg.grounding import create_engine  # the lead's factory, when present
    except ImportError:
        return
    with pytest.raises(EngineUnavailableError, match="gemvg-trt"):
        create_engine(cfg)


def test_cache_key_tracks_everything_a_plan_depends_on(engine_dir: Path) -> None:
    cfg = read_build_config(engine_dir)
    base = engine_cache_key(cfg, trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    assert base == engine_cache_key(dict(cfg), trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    assert base != engine_cache_key(cfg, trt_version="10.4.0", gpu_name="NVIDIA H100 80GB HBM3")
    assert base != engine_cache_key(cfg, trt_version="10.3.0", gpu_name="NVIDIA L4")
    assert base != engine_cache_key({**cfg, "model_hash": "0" * 64}, trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    assert base != engine_cache_key({**cfg, "precision": "fp16"}, trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    plan = find_plan(engine_dir, cfg, trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    assert plan.parent == engine_dir and plan.name == f"vision-{base}.plan"


def test_encoder_swap_inside_generate(tmp_path: Path) -> None:
    """The exported encoder replaces `model.visual` and generate() gives the same tokens."""
    from transformers import AutoModelForImageTextToText

    model_dir = save_tiny_model("qwen2_5_vl", tmp_path / "m")
    out = tmp_path / "e"
    export_vision_onnx(model_dir, out, max_pixels=112 * 112, max_images=2)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    grid = torch.tensor([[1, 8, 8], [1, 8, 8], [1, 8, 8]])  # three frames: two encoder chunks
    ids = [5, 6]
    for _ in range(3):
        ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * 16 + [cfg.vision_end_token_id]
    inputs = {
        "input_ids": torch.tensor([[*ids, 7, 8]]),
        "pixel_values": torch.randn(192, 1176),
        "image_grid_thw": grid,
    }
    gen = {"max_new_tokens": 6, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)
        encoder = OnnxRuntimeVisionEncoder(out)
        original = attach_vision_encoder(model, encoder)
        assert isinstance(model.model.visual, VisualAdapter)
        swapped = model.generate(**inputs, **gen)
        model.model.visual = original
    assert len(encoder._host_cache) == 2  # the encoder really ran, in two chunks (3 frames, 2 per call)
    assert torch.equal(ref.sequences, swapped.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ref.scores, swapped.scores, strict=True)) < 1e-3


def test_benchmark_dry_run() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine_gpu.py"), "--dry-run"],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    got = {(r["path"], r["batch"]) for r in report["results"]}
    paths = ("hf_eager_bf16", "hf_static_compile", "hf_eager_bf16[eager]", "ort_vision")
    assert got == {(p, b) for p in paths for b in (1, 8)}
    assert all(r["windows_per_s"] > 0 and r["latency_s"] > 0 for r in report["results"])
    assert set(report["speedup_vs_hf_eager"]) == {f"{p}@{b}" for p in paths[1:] for b in (1, 8)}
    assert report["errors"] == {} and report["skipped"] == {"hf_eager_bf16[flash_attention_2]": "no GPU"}
    assert report["vision_attention"] == "windowed"
    assert report["new_tokens"] == 4 and report["frames_per_window"] == 4
