"""Export a GeM-VG vision encoder (Qwen2-VL / Qwen2.5-VL ViT + patch merger) to ONNX.

Why a wrapper and host-side inputs: the Hugging Face vision tower derives its rotary
positions, its window-attention permutation (Qwen2.5-VL) and its attention segments
(`cu_seqlens`) from `grid_thw` with Python loops, `.tolist()` and data-dependent shapes,
none of which an ONNX graph (or a TensorRT engine) can hold. So the graph exported here
takes those tensors *as inputs*, computed on the host from `grid_thw` by `host_inputs()`:

| input            | shape        | what                                                     |
| ---------------- | ------------ | -------------------------------------------------------- |
| `pixel_patches`  | (N, C·T·P·P) | flattened patches, as the Qwen image processor gives them |
| `rope_cos/sin`   | (N, head_dim)| rotary tables, already in window order                    |
| `window_index`   | (N/m²,)      | merge-block order for windowed attention (identity for Qwen2-VL) |
| `reverse_index`  | (N/m²,)      | its inverse, applied to the merged tokens                  |
| `full_segments`  | (N,)         | image id of each patch (full-attention layers)            |
| `window_segments`| (N,)         | window id of each patch (windowed layers)                 |

and returns `vision_tokens` (N/m², out_hidden): the merged visual tokens, the same tensor
as `model.visual(pixel_values, grid_thw).pooler_output`. The default graph (`windowed`) also
takes `window_gather/bias/scatter` and `image_gather/bias/scatter` (see `HostInputs`): each
windowed layer attends within the windows gathered into a batch dimension (W × L² scores,
L = the window's patch count), each full-attention layer within each image gathered the
same way, so memory grows with the window and the image, not with N² over all frames of a
call. The `dense` graph (one N×N block-diagonal mask from the segment ids, `Equal` +
`Where`) is kept as the benchmark's baseline. Neither has control flow.

`TensorRTVisionEncoder` and `OnnxRuntimeVisionEncoder` (streamvg.grounding.trt) run
`host_inputs()` and feed the graph, so the host code tested on CPU is the one used on GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from streamvg.errors import ConfigError, ModelLoadError

__all__ = [
    "BUILD_CONFIG_NAME",
    "INPUT_NAMES",
    "ONNX_NAME",
    "OUTPUT_NAME",
    "WINDOWED_INPUTS",
    "HostInputs",
    "VisionExportWrapper",
    "VisionSpec",
    "export_vision_onnx",
    "host_inputs",
    "load_vision_tower",
    "model_hash",
    "patch_profiles",
    "patches_for_pixels",
    "profile_shapes",
    "read_build_config",
]

log = logging.getLogger(__name__)

ONNX_NAME = "vision.onnx"
BUILD_CONFIG_NAME = "build_config.json"
BUILD_CONFIG_SCHEMA = "streamvg.engine-build/v1"
INPUT_NAMES = (
    "pixel_patches",
    "rope_cos",
    "rope_sin",
    "window_index",
    "reverse_index",
    "full_segments",
    "window_segments",
)
OUTPUT_NAME = "vision_tokens"
# Inputs of the windowed graph (attention batched per segment); the dense graph has none of them.
WINDOWED_INPUTS = ("window_gather", "window_bias", "window_scatter", "image_gather", "image_bias", "image_scatter")
ATTENTION_KINDS = ("windowed", "dense")
# Inputs whose first axis is the patch count N; the others are indexed by merged token (N/m²).
PATCH_AXIS_INPUTS = ("pixel_patches", "rope_cos", "rope_sin", "full_segments", "window_segments")
MERGED_AXIS_INPUTS = ("window_index", "reverse_index")
DEFAULT_OPSET = 17
# Graphs larger than this keep their weights in vision.onnx.data (protobuf caps a file at 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000
_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class VisionSpec:
    """The vision-tower numbers the host-side preprocessing and the engine build need.

    Stored in the build config, so an engine folder is self-contained: the runtime never
    has to load the PyTorch model to prepare inputs.
    """

    family: str  # "qwen2_vl" | "qwen2_5_vl"
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    num_heads: int
    head_dim: int
    depth: int
    embed_dim: int
    out_hidden_size: int
    rope_theta: float
    window_size: int  # pixels; 0 = no windowed attention (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...]

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch row (C·T·P·P)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one visual token (m²)."""
        return self.spatial_merge_size**2

    @classmethod
    def from_config(cls, config: Any) -> VisionSpec:
        """Read a Qwen2-VL / Qwen2.5-VL model config (the full model's, with `vision_config`)."""
        family = str(getattr(config, "model_type", ""))
        if family not in _FAMILIES:
            raise ModelLoadError(
                f"model_type {family!r} is not a Qwen2-VL / Qwen2.5-VL model; the vision export supports {', '.join(_FAMILIES)}"
            )
        vc = config.vision_config
        embed_dim = int(vc.embed_dim if family == "qwen2_vl" else vc.hidden_size)
        out_hidden = int(vc.hidden_size if family == "qwen2_vl" else vc.out_hidden_size)
        rope = getattr(vc, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", 10000.0)) if isinstance(rope, dict) else 10000.0
        if family == "qwen2_5_vl":
            window = int(vc.window_size)
            full = tuple(int(i) for i in vc.fullatt_block_indexes)
        else:
            window = 0
            full = tuple(range(int(vc.depth)))
        return cls(
            family=family,
            patch_size=int(vc.patch_size),
            temporal_patch_size=int(vc.temporal_patch_size),
            in_channels=int(vc.in_channels),
            spatial_merge_size=int(vc.spatial_merge_size),
            num_heads=int(vc.num_heads),
            head_dim=embed_dim // int(vc.num_heads),
            depth=int(vc.depth),
            embed_dim=embed_dim,
            out_hidden_size=out_hidden,
            rope_theta=theta,
            window_size=window,
            fullatt_block_indexes=full,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionSpec:
        """Inverse of `asdict` (as stored in build_config.json)."""
        data = dict(data)
        data["fullatt_block_indexes"] = tuple(data["fullatt_block_indexes"])
        return cls(**data)


@dataclass(frozen=True)
class HostInputs:
    """The graph's inputs derived from `grid_thw` on the host (all CPU tensors)."""

    rope_cos: torch.Tensor  # (N, head_dim) float32, window order
    rope_sin: torch.Tensor  # (N, head_dim) float32, window order
    window_index: torch.Tensor  # (N/m²,) int64
    reverse_index: torch.Tensor  # (N/m²,) int64
    full_segments: torch.Tensor  # (N,) int64, window order
    window_segments: torch.Tensor  # (N,) int64, window order
    # Windowed graph: each attention segment (a window, or an image for full attention) as a
    # row of a batch, padded to the longest; `*_bias` is 0 for real keys, -inf for padding;
    # `*_scatter` takes each patch back from the padded (rows·length) layout.
    window_gather: torch.Tensor | None = None  # (W, Lw) int64
    window_bias: torch.Tensor | None = None  # (W, Lw) float32
    window_scatter: torch.Tensor | None = None  # (N,) int64
    image_gather: torch.Tensor | None = None  # (I, Li) int64
    image_bias: torch.Tensor | None = None  # (I, Li) float32
    image_scatter: torch.Tensor | None = None  # (N,) int64

    @property
    def num_patches(self) -> int:
        return int(self.full_segments.shape[0])

    def as_dict(self) -> dict[str, torch.Tensor]:
        out = {
            "rope_cos": self.rope_cos,
            "rope_sin": self.rope_sin,
            "window_index": self.window_index,
            "reverse_index": self.reverse_index,
            "full_segments": self.full_segments,
            "window_segments": self.window_segments,
        }
        for name in WINDOWED_INPUTS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def _grid_list(grid_thw: torch.Tensor | Any) -> list[tuple[int, int, int]]:
    rows = torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def host_inputs(grid_thw: torch.Tensor | Any, spec: VisionSpec) -> HostInputs:
    """Compute the rotary tables, window permutation and attention segments for `grid_thw`.

    Mirrors `transformers.vision_utils` (`get_vision_position_ids`, `get_vision_window_index`,
    `get_vision_cu_seqlens`) and the vision rotary embedding, without model weights.

    Args:
        grid_thw: (num_images, 3) temporal, height, width patch grid per image.
        spec: the vision tower's numbers.

    Returns:
        `HostInputs` for N = sum(t·h·w) patches.
    """
    grids = _grid_list(grid_thw)
    m = spec.spatial_merge_size
    mu = spec.merge_unit
    pos_rows: list[torch.Tensor] = []
    full_seg: list[torch.Tensor] = []
    win_index: list[torch.Tensor] = []
    win_sizes: list[int] = []
    frame_id = 0
    token_offset = 0
    for t, h, w in grids:
        if h % m or w % m:
            raise ConfigError(f"grid_thw row ({t}, {h}, {w}) is not divisible by the merge size {m}; resize images to multiples of {m * spec.patch_size} pixels")
        hpos = torch.arange(h).unsqueeze(1).expand(h, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, w)
        shape = (h // m, m, w // m, m)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        pos_rows.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        full_seg.append(torch.arange(frame_id, frame_id + t).repeat_interleave(h * w))
        frame_id += t
        lh, lw = h // m, w // m
        if spec.window_size > 0:
            ws = spec.window_size // m // spec.patch_size
            index = torch.arange(t * lh * lw).reshape(t, lh, lw)
            pad_h = ws - lh % ws
            pad_w = ws - lw % ws
            nh, nw = (lh + pad_h) // ws, (lw + pad_w) // ws
            padded = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
            padded = padded.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
            sizes = (padded != -100).sum([2, 3]).reshape(-1)
            flat = padded.reshape(-1)
            win_index.append(flat[flat != -100] + token_offset)
            win_sizes.extend(int(s) * mu for s in sizes.tolist() if int(s) > 0)
        else:
            win_index.append(torch.arange(t * lh * lw) + token_offset)
            win_sizes.extend([h * w] * t)
        token_offset += t * lh * lw
    pos = torch.cat(pos_rows, dim=0)
    dim = spec.head_dim
    half = dim // 2
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    freqs = pos[..., None].float() * inv_freq  # (N, 2, dim/4)
    freq_hw = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([freq_hw, freq_hw], dim=-1)
    window_index = torch.cat(win_index).long()
    reverse_index = torch.argsort(window_index)

    def permute(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, mu, *x.shape[1:])[window_index].reshape(x.shape)

    window_segments = torch.repeat_interleave(torch.arange(len(win_sizes)), torch.tensor(win_sizes, dtype=torch.long))
    image_sizes = [h * w for t, h, w in grids for _ in range(t)]
    # Windows of one model pad to the same length (the window's full patch count), so the
    # window layers' shapes depend on the window, not on the image.
    ws_patches = (spec.window_size // spec.patch_size) ** 2 if spec.window_size > 0 else 0
    wg, wb, wsc = _segment_tables(win_sizes, max(ws_patches, max(win_sizes)))
    ig, ib, isc = _segment_tables(image_sizes, max(image_sizes))
    return HostInputs(
        rope_cos=permute(emb.cos()).contiguous(),
        rope_sin=permute(emb.sin()).contiguous(),
        window_index=window_index,
        reverse_index=reverse_index,
        full_segments=permute(torch.cat(full_seg).long()).contiguous(),
        window_segments=window_segments.long(),
        window_gather=wg, window_bias=wb, window_scatter=wsc,
        image_gather=ig, image_bias=ib, image_scatter=isc,
    )


def _segment_tables(sizes: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gather (S, L), bias (S, L), scatter (N,)) for consecutive segments of `sizes` patches padded to `length`."""
    n_seg = len(sizes)
    size = torch.tensor(sizes, dtype=torch.long)
    start = torch.cumsum(size, 0) - size
    col = torch.arange(length).unsqueeze(0)
    valid = col < size.unsqueeze(1)
    gather = torch.where(valid, start.unsqueeze(1) + col, torch.zeros((), dtype=torch.long))
    bias = torch.where(valid, 0.0, float("-inf")).to(torch.float32)
    seg = torch.repeat_interleave(torch.arange(n_seg), size)
    scatter = seg * length + (torch.arange(int(size.sum())) - start[seg])
    return gather.contiguous(), bias.contiguous(), scatter.contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionExportWrapper(nn.Module):
    """The vision tower as a graph over host-prepared inputs (see the module docstring).

    Reuses the tower's own modules (norms, MLPs, qkv/proj linears, patch merger), so weights
    and numerics are the model's; only the attention bookkeeping is rewritten as tensors.
    """

    def __init__(self, visual: nn.Module, spec: VisionSpec, attention: str = "windowed") -> None:
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention {attention!r} is not one of {', '.join(ATTENTION_KINDS)}", field="attention")
        self.attention = attention
        self.visual = visual
        self.spec = spec
        tower: Any = visual
        weight = tower.patch_embed.proj.weight  # (E, C, T, P, P), stride == kernel
        self.patch_weight = nn.Parameter(weight.detach().reshape(weight.shape[0], -1).clone(), requires_grad=False)
        self.full_layers = frozenset(spec.fullatt_block_indexes)

    def _attention(self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        heads, dim = self.spec.num_heads, self.spec.head_dim
        qkv = attn.qkv(x).reshape(-1, 3, heads, dim).permute(1, 2, 0, 3)  # (3, H, N, D)
        q, k, v = qkv[0].float(), qkv[1].float(), qkv[2]
        q = (q * cos + _rotate_half(q) * sin).to(v.dtype)
        k = (k * cos + _rotate_half(k) * sin).to(v.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (dim**-0.5) + bias
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).permute(1, 0, 2).reshape(-1, heads * dim)
        return attn.proj(out)

    def _batched_attention(
        self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        gather: torch.Tensor, bias: torch.Tensor, scatter: torch.Tensor,
    ) -> torch.Tensor:
        """Attention within segments gathered into a batch: (S, L) rows, cost S·L² not N²."""
        heads, dim = self.spec.num_heads, self.spec.head_dim
        rows, length = gather.shape[0], gather.shape[1]
        flat = gather.reshape(-1)
        qkv = attn.qkv(x.index_select(0, flat)).reshape(rows, length, 3, heads, dim).permute(2, 0, 3, 1, 4)  # (3, S, H, L, D)
        c = cos.index_select(0, flat).reshape(rows, 1, length, dim)
        s = sin.index_select(0, flat).reshape(rows, 1, length, dim)
        q, k, v = qkv[0].float(), qkv[1].float(), qkv[2]
        q = (q * c + _rotate_half(q) * s).to(v.dtype)
        k = (k * c + _rotate_half(k) * s).to(v.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * (dim**-0.5) + bias.reshape(rows, 1, 1, length)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(rows * length, heads * dim)
        return attn.proj(out.index_select(0, scatter))

    def forward(
        self,
        pixel_patches: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        window_index: torch.Tensor,
        reverse_index: torch.Tensor,
        full_segments: torch.Tensor,
        window_segments: torch.Tensor,
        window_gather: torch.Tensor | None = None,
        window_bias: torch.Tensor | None = None,
        window_scatter: torch.Tensor | None = None,
        image_gather: torch.Tensor | None = None,
        image_bias: torch.Tensor | None = None,
        image_scatter: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.attention == "windowed":
            if window_gather is None or window_bias is None or window_scatter is None or image_gather is None or image_bias is None or image_scatter is None:
                raise ValueError("the windowed graph needs the window_* and image_* inputs from host_inputs()")
            return self._forward_windowed(
                pixel_patches, rope_cos, rope_sin, window_index, reverse_index,
                window_gather, window_bias, window_scatter, image_gather, image_bias, image_scatter,
            )
        return self._forward_dense(pixel_patches, rope_cos, rope_sin, window_index, reverse_index, full_segments, window_segments)

    def _embed(self, pixel_patches: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        mu = self.spec.merge_unit
        x = torch.matmul(pixel_patches.to(self.patch_weight.dtype), self.patch_weight.t())
        return x.reshape(-1, mu, x.shape[-1]).index_select(0, window_index).reshape(-1, x.shape[-1])

    def _forward_windowed(
        self, pixel_patches: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
        window_index: torch.Tensor, reverse_index: torch.Tensor,
        window_gather: torch.Tensor, window_bias: torch.Tensor, window_scatter: torch.Tensor,
        image_gather: torch.Tensor, image_bias: torch.Tensor, image_scatter: torch.Tensor,
    ) -> torch.Tensor:
        x = self._embed(pixel_patches, window_index)
        cos, sin = rope_cos.float(), rope_sin.float()
        tower: Any = self.visual
        for i, blk in enumerate(tower.blocks):
            if i in self.full_layers:
                tables = (image_gather, image_bias, image_scatter)
            else:
                tables = (window_gather, window_bias, window_scatter)
            x = x + self._batched_attention(blk.attn, blk.norm1(x), cos, sin, *tables)
            x = x + blk.mlp(blk.norm2(x))
        merged = tower.merger(x)
        return merged.index_select(0, reverse_index)

    def _forward_dense(
        self,
        pixel_patches: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        window_index: torch.Tensor,
        reverse_index: torch.Tensor,
        full_segments: torch.Tensor,
        window_segments: torch.Tensor,
    ) -> torch.Tensor:
        x = self._embed(pixel_patches, window_index)
        # Additive block-diagonal masks: 0 inside an image (or window), -inf across.
        full_bias = torch.where(full_segments.unsqueeze(1) == full_segments.unsqueeze(0), 0.0, float("-inf"))
        if len(self.full_layers) < self.spec.depth:
            window_bias = torch.where(window_segments.unsqueeze(1) == window_segments.unsqueeze(0), 0.0, float("-inf"))
        else:
            window_bias = full_bias
        cos, sin = rope_cos.float(), rope_sin.float()
        tower: Any = self.visual
        for i, blk in enumerate(tower.blocks):
            bias = full_bias if i in self.full_layers else window_bias
            x = x + self._attention(blk.attn, blk.norm1(x), cos, sin, bias)
            x = x + blk.mlp(blk.norm2(x))
        merged = tower.merger(x)
        return merged.index_select(0, reverse_index)


def _vision_classes(family: str) -> type[nn.Module]:
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        return Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    return Qwen2VisionTransformerPretrainedModel


_VISUAL_PREFIXES = ("model.visual.", "visual.")


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"{model_dir}: no *.safetensors weights found; point --model at a saved GeM-VG model directory",
            model=str(model_dir),
        )
    return files


def load_vision_tower(model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, VisionSpec, str]:
    """Load only the vision tower's weights from a saved model directory (not the 7B LM).

    Returns:
        (visual module in eval mode, its `VisionSpec`, the model hash).

    Raises:
        ModelLoadError: the directory is not a saved Qwen2-VL / Qwen2.5-VL model.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json; --model must be a saved GeM-VG model directory", model=str(path))
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelLoadError(f"{path}: config.json could not be read ({exc})", model=str(path)) from exc
    spec = VisionSpec.from_config(config)
    vision_cfg = config.vision_config
    vision_cfg._attn_implementation = "eager"
    visual = _vision_classes(spec.family)(vision_cfg)
    state: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in sorted(f.keys()):
                for prefix in _VISUAL_PREFIXES:
                    if key.startswith(prefix):
                        tensor = f.get_tensor(key)
                        state[key[len(prefix):]] = tensor
                        digest.update(key.encode())
                        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
                        break
    if not state:
        raise ModelLoadError(f"{path}: the weights have no vision tower (keys 'model.visual.*' or 'visual.*')", model=str(path))
    missing, unexpected = visual.load_state_dict(state, strict=False)
    missing = [k for k in missing if "inv_freq" not in k]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: vision weights do not match the config (missing {missing[:3]}, unexpected {list(unexpected)[:3]}); the checkpoint is incomplete or of another model",
            model=str(path),
        )
    visual = visual.to(dtype).eval()
    return visual, spec, digest.hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """sha256 over config.json and the vision tower's tensors (what the engine is built from)."""
    return load_vision_tower(model_dir)[2]


def patches_for_pixels(pixels: int, spec: VisionSpec) -> int:
    """Largest patch count an image of at most `pixels` pixels yields (multiple of m²)."""
    n = pixels // (spec.patch_size**2)
    return max(spec.merge_unit, n - n % spec.merge_unit)


def patch_profiles(spec: VisionSpec, *, min_pixels: int, max_pixels: int, max_images: int) -> list[dict[str, int]]:
    """TensorRT optimisation profiles on the patch axis for the pixel budget in use.

    Profile 0 serves one frame per call (cache misses one at a time, the common live case);
    profile 1 serves up to `max_images` frames per call (a new window's frames together).
    """
    one = patches_for_pixels(max_pixels, spec)
    low = spec.merge_unit
    profiles = [{"min_patches": low, "opt_patches": one, "max_patches": one}]
    if max_images > 1:
        profiles.append({"min_patches": low, "opt_patches": one * max_images, "max_patches": one * max_images})
    del min_pixels  # smart_resize guarantees at least min_pixels; the min shape stays one token
    return profiles


def profile_shapes(spec: VisionSpec, profile: dict[str, int], max_image_patches: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every graph input for one optimisation profile of patch counts.

    Windowed inputs: windows pad to the model's window length (fixed), so only their count
    varies (1 .. max_patches/m²); images pad to the largest image of the call
    (m² .. `max_image_patches`), and there are 1 .. max_patches/m² of them.
    """
    mu = spec.merge_unit
    lo, opt, hi = (int(profile[k]) for k in ("min_patches", "opt_patches", "max_patches"))
    wl = (spec.window_size // spec.patch_size) ** 2 if spec.window_size > 0 else 0
    one = min(hi, max_image_patches)
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for name in (*PATCH_AXIS_INPUTS, "window_scatter", "image_scatter"):
        tail = (spec.patch_dim,) if name == "pixel_patches" else ((spec.head_dim,) if name.startswith("rope") else ())
        shapes[name] = ((lo, *tail), (opt, *tail), (hi, *tail))
    for name in MERGED_AXIS_INPUTS:
        shapes[name] = ((lo // mu,), (opt // mu,), (hi // mu,))
    images_opt = max(1, opt // max(one, 1))
    for name in ("image_gather", "image_bias"):
        shapes[name] = ((1, min(mu, one)), (images_opt, one), (max(1, hi // mu), one))
    if wl:
        for name in ("window_gather", "window_bias"):
            shapes[name] = ((1, wl), (max(1, opt // wl), wl), (max(1, hi // mu), wl))
    else:  # Qwen2-VL has no windowed layers; its window tables are the image tables
        for name in ("window_gather", "window_bias"):
            shapes[name] = shapes["image_gather"]
    return shapes


def _sample_grid(spec: VisionSpec) -> torch.Tensor:
    """A tracing example with two images and several windows, so nothing shape-specific folds."""
    m = spec.spatial_merge_size
    side = max(2, spec.window_size // spec.patch_size // m) if spec.window_size else 2
    return torch.tensor([[1, 2 * side * m, 2 * side * m], [1, side * m, 3 * side * m]])


def export_vision_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    precision: str = "bf16",
    min_pixels: int = 56 * 56,
    max_pixels: int = 448 * 448,
    max_images: int = 4,
    workspace_gib: float = 8.0,
    attention: str = "windowed",
) -> dict[str, Any]:
    """Export the vision encoder to `out_dir/vision.onnx` and write `out_dir/build_config.json`.

    Args:
        model_dir: a saved GeM-VG (Qwen2-VL / Qwen2.5-VL) model directory.
        out_dir: the engine folder (created), e.g. `engines/gemvg-7b/`.
        opset: ONNX opset (fixed so TensorRT's parser sees a known op set).
        precision: TensorRT build precision, "fp16", "bf16" or "fp32" (the ONNX is fp32).
        min_pixels, max_pixels: per-frame pixel budget of the engine config, in pixels.
        max_images: frames encoded together at most (sets the large profile).
        workspace_gib: TensorRT builder workspace, in GiB.
        attention: "windowed" (default): the window layers attend within windows gathered
            into a batch (W, 64 patches at Qwen2.5-VL-7B), the full-attention layers within
            each image gathered into a batch, so memory grows with the window and the image,
            not with all patches of the call squared; "dense": one N×N masked attention per
            layer (the old graph, kept as the benchmark's baseline).

    Returns:
        The build config written.
    """
    if precision not in ("fp16", "bf16", "fp32"):
        raise ConfigError(f"precision {precision!r} is not one of fp16, bf16, fp32", field="precision")
    if min_pixels > max_pixels:
        raise ConfigError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})", field="min_pixels")
    if not 1 <= opset <= 23:
        raise ConfigError(f"opset {opset} is not a valid ONNX opset; use 17 or 18", field="opset")
    if attention not in ATTENTION_KINDS:
        raise ConfigError(f"attention {attention!r} is not one of {', '.join(ATTENTION_KINDS)}", field="attention")
    started = time.perf_counter()
    visual, spec, digest = load_vision_tower(model_dir, dtype=torch.float32)
    wrapper = VisionExportWrapper(visual, spec, attention).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = _sample_grid(spec)
    host = host_inputs(grid, spec)
    n = host.num_patches
    pixels = torch.randn(n, spec.patch_dim)
    feeds = host.as_dict()
    input_names = list(INPUT_NAMES) + (list(WINDOWED_INPUTS) if attention == "windowed" else [])
    args = (pixels, *(feeds[name] for name in input_names[1:]))
    dynamic_axes: dict[str, dict[int, str]] = {name: {0: "patches"} for name in PATCH_AXIS_INPUTS}
    dynamic_axes.update({name: {0: "tokens"} for name in MERGED_AXIS_INPUTS})
    if attention == "windowed":
        dynamic_axes.update({
            "window_gather": {0: "windows", 1: "window_len"}, "window_bias": {0: "windows", 1: "window_len"},
            "image_gather": {0: "images", 1: "image_len"}, "image_bias": {0: "images", 1: "image_len"},
            "window_scatter": {0: "patches"}, "image_scatter": {0: "patches"},
        })
    dynamic_axes[OUTPUT_NAME] = {0: "tokens"}
    onnx_path = out / ONNX_NAME
    for stale in (onnx_path, out / (ONNX_NAME + ".data")):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp, torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated but is the one whose output TensorRT's parser
        # handles best for this graph (dynamic patch axis, no control flow); silence the notice.
        warnings.simplefilter("ignore", DeprecationWarning)
        staged = Path(tmp) / ONNX_NAME
        torch.onnx.export(
            wrapper,
            args,
            str(staged),
            input_names=input_names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        staged_files = list(Path(tmp).iterdir())
        if len(staged_files) == 1 and staged.stat().st_size < EXTERNAL_DATA_BYTES:
            shutil.move(str(staged), onnx_path)
        else:
            # Past protobuf's 2 GB cap (a 7B vision tower is ~2.7 GB in fp32) the exporter
            # writes one file per tensor; gather them into a single vision.onnx.data.
            import onnx

            model = onnx.load(str(staged))
            onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True, location=ONNX_NAME + ".data")
    import onnx
    import transformers

    build_config: dict[str, Any] = {
        "schema": BUILD_CONFIG_SCHEMA,
        "model": str(Path(model_dir).resolve()),
        "model_type": spec.family,
        "model_hash": digest,
        "onnx": ONNX_NAME,
        "opset": opset,
        "inputs": input_names,
        "attention": attention,
        "output": OUTPUT_NAME,
        "patch_axis_inputs": list(PATCH_AXIS_INPUTS),
        "merged_axis_inputs": list(MERGED_AXIS_INPUTS),
        "precision": precision,
        "workspace_gib": workspace_gib,
        "pixels": {"min_pixels": min_pixels, "max_pixels": max_pixels, "max_images": max_images},
        "profiles": patch_profiles(spec, min_pixels=min_pixels, max_pixels=max_pixels, max_images=max_images),
        "vision": asdict(spec),
        "exported_with": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__},
        "export_s": round(time.perf_counter() - started, 3),
    }
    text = json.dumps(build_config, indent=2) + "\n"
    (out / BUILD_CONFIG_NAME).write_text(text, encoding="utf-8")
    build_config = json.loads(text)  # what is returned is exactly what is on disk
    log.info("exported %s (%d patches traced) in %.1fs", onnx_path, n, build_config["export_s"])
    return build_config


def read_build_config(engine_dir: str | Path) -> dict[str, Any]:
    """Read `engine_dir/build_config.json`, with one clear sentence when it is missing or wrong."""
    path = Path(engine_dir) / BUILD_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"{engine_dir}: no {BUILD_CONFIG_NAME}; run `streamvg engine export --model DIR --out {engine_dir}` first",
            field="engine_dir",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); re-run `streamvg engine export`", field="engine_dir") from exc
    if data.get("schema") != BUILD_CONFIG_SCHEMA:
        raise ConfigError(f"{path}: schema {data.get('schema')!r} is not {BUILD_CONFIG_SCHEMA!r}; re-run `streamvg engine export`", field="engine_dir")
    return dict(data)
