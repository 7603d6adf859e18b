"""Shared visual prefix: several queries of one window pay for its images once.

The prompt puts everything that depends only on the window first (system text, then the
images, "Picture k: <|vision_start|><|image_pad|>…<|vision_end|>") and the query after the
last `<|vision_end|>`. Four standing queries on one window therefore share ~1,000 of their
~1,100 prompt tokens; computing that prefix four times is most of the prefill work.

`generate_shared` (used by `GemVGEngine` when a batch asks several queries of one window):

1. **group** the batch's rows by (prefix token ids, the window's visual-token entries);
   when no group has two rows there is nothing to share and the plain path runs;
2. **prefill** each distinct prefix once (one forward over the groups, left-padded, with
   the window's visual tokens scattered in), keeping its KV cache;
3. **copy** each group's cache rows to every row of the group (`batch_select_indices`) and
   let `generate` run each row's suffix (the query) and decode on its copy.

Row `i` of the generate call is laid out `[pad | prefix | pad | suffix]`: padding is masked
out of attention and skipped by the positions (text positions are the attention mask's
running count, M-RoPE positions come from the model's own `get_rope_index` over the
unpadded tokens), so each row computes what it would alone, up to floating-point rounding.
The tests check the answers token for token against the per-query path.

The trade-off: the prefill of a prefix is a separate forward, so a batch of one query per
window gains nothing (the plain path runs then); with Q queries the prefill work falls from
Q × (prefix + suffix) to prefix + Q × suffix tokens. A static KV cache (`generation_config.
cache_implementation`, which `gemvg-trt` sets on GPU for torch.compile) is allocated inside
`generate`, so those engines run the plain path.
"""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamvg.grounding.cache import CacheEntry

__all__ = ["SharedGeneration", "generate_shared", "request_usage"]

VISION_END = "<|vision_end|>"


@dataclass
class SharedGeneration:
    """What `generate_shared` did.

    Attributes:
        sequences: `(rows, width + new)`: the caller's left-padded `input_ids` (`width`
            columns) followed by the generated tokens, the shape `model.generate` returns
            for the plain path, so the caller slices `[:, width:]` either way.
        prefill_tokens: Prompt tokens computed per row: the first row of a group counts its
            prefix and suffix, the others their suffix only.
        shared_rows: Rows that reused another row's prefix.
    """

    sequences: torch.Tensor
    prefill_tokens: list[int]
    shared_rows: int


def _cache_kwarg(fn: Any) -> str:
    """`cache` (transformers ≥ 5.x) or `past_key_values` (older), whichever `fn` takes."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate_shared(
    engine: Any,
    inputs: dict[str, Any],
    kwargs: dict[str, Any],
    rows: Sequence[Sequence[int]],
    per_request: Sequence[Sequence[CacheEntry]],
) -> SharedGeneration | None:
    """Generate for `rows` with each distinct visual prefix prefilled once; `None` when no
    two rows share a prefix (or the generation settings need their own cache), so the
    caller runs its plain `generate`.

    Args:
        engine: The `GemVGEngine` (model, tokenizer, pad and image token ids).
        inputs: The plain path's `generate` inputs (only `input_ids` is reused, for shape).
        kwargs: The plain path's `generate` keyword arguments (greedy settings, limits,
            `prefix_allowed_tokens_fn`, …); passed on unchanged.
        rows: Each request's prompt ids, visual pads expanded, unpadded.
        per_request: Each request's visual-token entries, one per image, in prompt order.
    """
    model = engine.model
    gen_cfg = getattr(model, "generation_config", None)
    if "cache_implementation" in kwargs or getattr(gen_cfg, "cache_implementation", None) or len(rows) < 2:
        # A static (compiled) cache is allocated by generate itself, so it cannot start from
        # a copied prefix: the gemvg-trt path on GPU runs the plain path. One row: nothing to share.
        return None
    vision_end = int(engine.tokenizer.convert_tokens_to_ids(VISION_END))
    splits: list[int] = []
    for r in rows:
        ends = [i for i, tok in enumerate(r) if tok == vision_end]
        if not ends:
            return None
        splits.append(ends[-1] + 1)
    groups: dict[Hashable, list[int]] = {}
    for i, (r, ents) in enumerate(zip(rows, per_request, strict=True)):
        groups.setdefault((tuple(r[: splits[i]]), tuple(id(e) for e in ents)), []).append(i)
    order = list(groups.values())
    if len(order) == len(rows):
        return None
    group_of = [0] * len(rows)
    for g, members in enumerate(order):
        for i in members:
            group_of[i] = g

    n = len(rows)
    p_width = max(splits)
    s_width = max(len(r) - s for r, s in zip(rows, splits, strict=True))
    ids = torch.full((n, p_width + s_width), engine.pad_id, dtype=torch.long)
    mask = torch.zeros((n, p_width + s_width), dtype=torch.long)
    for i, r in enumerate(rows):
        p, s = splits[i], len(r) - splits[i]
        ids[i, p_width - p : p_width] = torch.tensor(r[:p], dtype=torch.long)
        mask[i, p_width - p : p_width] = 1
        if s:
            ids[i, p_width + s_width - s :] = torch.tensor(r[p:], dtype=torch.long)
            mask[i, p_width + s_width - s :] = 1
    mm = (ids == engine.image_token_id).to(torch.int32)
    device = engine.device
    ids, mask, mm = ids.to(device), mask.to(device), mm.to(device)
    grid_all = torch.tensor([e.grid_thw for ents in per_request for e in ents], dtype=torch.long, device=device)
    # The positions the plain path would give each row (the model's own function, on the
    # whole [pad | prefix | pad | suffix] rows): padding never shifts a position.
    position_ids = model._prepare_position_ids_for_generation(
        ids, {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm, "image_grid_thw": grid_all}
    )

    firsts = [members[0] for members in order]
    first_entries = [e for i in firsts for e in per_request[i]]
    from streamvg.grounding.hf import _pooled  # the engine's own wrapping of visual tokens

    cache_name = _cache_kwarg(model.forward)
    prefill = model(
        input_ids=ids[firsts, :p_width],
        attention_mask=mask[firsts, :p_width],
        position_ids=position_ids[:, firsts, :p_width],
        mm_token_type_ids=mm[firsts, :p_width],
        image_grid_thw=torch.tensor([e.grid_thw for e in first_entries], dtype=torch.long, device=device),
        mm_encoder_outputs={"image": _pooled(tuple(e.tokens for e in first_entries))},
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(prefill, cache_name, None)
    if cache is None:
        cache = prefill.past_key_values
    cache.batch_select_indices(torch.tensor(group_of, dtype=torch.long, device=device))  # a copy per row

    out = model.generate(
        input_ids=ids, attention_mask=mask, position_ids=position_ids,
        **{cache_name: cache}, **kwargs,
    )
    new = out[:, p_width + s_width :]
    plain_ids = inputs["input_ids"].to(new.device)
    lead = set(firsts)
    prefill_tokens = [len(r) - (0 if i in lead else splits[i]) for i, r in enumerate(rows)]
    return SharedGeneration(torch.cat([plain_ids, new], dim=1), prefill_tokens, n - len(order))


def request_usage(
    engine: Any,
    frames_keys: Sequence[Sequence[Hashable]],
    cached_before: set[Hashable],
    rows: Sequence[Sequence[int]],
    new: Sequence[Sequence[int]],
    shared: SharedGeneration | None,
) -> list[dict[str, int]]:
    """The model's work per request of a batch (`Grounding.usage`).

    A frame encoded in this batch counts as `images_encoded` for the first request that
    holds it and `images_cached` for every other; a frame that was in the cache before the
    batch counts as cached everywhere. Generated tokens count up to and including the first
    end token.
    """
    encoded: set[Hashable] = set()
    out: list[dict[str, int]] = []
    eos = set(engine.eos_ids)
    for i, keys in enumerate(frames_keys):
        enc = cached = 0
        for k in keys:
            if k in cached_before or k in encoded:
                cached += 1
            else:
                encoded.add(k)
                enc += 1
        gen = next((j + 1 for j, t in enumerate(new[i]) if t in eos), len(new[i]))
        prefill = shared.prefill_tokens[i] if shared is not None else len(rows[i])
        out.append({"images_encoded": enc, "images_cached": cached, "prefill_tokens": prefill, "generated_tokens": gen})
    return out
