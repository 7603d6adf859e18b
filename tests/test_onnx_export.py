"""ONNX export of the GeM-VG vision encoder: the exported graph + host-side inputs reproduce
`model.visual(...)` of the model loaded through `from_pretrained`, for several image sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamvg.cli import main
from streamvg.errors import ConfigError, ModelLoadError
from streamvg.grounding.onnx_export import (
    BUILD_CONFIG_NAME,
    ONNX_NAME,
    VisionSpec,
    export_vision_onnx,
    host_inputs,
    model_hash,
    read_build_config,
)
from streamvg.grounding.trt import OnnxRuntimeVisionEncoder

_TEXT = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 1024,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
_IDS = {"image_token_id": 290, "video_token_id": 291, "vision_start_token_id": 292, "vision_end_token_id": 293}


def save_tiny_model(family: str, out: Path, *, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL / Qwen2-VL with random weights (std 0.2, so errors show), saved to `out`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    model: torch.nn.Module
    if family == "qwen2_5_vl":
        vision = {
            "depth": 3, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 32,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [1],
        }
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=_TEXT, vision_config=vision, **_IDS))
    else:
        vision = {
            "depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        }
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=_TEXT, vision_config=vision, **_IDS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name and p.ndim >= 2:
                p.normal_(0.0, 0.2)
            elif "visual" in name:
                p.uniform_(0.5, 1.5) if "norm" in name or "ln_q" in name else p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_tiny_model(request.param, root / "model")
    engine_dir = root / "engine"
    cfg = export_vision_onnx(model_dir, engine_dir, max_pixels=224 * 224, max_images=2, precision="fp16")
    return model_dir, engine_dir, cfg


def _reference(model_dir: Path, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model.model.visual(pixel_values, grid_thw=grid).pooler_output


@pytest.mark.parametrize(
    "grid",
    [
        [[1, 8, 8]],  # 112x112
        [[1, 12, 16]],  # 168x224
        [[1, 16, 16], [1, 8, 12], [1, 16, 12]],  # a window of frames of mixed sizes, two chunks
        [[2, 8, 12]],  # two temporal patches
    ],
    ids=["112x112", "168x224", "mixed-3-images", "t2"],
)
def test_onnxruntime_matches_pytorch(exported: tuple[Path, Path, dict], grid: list[list[int]]) -> None:
    model_dir, engine_dir, cfg = exported
    g = torch.tensor(grid)
    spec = VisionSpec.from_dict(cfg["vision"])
    torch.manual_seed(1)
    pixel_values = torch.randn(int(g.prod(-1).sum()), spec.patch_dim)
    ref = _reference(model_dir, pixel_values, g)
    encoder = OnnxRuntimeVisionEncoder(engine_dir)
    out = encoder.encode(pixel_values, g)
    assert out.shape == ref.shape == (int(g.prod(-1).sum()) // 4, spec.out_hidden_size)
    assert ref.abs().max() > 0.5  # the weights are large enough for a wrong graph to show
    assert (out - ref).abs().max().item() <= 1e-4


def test_wrong_grid_is_detected(exported: tuple[Path, Path, dict]) -> None:
    """Negative control: host inputs for a transposed grid give a clearly different answer."""
    model_dir, engine_dir, cfg = exported
    spec = VisionSpec.from_dict(cfg["vision"])
    pixel_values = torch.randn(12 * 16, spec.patch_dim)
    ref = _reference(model_dir, pixel_values, torch.tensor([[1, 12, 16]]))
    wrong = OnnxRuntimeVisionEncoder(engine_dir).encode(pixel_values, torch.tensor([[1, 16, 12]]))
    assert (wrong - ref).abs().max().item() > 1e-2


def test_build_config_written(exported: tuple[Path, Path, dict]) -> None:
    model_dir, engine_dir, cfg = exported
    assert (engine_dir / ONNX_NAME).is_file()
    on_disk = json.loads((engine_dir / BUILD_CONFIG_NAME).read_text())
    assert on_disk == read_build_config(engine_dir) == cfg
    assert cfg["opset"] == 17 and cfg["precision"] == "fp16"
    assert cfg["model_hash"] == model_hash(model_dir)
    # 224x224 at 14 px patches = 256 patches per frame; two frames per call at most.
    assert cfg["profiles"] == [
        {"min_patches": 4, "opt_patches": 256, "max_patches": 256},
        {"min_patches": 4, "opt_patches": 512, "max_patches": 512},
    ]
    assert cfg["pixels"] == {"min_pixels": 56 * 56, "max_pixels": 224 * 224, "max_images": 2}


def test_model_hash_follows_the_weights(tmp_path: Path) -> None:
    a = save_tiny_model("qwen2_5_vl", tmp_path / "a", seed=0)
    b = save_tiny_model("qwen2_5_vl", tmp_path / "b", seed=1)
    assert model_hash(a) == model_hash(a)
    assert model_hash(a) != model_hash(b)


def test_encoder_rejects_bad_inputs(exported: tuple[Path, Path, dict]) -> None:
    _, engine_dir, cfg = exported
    spec = VisionSpec.from_dict(cfg["vision"])
    encoder = OnnxRuntimeVisionEncoder(engine_dir)
    with pytest.raises(ConfigError, match="pixel_values has shape"):
        encoder.encode(torch.zeros(10, spec.patch_dim), torch.tensor([[1, 8, 8]]))
    with pytest.raises(ConfigError, match="built for at most 512"):
        encoder.encode(torch.zeros(32 * 32, spec.patch_dim), torch.tensor([[1, 32, 32]]))


def test_host_inputs_window_layout() -> None:
    """Qwen2.5-VL windows: a 8x8 patch grid with 56 px windows has 4 windows of 16 patches."""
    spec = VisionSpec(
        family="qwen2_5_vl", patch_size=14, temporal_patch_size=2, in_channels=3, spatial_merge_size=2,
        num_heads=2, head_dim=16, depth=2, embed_dim=32, out_hidden_size=32, rope_theta=10000.0,
        window_size=56, fullatt_block_indexes=(1,),
    )
    h = host_inputs(torch.tensor([[1, 8, 8], [1, 4, 4]]), spec)
    assert h.num_patches == 80
    assert torch.bincount(h.window_segments).tolist() == [16, 16, 16, 16, 16]
    assert torch.bincount(h.full_segments).tolist() == [64, 16]
    assert sorted(h.window_index.tolist()) == list(range(20))
    assert torch.equal(h.window_index[h.reverse_index], torch.arange(20))


def test_cli_export_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_tiny_model("qwen2_vl", tmp_path / "m")
    assert main(["engine", "export", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model_type"] == "qwen2_vl" and (tmp_path / "e" / ONNX_NAME).is_file()
    assert main(["engine", "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0]
    with pytest.raises(ConfigError, match="precision"):
        export_vision_onnx(model_dir, tmp_path / "e3", precision="int3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        export_vision_onnx(tmp_path / "empty", tmp_path / "e4")


def test_external_data_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Big towers (7B: ~2.7 GB fp32) keep weights in vision.onnx.data; the encoder still loads it."""
    import streamvg.grounding.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    model_dir = save_tiny_model("qwen2_5_vl", tmp_path / "m")
    export_vision_onnx(model_dir, tmp_path / "e", max_pixels=112 * 112)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [BUILD_CONFIG_NAME, ONNX_NAME, ONNX_NAME + ".data"]
    grid = torch.tensor([[1, 8, 8]])
    pixel_values = torch.randn(64, 1176)
    out = OnnxRuntimeVisionEncoder(tmp_path / "e").encode(pixel_values, grid)
    assert (out - _reference(model_dir, pixel_values, grid)).abs().max().item() <= 1e-4
