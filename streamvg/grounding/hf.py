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

import gc
import importlib.util
import json
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
from streamvg.grounding.prefix import SharedGeneration, generate_shared, request_usage
from streamvg.grounding.prompts import IMAGE_PAD, QWEN_CHAT_TEMPLATE, build_messages, render_chat
from streamvg.grounding.vision import HFVisionEncoder, VisionEncoder, split_tokens
from streamvg.types import Frame, Query, QueryMode, Window

__all__ = ["GemVGEngine", "free_vision_tower", "resolve_convention"]

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
        min_pixels: Smallest model input per image, in pixels (small frames are upscaled);
            `None`: the checkpoint's `preprocessor_config.json`.
        max_pixels: Largest model input per image, in pixels; more pixels find smaller
            objects but cost visual tokens (a 448x448 input is 256 tokens) and time;
            `None`: the checkpoint's (Qwen2.5-VL ships 12845056, Qwen2-VL 12845056).
        mode: Force 'direct' or 'reason' for every query; `None` uses each `Query.mode`.
        convention: 'auto' reads `model_type`; 'qwen2_vl' / 'qwen2_5_vl' override it
            (a fine-tune may answer in its base family's convention).
        batch_size: Requests per `generate()` call; larger is faster per window on a GPU
            but raises latency and memory.
        max_new_tokens: Answer length cap; reason mode needs more than direct.
        cache_bytes: Visual-token cache budget in bytes (0 disables the cache).
        cache_key: 'content' (default) hashes the pixels, so the cache never serves another
            frame's tokens; 'frame' keys by (camera, index, pts, size), free to compute but
            wrong when a name comes back with new pixels (a restarted producer).
        vision_encoder: A `VisionEncoder` replacing the model's own tower (TensorRT); the
            PyTorch tower is then freed. An encoder with `check_max_pixels(max_pixels)` is
            asked at load whether the pixel budget fits it.
        generation_kwargs: Extra `generate()` arguments (e.g. `prefix_allowed_tokens_fn`).
        add_vision_id: Label images "Picture k:" in the prompt; `None`: the processor's
            default (off, as Qwen's and Migician's reference inference run).
        attn_implementation: 'sdpa', 'flash_attention_2' (flash-attn installed, GPU) or 'eager'.
        device_map: transformers `device_map` ('auto' spreads the model over the GPUs);
            overrides `device`.
        share_prefix: Prefill a window's visual prefix once for all the queries a batch asks
            of it (`streamvg.grounding.prefix`); same answers, a fraction of the prefill.

    The chat template is the checkpoint's, wherever it keeps it (`chat_template.jinja`,
    the processor's `chat_template.json`, `processor_config.json`, `tokenizer_config.json`);
    without one, Qwen's own template is used and a warning says so.

    Raises:
        ModelLoadError: the directory or hub id cannot be loaded (one sentence).
        ConfigError: an option is invalid (fp16 with Qwen2.5-VL's vision tower, flash
            attention without flash-attn, a pixel budget the vision encoder was not built for).
    """

    _stop_event: threading.Event | None = None  # set_stop_event: stop generate between tokens

    def __init__(
        self,
        model: str | Path | EngineConfig,
        *,
        device: str = "auto",
        dtype: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        mode: QueryMode | None = None,
        convention: str = "auto",
        batch_size: int = 4,
        max_new_tokens: int = 256,
        cache_bytes: int = 512 * 1024 * 1024,
        cache_key: Literal["frame", "content"] = "content",
        vision_encoder: VisionEncoder | None = None,
        generation_kwargs: dict[str, Any] | None = None,
        add_vision_id: bool | None = None,
        attn_implementation: str = "sdpa",
        device_map: str | dict[str, Any] | None = None,
        share_prefix: bool = True,
    ) -> None:
        if isinstance(model, EngineConfig):
            cfg = model
            if not cfg.model:
                raise ConfigError("engine.model is not set; give a model directory or hub id", field="engine.model")
            model = cfg.model
            device, dtype, convention = cfg.device, cfg.dtype, cfg.convention
            min_pixels, max_pixels = cfg.min_pixels, cfg.max_pixels
            batch_size, max_new_tokens = cfg.batch_size, cfg.max_new_tokens
            add_vision_id, cache_bytes, cache_key = cfg.add_vision_id, cfg.cache_bytes, cfg.cache_key
            attn_implementation, device_map = cfg.attn_implementation, cfg.device_map
        if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
            raise ConfigError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be at least 1")
        if cache_key not in ("frame", "content"):
            raise ConfigError(f"cache_key must be 'frame' or 'content', got {cache_key!r}", field="engine.cache_key")
        self.attn_implementation = _check_attn(attn_implementation, device)
        self.model_path = str(model)
        self.name = Path(self.model_path.rstrip("/")).name or self.model_path
        self.mode = mode
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.share_prefix = share_prefix
        self.generation_kwargs = dict(generation_kwargs or {})
        self.stats = EngineStats()
        self.cache = VisualTokenCache(cache_bytes)
        self.cache_key = cache_key
        self._key = frame_key if cache_key == "frame" else content_key
        self._prompt_ids: OrderedDict[tuple[str, int, str], list[int]] = OrderedDict()

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        if dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype in _DTYPES:
            self.dtype = _DTYPES[dtype]
        else:
            raise ConfigError(f"dtype {dtype!r} is unknown; use auto, bfloat16, float16 or float32", field="engine.dtype")
        source = _check_model_source(self.model_path)
        self.tokenizer, self.image_processor = self._load_processor(source, min_pixels, max_pixels)
        self.min_pixels = int(self.image_processor.size["shortest_edge"])
        self.max_pixels = int(self.image_processor.size["longest_edge"])
        self.chat_template, self.chat_template_source = _checkpoint_chat_template(source, self.tokenizer)
        # The processor's default: Qwen's template labels images only when asked (add_vision_id).
        self.add_vision_id = bool(add_vision_id) if add_vision_id is not None else False
        check = getattr(vision_encoder, "check_max_pixels", None)
        if callable(check):
            check(self.max_pixels)  # before the weights load: a misfit fails in seconds, not on the first frame
        self.model = self._load_model(source, vision_encoder is not None, device_map)
        cfg_type = str(getattr(self.model.config, "model_type", ""))
        self.convention: Convention = resolve_convention(cfg_type, convention)
        self.merge_size = int(self.model.config.vision_config.spatial_merge_size)
        self.patch_size = int(getattr(self.image_processor, "patch_size", 14))
        self.image_token_id = int(self.model.config.image_token_id)
        if vision_encoder is not None:
            self.encoder: VisionEncoder = vision_encoder
            free_vision_tower(self.model)
        else:
            self.encoder = HFVisionEncoder(self.model)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: list[int] = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        pad = gen.pad_token_id if gen.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    # --- loading -------------------------------------------------------------------

    def _load_error(self, source: str, exc: Exception) -> ModelLoadError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if Path(source).is_dir():
            msg = f"model directory {source} could not be loaded ({first}); check it is a Qwen2-VL / Qwen2.5-VL checkpoint"
        else:
            msg = (
                f"model {source} could not be loaded from {where} ({first}); "
                "download it first (`hf download ID`) or give a local directory"
            )
        return ModelLoadError(msg, model=source)

    def _load_processor(self, source: str, min_pixels: int | None, max_pixels: int | None) -> tuple[Any, Any]:
        """Tokenizer and PIL image processor; pixel limits are the checkpoint's unless given."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        overrides = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, **overrides)  # type: ignore[arg-type]
        except (OSError, ValueError, KeyError) as exc:
            raise self._load_error(source, exc) from exc
        size = image_processor.size
        lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
        if lo > hi:
            raise ConfigError(
                f"engine.min_pixels ({lo}) is larger than engine.max_pixels ({hi}) once the checkpoint's "
                "preprocessor_config.json fills the one not given; set both",
                field="engine.min_pixels",
            )
        tokenizer.padding_side = "left"
        return tokenizer, image_processor

    def _load_model(self, source: str, replaced_vision: bool, device_map: str | dict[str, Any] | None) -> Any:
        from transformers import AutoConfig, AutoModelForImageTextToText

        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError) as exc:
            raise self._load_error(source, exc) from exc
        if self.dtype == torch.float16 and str(getattr(config, "model_type", "")).startswith("qwen2_5_vl") and not replaced_vision:
            raise ConfigError(
                "engine.dtype float16 is refused for Qwen2.5-VL: its vision tower overflows in fp16 "
                "(inf/NaN visual tokens); use bfloat16 (or float32 on a GPU without bf16)",
                field="engine.dtype",
            )
        kwargs: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": self.attn_implementation}
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise self._load_error(source, exc) from exc
        if device_map is None:
            model = model.to(self.device)  # type: ignore[arg-type]
        else:
            self.device = torch.device(str(model.get_input_embeddings().weight.device))
        return model.eval()

    def _load(self, source: str, min_pixels: int | None, max_pixels: int | None) -> tuple[Any, Any, Any]:
        """(model, tokenizer, image processor) of `source` (kept for callers of the old single step)."""
        tokenizer, image_processor = self._load_processor(source, min_pixels, max_pixels)
        return self._load_model(source, False, None), tokenizer, image_processor

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
        `stats.preprocess_s` alone); `vision_s` the encoder call (CUDA-synchronised).

        Frames already in the cache are not preprocessed or encoded again; the misses are
        preprocessed and encoded together in one vision-encoder call.

        Raises:
            GroundingError: a frame was refused by the image processor, or the encoder ran
                out of memory (one sentence; `_run_batch` fails only the windows concerned).
        """
        keys, found, failed, prepare_s, vision_s = self._visual_tokens(frames)
        if failed:
            raise GroundingError(next(iter(failed.values())))
        return [found[k] for k in keys], prepare_s, vision_s

    def _visual_tokens(
        self, frames: Sequence[Frame]
    ) -> tuple[list[Hashable], dict[Hashable, CacheEntry], dict[Hashable, str], float, float]:
        """(keys, entries by key, one-sentence failure by key, prepare_s, vision_s) of `frames`."""
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
        failed: dict[Hashable, str] = {}
        if misses:
            t_pre = time.perf_counter()
            batch = self._preprocess(misses, failed)
            preprocess_s = time.perf_counter() - t_pre
            if batch is not None:
                good = [k for k in misses if k not in failed]
                grid = batch["image_grid_thw"]
                t1 = time.perf_counter()
                try:
                    with torch.inference_mode():
                        tokens = self.encoder.encode(batch["pixel_values"].to(self.device), grid.to(self.device))
                        parts = split_tokens(tokens.to(self.device, self.dtype), grid, self.merge_size)
                        # Each entry owns its tokens: a split view would pin the whole batch's output.
                        entries = [CacheEntry.owning(part, (int(g[0]), int(g[1]), int(g[2]))) for part, g in zip(parts, grid.tolist(), strict=True)]
                    del tokens, parts
                    self._sync()
                except torch.cuda.OutOfMemoryError:
                    _free_cuda()
                    msg = (
                        f"{self.name} ran out of GPU memory encoding {len(good)} frames; "
                        "lower engine.max_pixels or engine.batch_size"
                    )
                    failed.update(dict.fromkeys(good, msg))
                    entries = []
                vision_s = time.perf_counter() - t1
                self.stats.vision_calls += 1
                self.stats.vision_images += len(entries)
                for key, entry in zip(good if entries else [], entries, strict=True):
                    found[key] = entry
                    self.cache.put(key, entry)
        self.stats.preprocess_s += preprocess_s
        prepare_s = time.perf_counter() - t0 - vision_s
        return keys, found, failed, prepare_s, vision_s

    def _preprocess(self, misses: dict[Hashable, Frame], failed: dict[Hashable, str]) -> Any:
        """The image processor's batch for the misses it accepts; refused frames go into `failed`."""
        try:
            return self.image_processor(images=[f.image for f in misses.values()], return_tensors="pt")
        except ValueError:
            pass  # one frame spoils the call: find which, frame by frame, and keep the others
        accepted = []
        for key, frame in misses.items():
            try:
                self.image_processor(images=[frame.image], return_tensors="pt")
            except ValueError as exc:  # e.g. an aspect ratio beyond 200:1, which Qwen's resize refuses
                reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                failed[key] = (
                    f"the image processor refused frame {frame.camera}#{frame.index} {frame.width}x{frame.height} "
                    f"({reason}); crop or resize such frames first"
                )
            else:
                accepted.append(frame.image)
        if not accepted:
            return None
        return self.image_processor(images=accepted, return_tensors="pt")

    def _sync(self) -> None:
        # CUDA runs asynchronously: without a sync the time lands in whichever step waits next.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _template_ids(self, text: str, n_images: int, mode: str) -> list[int]:
        """Token ids of the chat prompt with one `<|image_pad|>` per image (memoised)."""
        key = (text, n_images, mode)
        ids = self._prompt_ids.get(key)
        if ids is not None:
            self._prompt_ids.move_to_end(key)
            return ids
        messages = build_messages(text, n_images=n_images, convention=self.convention, mode=mode)  # type: ignore[arg-type]
        if self.chat_template:
            prompt = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True,
                add_vision_id=self.add_vision_id,
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

    def _failed(self, window: Window, query: Query, message: str, timings: dict[str, float]) -> Grounding:
        log.warning("window %s, query %s not grounded: %s", window.id, query.id, message)
        self.stats.failed_windows += 1
        return Grounding(
            window_id=window.id, query_id=query.id, detections=_empty(), raw_text="", reasoning=None,
            model=self.name, timings=dict(timings), parse_ok=False, error=message,
        )

    def _run_batch(self, requests: Sequence[tuple[Window, Query]]) -> list[Grounding]:
        """Ground one batch; a request that cannot be run (a refused frame, out of memory, a
        prompt the template cannot render) gets a `Grounding` with `error` set, the others run."""
        if not requests:
            return []
        t_start = time.perf_counter()
        all_frames = [f for w, _ in requests for f in w.frames]
        cached_before: set[Hashable] = {k for k in map(self._key, all_frames) if k in self.cache}  # for Grounding.usage
        keys, found, failed, prep_vis, vision_s = self._visual_tokens(all_frames)
        t_prompt = time.perf_counter()
        errors: dict[int, str] = {}
        rows: list[list[int]] = []
        per_request: list[list[CacheEntry]] = []
        live: list[int] = []
        k = 0
        keys_of: dict[int, list[Hashable]] = {}  # request -> its frames' cache keys (for usage)
        for r, (window, query) in enumerate(requests):
            mine_keys = keys[k : k + len(window)]
            keys_of[r] = mine_keys
            k += len(window)
            bad = next((failed[key] for key in mine_keys if key in failed), None)
            if bad is not None:
                errors[r] = bad
                continue
            mine = [found[key] for key in mine_keys]
            mode = self.mode or query.mode
            try:
                ids = self._expand(self._template_ids(query.text, len(window), mode), mine)
            except GroundingError as exc:
                errors[r] = str(exc)
                continue
            per_request.append(mine)
            rows.append(ids)
            live.append(r)
        prepare_s = prep_vis + (time.perf_counter() - t_prompt)
        generate_s = 0.0
        new: list[list[int]] = []
        shared: SharedGeneration | None = None
        if rows:
            width = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                attention[i, width - len(row) :] = 1
            entries = [e for mine in per_request for e in mine]
            grid = torch.tensor([e.grid_thw for e in entries], dtype=torch.long)
            inputs: dict[str, Any] = {
                "input_ids": input_ids.to(self.device),
                "attention_mask": attention.to(self.device),
                "mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32).to(self.device),
                "image_grid_thw": grid.to(self.device),
                "mm_encoder_outputs": {"image": _pooled(tuple(e.tokens for e in entries))},
            }
            self.last_inputs = inputs  # what generate() got, for tests and debugging (replaced each batch)
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
                    shared = generate_shared(self, inputs, kwargs, rows, per_request) if self.share_prefix else None
                    out = shared.sequences if shared is not None else self.model.generate(**inputs, **kwargs)
                self._sync()
                new = out[:, width:].tolist()
            except torch.cuda.OutOfMemoryError:
                _free_cuda()
                msg = (
                    f"{self.name} ran out of GPU memory generating for a batch of {len(rows)} windows; "
                    "lower engine.batch_size or engine.max_pixels"
                )
                errors.update(dict.fromkeys(live, msg))
                live, shared = [], None
            generate_s = time.perf_counter() - t_gen
            if stop_event is not None and stop_event.is_set():
                raise GroundingCancelled(f"{self.name}: stopped while generating (the run is stopping); the batch is discarded")

        t_parse = time.perf_counter()
        usage: dict[int, dict[str, int]] = {}
        if live:
            per_live = request_usage(self, [keys_of[r] for r in live], cached_before, rows, new, shared)
            usage = dict(zip(live, per_live, strict=True))
            self.stats.prefill_tokens += sum(u["prefill_tokens"] for u in per_live)
            self.stats.generated_tokens += sum(u["generated_tokens"] for u in per_live)
            self.stats.shared_prefix_requests += shared.shared_rows if shared is not None else 0
        parsed_all: dict[int, tuple[str, Any]] = {}
        for r, mine, gen_ids in zip(live, per_request, new, strict=False):
            window, query = requests[r]
            text = self._decode(gen_ids)
            input_sizes = [(e.grid_thw[2] * self.patch_size, e.grid_thw[1] * self.patch_size) for e in mine]
            try:
                parsed = parse_answer_full(
                    text, frame_sizes=window.frame_sizes, input_sizes=input_sizes, convention=self.convention,
                    image_base=1,  # build_messages numbers the images from 1
                )
            except Exception:  # parse_answer never raises on model output; guard the pipeline anyway
                log.exception("parsing the answer for window %s failed; the window is skipped", window.id)
                parsed = None
            parsed_all[r] = (text, parsed)
        parse_s = time.perf_counter() - t_parse
        total = time.perf_counter() - t_start
        timings = {"prepare": prepare_s, "vision": vision_s, "generate": generate_s, "parse": parse_s, "total": total}
        results: list[Grounding] = []
        for r, (window, query) in enumerate(requests):
            if r in errors:
                results.append(self._failed(window, query, errors[r], timings))
                continue
            text, parsed = parsed_all[r]
            use = usage.get(r, {})
            if parsed is None or not parsed.ok:
                self.stats.unparseable += 1
                log.info("unparseable answer for window %s, query %s: %.200r", window.id, query.id, text)
            det = parsed.detections if parsed is not None else _empty()
            if query.min_score > 0 and len(det):
                det = det[det.score >= query.min_score]
            if parsed is not None:
                self.stats.dropped_boxes += parsed.dropped
                self.stats.ambiguous_boxes += parsed.ambiguous
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
                    usage=use,
                    ambiguous=parsed.ambiguous if parsed is not None else 0,
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


_ATTN = ("sdpa", "flash_attention_2", "eager")


def _check_attn(attn: str, device: str) -> str:
    """`attn` if this machine can run it, else one sentence saying what to do."""
    if attn not in _ATTN:
        raise ConfigError(f"engine.attn_implementation {attn!r} is unknown; use {', '.join(_ATTN)}", field="engine.attn_implementation")
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "engine.attn_implementation flash_attention_2 needs the flash-attn package, which is not installed; "
                "pip install flash-attn --no-build-isolation on the GPU machine, or use sdpa",
                field="engine.attn_implementation",
            )
        if device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("engine.attn_implementation flash_attention_2 runs only on a CUDA GPU; use sdpa here", field="engine.attn_implementation")
    return attn


_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json")


def _checkpoint_chat_template(source: str, tokenizer: Any) -> tuple[str, str]:
    """(template, where it came from): the checkpoint's own, in the order the processor reads them.

    transformers' processor prefers `chat_template.jinja`, then the legacy processor file
    `chat_template.json`, then a `chat_template` key of `processor_config.json`; the
    tokenizer's (`tokenizer_config.json`) comes after. Released Qwen2.5-VL checkpoints keep it
    in `chat_template.json`, which the tokenizer alone never reads.
    """
    from transformers.utils import cached_file

    for name in _TEMPLATE_FILES:
        try:
            path = cached_file(source, name, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False)
        except (OSError, ValueError):
            path = None
        if not path:
            continue
        text = Path(path).read_text(encoding="utf-8")
        if name.endswith(".jinja"):
            return text, name
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            log.warning("%s in %s is not valid JSON; its chat template is ignored", name, source)
            continue
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, str) and template:
            return template, name
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.chat_template), "tokenizer_config.json"
    log.warning("%s has no chat template (chat_template.jinja, chat_template.json or the tokenizer's); using Qwen's own", source)
    return QWEN_CHAT_TEMPLATE, "built-in Qwen template"


class _FreedVisionTower(torch.nn.Module):
    """What is left of `model.visual` once another encoder replaced it: the numbers transformers reads, no weights."""

    def __init__(self, dtype: torch.dtype, spatial_merge_size: int) -> None:
        super().__init__()
        self._dtype = dtype
        self.spatial_merge_size = spatial_merge_size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise GroundingError("the PyTorch vision tower was freed when another vision encoder replaced it; pass visual tokens (mm_encoder_outputs)")


def free_vision_tower(model: Any) -> int:
    """Drop a loaded model's PyTorch vision tower (its weights), keeping what generate() reads; returns bytes freed."""
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "visual") else model
    visual = inner.visual
    if isinstance(visual, _FreedVisionTower):
        return 0
    freed = sum(p.numel() * p.element_size() for p in visual.parameters())
    inner.visual = _FreedVisionTower(next(visual.parameters()).dtype, int(visual.spatial_merge_size))
    del visual
    _free_cuda()
    return int(freed)


def _free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pooled(tokens: tuple[torch.Tensor, ...]) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=tokens)  # type: ignore[arg-type]  # per-image tuple, as get_image_features returns


def _empty() -> Any:
    from streamvg.types import Detections

    return Detections.empty()
