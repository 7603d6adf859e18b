"""Pluggable vision encoding: the `VisionEncoder` protocol and the model's own tower behind it.

A `VisionEncoder` turns the processor's flattened patches of several images into their
merged visual tokens, concatenated in image order:

    encode(pixel_values (sum_i t*h*w, patch_dim), grid_thw (n, 3)) -> (sum_i t*h*w / merge^2, hidden)

Qwen's ViT attends within each image only (`cu_seqlens`), so encoding images together or
one by one gives the same tokens; that is what lets the per-frame visual-token cache
(`streamvg.grounding.cache`) sit in front of any encoder. `HFVisionEncoder` wraps the
loaded model's `visual`; `streamvg.grounding.trt.TensorRTVisionEncoder` implements the same
protocol.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["HFVisionEncoder", "VisionEncoder", "split_tokens"]


@runtime_checkable
class VisionEncoder(Protocol):
    """Merged visual tokens of a batch of images (see the module docstring for shapes)."""

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor: ...


class HFVisionEncoder:
    """The transformers model's own vision tower (`model.model.visual`) as a `VisionEncoder`.

    Args:
        model: A loaded `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`
            (or its inner `model`).
    """

    def __init__(self, model: Any) -> None:
        inner = model.model if hasattr(model, "model") and hasattr(model.model, "visual") else model
        self.visual = inner.visual
        self.spatial_merge_size = int(self.visual.spatial_merge_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged tokens of the images, concatenated in order."""
        out = self.visual(pixel_values.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device))
        tokens = getattr(out, "pooler_output", out)
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"vision tower returned {type(tokens).__name__}, expected a tensor of merged tokens")
        return tokens


def split_tokens(tokens: torch.Tensor, grid_thw: torch.Tensor, merge_size: int) -> list[torch.Tensor]:
    """Split an encoder's concatenated output into one tensor per image."""
    sizes = (grid_thw.prod(-1) // (merge_size**2)).tolist()
    if sum(sizes) != tokens.shape[0]:
        raise ValueError(f"vision encoder returned {tokens.shape[0]} tokens, the grids need {sum(sizes)}")
    return list(torch.split(tokens, sizes))
