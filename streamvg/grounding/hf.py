"""GeM-VG in transformers: `GemVGEngine`, the `gemvg` engine.

Per batch of (window, query) requests:

1. **prepare**: each frame's visual tokens are looked up in the per-frame cache; only the
   misses go through the image processor (`Qwen2VLImageProcessorPil`: smart resize to
   multiples of 28 within min/max pixels, patchify). The prompt is the model's chat
   template over `build_messages` (one `<|image_pad|>` per image), tokenized once per
   (query, image count) and expanded to `t*h*w / merge^2` pad tokens per image.
2. **vision**: the misses are encoded in one call of the `VisionEncoder` (the model's own
   tower, or TensorRT) and stored in the cache.
3. **generate**: `model.generate` gets `input_ids` (left-padded), `image_grid_thw`,
   `mm_token_type_ids` and the visual tokens as `mm_encoder_outputs`; transformers scatters
   them into the embeddings and computes the 3-D rope index from `image_grid_thw`, so the
   model runs exactly as with pixels, without re-encoding.
4. **parse**: `parse_answer_full` maps boxes back with each image's own input size
   (`grid_w * patch`, `grid_h * patch` from the processor, never recomputed).

The processor is assembled from the tokenizer and the PIL image processor because
transformers 5's `Qwen2_5_VLProcessor` insists on a video processor, which needs torchvision.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from streamvg.config import EngineConfig
from streamvg.errors import ConfigError, GroundingCancelled, GroundingError, ModelLoadError
from streamvg.grounding import EngineStats, Grounding
from streamvg.grounding.answers import Convention, parse_answer_full
from streamvg.grounding.cache import CacheEntry, VisualTokenCache, content_key, frame_key
from streamvg.grounding.prompts import IMAGE_PAD, build_messages, render_chat
from streamvg.grounding.vision import HFVisionEncoder, VisionEncoder, split_tokens
from streamvg.types import Frame, Query, QueryMode, Window

__all__ = ["GemVGEngine", "resolve_convention"]

log = logging.getLogger(__name__)

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_convention(model_type: str, override: str = "auto") -> Convention:
    """The box convention: `override` unless 'auto', else from the config's `model_type`."""
    if override in ("qwen2_vl", "qwen2_5_vl"):
        return override  # type: ignore[return-value]
    if override != "auto":
        raise ConfigError(f"engine.convention {override!r} is unknown; use auto, qwen2_vl or qwen2_5_vl", field="engine.convention")
    mt = model_type.lower()
    if mt.startswith("qwen2_5_vl"):
        return "qwen2_5_vl"
    if mt.startswith("qwen2_vl"):
        return "qwen2_vl"
    raise ConfigError(
        f"model_type {model_type!r} is not of the Qwen2-VL family, so the box convention is unknown; "
        "set engine.convention to qwen2_vl or qwen2_5_vl",
        field="engine.convention",
    )


def _check_model_source(model: str) -> str:
    """A local folder with config + weights, or a hub id; one clear sentence otherwise."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"{p} is not a model directory (no config.json); give the folder that holds config.json and the weights",
                model=model,
            )
        if not any(any(p.glob(pat)) for pat in _WEIGHT_PATTERNS):
            raise ModelLoadError(
                f"{p} has a config.json but no weights (*.safetensors or pytorch_model*.bin); "
                "copy the weight files into it or give another directory",
                model=model,
            )
        return str(p)
    if p.exists():
        raise ModelLoadError(f"{p} is a file, not a model directory; give the folder that holds config.json", model=model)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or not _HUB_ID_RE.match(model):
        raise ModelLoadError(f"model directory {model} does not exist; check the path", model=model)
    from streamvg.grounding.hub import check_hub_model

    check_hub_model(model)  # not cached and no hub: one sentence now, not a minute of retries
    return model  # a hub id


class GemVGEngine:
    """GeM-VG (Qwen2-VL / Qwen2.5-VL family) grounding in transformers, batched, with a visual-token cache.

    Args:
        model: Model directory or hub id, or an `EngineConfig` (its fields then fill the
            options below). `HF_HUB_OFFLINE=1` is respected: a hub id must then be cached.
        device: 'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1'.
        dtype: 'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16', 'float32'.
        min_pixels: Smallest model input per image, in pixels (small frames are upscaled).
        max_pixels: Largest model input per image, in pixels; more pixels find smaller
            objects but cost visual tokens (a 448x448 input is 256 tokens) and time.
        mode: Force 'direct' or 'reason' for every query; `None` uses each `Query.mode`.
        convention: 'auto' reads `model_type`; 'qwen2_vl' / 'qwen2_5_vl' override it
            (a fine-tune may answer in its base family's convention).
        batch_size: Requests per `generate()` call; larger is faster per window on a GPU
            but raises latency and memory.
        max_new_tokens: Answer length cap; reason mode needs more than direct.
        cache_bytes: Visual-token cache budget in bytes (0 disables the cache).
        cache_key: 'frame' keys by (camera, index, pts, size); 'content' hashes the pixels
            (for frames whose names do not identify them).
        vision_encoder: A `VisionEncoder` replacing the model's own tower (TensorRT).
        generation_kwargs: Extra `generate()` arguments (e.g. `prefix_allowed_tokens_fn`).
        add_vision_id: Label images "Picture k:" in the prompt (helps multi-image answers).

    Raises:
        ModelLoadError: the directory or hub id cannot be loaded (one sentence).
        ConfigError: an option is invalid.
    """

    _stop_event: threading.Event | None = None  # set_stop_event: stop generate between tokens

    def __init__(
        self,
        model: str | Path | EngineConfig,
        *,
        device: str = "auto",
        dtype: str = "auto",
        min_pixels: int = 56 * 56,
        max_pixels: int = 448 * 448,
        mode: QueryMode | None = None,
        convention: str = "auto",
        batch_size: int = 4,
        max_new_tokens: int = 256,
        cache_bytes: int = 512 * 1024 * 1024,
        cache_key: Literal["frame", "content"] = "frame",
        vision_encoder: VisionEncoder | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        add_vision_id: bool = True,
    ) -> None:
        if isinstance(model, EngineConfig):
            cfg = model
            if not cfg.model:
                raise ConfigError("engine.model is not set; give a model directory or hub id", field="engine.model")
            model = cfg.model
            device, dtype, convention = cfg.device, cfg.dtype, cfg.convention
            min_pixels, max_pixels = cfg.min_pixels, cfg.max_pixels
            batch_size, max_new_tokens = cfg.batch_size, cfg.max_new_tokens
        if min_pixels > max_pixels:
            raise ConfigError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be at least 1")
        if cache_key not in ("frame", "content"):
            raise ConfigError(f"cache_key must be 'frame' or 'content', got {cache_key!r}")
        self.model_path = str(model)
        self.name = Path(self.model_path.rstrip("/")).name or self.model_path
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.add_vision_id = add_vision_id
        self.generation_kwargs = dict(generation_kwargs or {})
        self.stats = EngineStats()
        self.cache = VisualTokenCache(cache_bytes)
        self._key = frame_key if cache_key == "frame" else content_key
        self._prompt_ids: OrderedDict[tuple[str, int, str], list[int]] = OrderedDict()

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        if dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype in _DTYPES:
            self.dtype = _DTYPES[dtype]
        else:
            raise ConfigError(f"dtype {dtype!r} is unknown; use auto, bfloat16, float16 or float32", field="engine.dtype")
        self.model, self.tokenizer, self.image_processor = self._load(_check_model_source(self.model_path), min_pixels, max_pixels)
        cfg_type = str(getattr(self.model.config, "model_type", ""))
        self.convention: Convention = resolve_convention(cfg_type, convention)
        self.encoder: VisionEncoder = vision_encoder if vision_encoder is not None else HFVisionEncoder(self.model)
        self.merge_size = int(self.model.config.vision_config.spatial_merge_size)
        self.patch_size = int(getattr(self.image_processor, "patch_size", 14))
        self.image_token_id = int(self.model.config.image_token_id)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: list[int] = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    # --- loading -------------------------------------------------------------------

    def _load(self, source: str, min_pixels: int, max_pixels: int) -> tuple[Any, Any, Any]:
        from transformers import AutoModelForImageTextToText, AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, min_pixels=min_pixels, max_pixels=max_pixels)
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=self.dtype, attn_implementation="sdpa")
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if Path(source).is_dir():
                msg = f"model directory {source} could not be loaded ({first}); check it is a Qwen2-VL / Qwen2.5-VL checkpoint"
            else:
                msg = (
                    f"model {source} could not be loaded from {where} ({first}); "
                    "download it first (`hf download ID`) or give a local directory"
                )
            raise ModelLoadError(msg, model=source) from exc
        tokenizer.padding_side = "left"
        model = model.to(self.device).eval()  # type: ignore[arg-type]
        return model, tokenizer, image_processor

    # --- the protocol ----------------------------------------------------------------

    def ground(self, windows: Sequence[Window], query: Query) -> list[Grounding]:
        """One `Grounding` per window, in order; windows go `batch_size` at a time into `generate()`."""
        return self.ground_many([(w, query) for w in windows])

    def ground_many(self, requests: Sequence[tuple[Window, Query]]) -> list[Grounding]:
        """One `Grounding` per (window, query), in order; mixed queries share batches."""
        out: list[Grounding] = []
        for start in range(0, len(requests), self.batch_size):
            out.extend(self._run_batch(requests[start : start + self.batch_size]))
        return out

    def set_stop_event(self, event: threading.Event | None) -> None:
        """Once `event` is set, a running `generate` stops at the next token and the batch
        raises `GroundingCancelled` (the pipeline's stop; see `streamvg.grounding.stopping`)."""
        self._stop_event = event

    def close(self) -> None:
        """Drop the cache and the model (frees GPU memory when nothing else holds it)."""
        self.cache.clear()
        self._prompt_ids.clear()
        close = getattr(self.encoder, "close", None)
        if callable(close) and not isinstance(self.encoder, HFVisionEncoder):
            close()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> GemVGEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- steps -------------------------------------------------------------------------

    def visual_tokens(self, frames: Sequence[Frame]) -> tuple[list[CacheEntry], float, float]:
        """Cached-or-encoded visual tokens of `frames`, in order; also (prepare_s, vision_s).

        `prepare_s` covers cache lookups and the image processor (also added to
        `stats.preprocess_s` alone); `vision_s` the encoder call.

        Frames already in the cache are not preprocessed or encoded again; the misses are
        preprocessed and encoded together in one vision-encoder call.
        """
        t0 = time.perf_counter()
        keys: list[Hashable] = [self._key(f) for f in frames]
        found: dict[Hashable, CacheEntry] = {}
        misses: dict[Hashable, Frame] = {}
        for key, frame in zip(keys, frames, strict=True):
            if key in found or key in misses:
                continue
            entry = self.cache.get(key)
            if entry is None:
                misses[key] = frame
            else:
                found[key] = entry
                self.stats.cache_hits += 1
        preprocess_s = vision_s = 0.0
        if misses:
            t_pre = time.perf_counter()
            try:
                batch = self.image_processor(images=[f.image for f in misses.values()], return_tensors="pt")
            except ValueError as exc:  # e.g. an aspect ratio beyond 200:1, which Qwen's resize refuses
                sizes = ", ".join(f"{f.camera}#{f.index} {f.width}x{f.height}" for f in misses.values())
                raise GroundingError(f"the image processor refused frames {sizes} ({exc}); crop or resize such frames first") from exc
            grid = batch["image_grid_thw"]
            preprocess_s = time.perf_counter() - t_pre
            t1 = time.perf_counter()
            with torch.inference_mode():
                tokens = self.encoder.encode(batch["pixel_values"].to(self.device), grid.to(self.device))
                parts = split_tokens(tokens.to(self.device, self.dtype), grid, self.merge_size)
            vision_s = time.perf_counter() - t1
            self.stats.vision_calls += 1
            self.stats.vision_images += len(misses)
            for key, part, g in zip(misses, parts, grid.tolist(), strict=True):
                entry = CacheEntry(part, (int(g[0]), int(g[1]), int(g[2])))
                found[key] = entry
                self.cache.put(key, entry)
        self.stats.preprocess_s += preprocess_s
        prepare_s = time.perf_counter() - t0 - vision_s
        return [found[k] for k in keys], prepare_s, vision_s

    def _template_ids(self, text: str, n_images: int, mode: str) -> list[int]:
        """Token ids of the chat prompt with one `<|image_pad|>` per image (memoised)."""
        key = (text, n_images, mode)
        ids = self._prompt_ids.get(key)
        if ids is not None:
            self._prompt_ids.move_to_end(key)
            return ids
        messages = build_messages(text, n_images=n_images, convention=self.convention, mode=mode)  # type: ignore[arg-type]
        if getattr(self.tokenizer, "chat_template", None):
            prompt = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, add_vision_id=self.add_vision_id
            )
        else:
            prompt = render_chat(messages, add_vision_id=self.add_vision_id)
        if prompt.count(IMAGE_PAD) != n_images:
            raise GroundingError(
                f"the chat template of {self.name} made {prompt.count(IMAGE_PAD)} image slots for {n_images} images; "
                "use a Qwen2-VL family chat template"
            )
        ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        self._prompt_ids[key] = ids
        if len(self._prompt_ids) > 256:
            self._prompt_ids.popitem(last=False)
        return ids

    def _expand(self, ids: list[int], entries: Sequence[CacheEntry]) -> list[int]:
        out: list[int] = []
        k = 0
        for tok in ids:
            if tok == self.image_token_id:
                n = entries[k].tokens.shape[0]
                out.extend([tok] * n)
                k += 1
            else:
                out.append(tok)
        return out

    def _run_batch(self, requests: Sequence[tuple[Window, Query]]) -> list[Grounding]:
        if not requests:
            return []
        t_start = time.perf_counter()
        all_frames = [f for w, _ in requests for f in w.frames]
        entries, prep_vis, vision_s = self.visual_tokens(all_frames)
        t_prompt = time.perf_counter()
        rows: list[list[int]] = []
        per_request: list[list[CacheEntry]] = []
        k = 0
        for window, query in requests:
            mine = entries[k : k + len(window)]
            k += len(window)
            per_request.append(mine)
            mode = self.mode or query.mode
            rows.append(self._expand(self._template_ids(query.text, len(window), mode), mine))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(r) :] = 1
        grid = torch.tensor([e.grid_thw for e in entries], dtype=torch.long)
        inputs: dict[str, Any] = {
            "input_ids": input_ids.to(self.device),
            "attention_mask": attention.to(self.device),
            "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32).to(self.device),
            "image_grid_thw": grid.to(self.device),
            "mm_encoder_outputs": {"image": _pooled(tuple(e.tokens for e in entries))},
        }
        prepare_s = prep_vis + (time.perf_counter() - t_prompt)

        t_gen = time.perf_counter()
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
            "pad_token_id": self.pad_id,
            "eos_token_id": self.eos_ids,
        }
        kwargs.update(self.generation_kwargs)
        stop_event = self._stop_event
        if stop_event is not None:
            from streamvg.grounding.stopping import with_stop_event

            kwargs["stopping_criteria"] = with_stop_event(kwargs.get("stopping_criteria"), stop_event)
        try:
            with torch.inference_mode():
                out = self.model.generate(**inputs, **kwargs)
        except torch.cuda.OutOfMemoryError as exc:
            raise GroundingError(
                f"{self.name} ran out of GPU memory on a batch of {len(requests)} windows; lower engine.batch_size or engine.max_pixels"
            ) from exc
        generate_s = time.perf_counter() - t_gen
        if stop_event is not None and stop_event.is_set():
            raise GroundingCancelled(f"{self.name}: stopped while generating (the run is stopping); the batch is discarded")

        t_parse = time.perf_counter()
        new = out[:, width:].tolist()
        results: list[Grounding] = []
        parsed_all = []
        for (window, query), mine, gen_ids in zip(requests, per_request, new, strict=True):
            text = self._decode(gen_ids)
            input_sizes = [(e.grid_thw[2] * self.patch_size, e.grid_thw[1] * self.patch_size) for e in mine]
            try:
                parsed = parse_answer_full(
                    text, frame_sizes=window.frame_sizes, input_sizes=input_sizes, convention=self.convention
                )
            except Exception:  # parse_answer never raises on model output; guard the pipeline anyway
                log.exception("parsing the answer for window %s failed; the window is skipped", window.id)
                parsed = None
            parsed_all.append((window, query, text, parsed))
        parse_s = time.perf_counter() - t_parse
        total = time.perf_counter() - t_start
        timings = {"prepare": prepare_s, "vision": vision_s, "generate": generate_s, "parse": parse_s, "total": total}
        for window, query, text, parsed in parsed_all:
            if parsed is None or not parsed.ok:
                self.stats.unparseable += 1
                log.info("unparseable answer for window %s, query %s: %.200r", window.id, query.id, text)
            det = parsed.detections if parsed is not None else _empty()
            if query.min_score > 0 and len(det):
                det = det[det.score >= query.min_score]
            if parsed is not None:
                self.stats.dropped_boxes += parsed.dropped
            self.stats.boxes += len(det)
            results.append(
                Grounding(
                    window_id=window.id,
                    query_id=query.id,
                    detections=det,
                    raw_text=text,
                    reasoning=parsed.reasoning if parsed is not None else None,
                    model=self.name,
                    timings=dict(timings),
                    parse_ok=parsed is not None and parsed.ok,
                )
            )
        self.stats.windows += len(requests)
        self.stats.batches += 1
        self.stats.prepare_s += prepare_s
        self.stats.vision_s += vision_s
        self.stats.generate_s += generate_s
        self.stats.parse_s += parse_s
        return results

    def _decode(self, ids: list[int]) -> str:
        """Generated ids up to the first end token, decoded with special tokens kept (Qwen2-VL boxes are special)."""
        cut = len(ids)
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                cut = i
                break
        kept = [t for t in ids[:cut] if t != self.pad_id]
        return str(self.tokenizer.decode(kept, skip_special_tokens=False))


def _pooled(tokens: tuple[torch.Tensor, ...]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=tokens)  # type: ignore[arg-type]  # per-image tuple, as get_image_features returns


def _empty() -> Any:
    from streamvg.types import Detections

    return Detections.empty()
