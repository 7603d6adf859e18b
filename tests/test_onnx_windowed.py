"""The windowed ONNX vision graph at Qwen2.5-VL-7B's vision geometry: window 112 px, full-attention
blocks between windowed ones, head_dim 80; parity with the PyTorch tower on several grids, mixed
sizes in one call, and the load-time check that the pixel budget fits the engine's profiles.

Widths other than the head size are small (2 heads x 80) so the test runs in seconds; what the
graph's attention bookkeeping depends on (window, merge, head_dim, block layout) is the 7B's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_onnx_export import _IDS, _TEXT

from streamvg.errors import ConfigError
from streamvg.grounding.onnx_export import VisionSpec, export_vision_onnx, host_inputs
from streamvg.grounding.trt import OnnxRuntimeVisionEncoder

GEOMETRY_7B = {
    "depth": 4, "hidden_size": 160, "intermediate_size": 96, "num_heads": 2, "out_hidden_size": 32,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [1, 3], "hidden_act": "silu",
}


@pytest.fixture(scope="module")
def model_7b_geometry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=_TEXT, vision_config=GEOMETRY_7B, **_IDS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:
                p.normal_(0.0, 0.08) if p.ndim >= 2 else (p.uniform_(0.5, 1.5) if "norm" in name or "ln_q" in name else p.normal_(0.0, 0.1))
    out = tmp_path_factory.mktemp("vision7b") / "model"
    model.save_pretrained(out)
    return out, model.model.visual.eval()


@pytest.fixture(scope="module")
def engine_dir(model_7b_geometry: tuple[Path, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine7b")
    cfg = export_vision_onnx(model_7b_geometry[0], out, max_pixels=448 * 448, max_images=4)
    assert cfg["attention"] == "windowed" and cfg["vision"]["head_dim"] == 80 and cfg["vision"]["window_size"] == 112
    return out


@pytest.mark.parametrize(
    "grid",
    [
        [[1, 16, 16]],  # 224x224: exactly 2x2 windows of 8x8 patches
        [[1, 20, 28]],  # 280x392: partial windows at the right and bottom edges
        [[1, 32, 32], [1, 12, 8], [1, 22, 18]],  # mixed sizes in one call (448x448, 168x112, 308x252)
        [[2, 10, 14]],  # two temporal patches
    ],
    ids=["224x224", "280x392", "mixed-3", "t2"],
)
def test_windowed_graph_matches_pytorch_at_7b_geometry(model_7b_geometry: tuple[Path, torch.nn.Module], engine_dir: Path, grid: list[list[int]]) -> None:
    _, visual = model_7b_geometry
    g = torch.tensor(grid)
    spec = VisionSpec.from_dict(OnnxRuntimeVisionEncoder(engine_dir).build_config["vision"])
    torch.manual_seed(2)
    pixels = torch.randn(int(g.prod(-1).sum()), spec.patch_dim)
    with torch.no_grad():
        ref = visual(pixels, grid_thw=g).pooler_output
    out = OnnxRuntimeVisionEncoder(engine_dir).encode(pixels, g)
    assert ref.abs().max() > 0.3  # large enough for a wrong window layout to show
    assert out.shape == ref.shape and (out - ref).abs().max().item() <= 1e-4
    host = host_inputs(g, spec)
    assert host.window_gather is not None and host.window_gather.shape[1] == 64  # a 112 px window is 8x8 patches
    assert host.image_gather is not None and host.image_gather.shape[0] == int(g[:, 0].sum())


def test_max_pixels_beyond_the_profiles_is_refused_at_load(engine_dir: Path, tiny_models: dict[str, Path]) -> None:
    from streamvg.grounding.hf import GemVGEngine

    encoder = OnnxRuntimeVisionEncoder(engine_dir)
    encoder.check_max_pixels(448 * 448)  # what it was exported for
    with pytest.raises(ConfigError, match=r"engine.max_pixels \(12845056\).*exported for max_pixels 200704") as info:
        encoder.check_max_pixels(12845056)  # Qwen2.5-VL's own default
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="re-export with --max-pixels"):  # before any weights load
        GemVGEngine(tiny_models["qwen2_5_vl"], device="cpu", max_pixels=1024 * 1024, vision_encoder=encoder)
