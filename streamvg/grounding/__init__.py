"""Grounding: windows of frames + a query -> boxes in original frame pixels.

```
Window(frames) + Query ──▶ engine.ground([...]) ──▶ [Grounding(detections, raw_text, …)]
```

One protocol, several engines (`create_engine(cfg)` picks by `cfg.kind`):

| kind        | engine                                          | module            |
| ----------- | ----------------------------------------------- | ----------------- |
| `gemvg`     | GeM-VG in transformers (`GemVGEngine`)           | `hf.py`           |
| `gemvg-trt` | the same, vision encoder in TensorRT             | `trt.py`          |
| `replay`    | stored groundings from JSONL (`ReplayEngine`)    | `replay.py`       |
| `openai`    | a remote OpenAI-compatible server                | `remote.py`       |

Prompt wording (`prompts.py`) and answer parsing (`answers.py`, `parse_answer`) import no
torch, so remote engines reuse them as they are. Importing this package imports no torch
either; the engines load lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from streamvg.errors import ConfigError, EngineUnavailableError
from streamvg.grounding.answers import ParsedAnswer, parse_answer, parse_answer_full
from streamvg.types import Detections, Query, Window

if TYPE_CHECKING:
    from streamvg.config import EngineConfig
    from streamvg.grounding.hf import GemVGEngine
    from streamvg.grounding.replay import ReplayEngine

__all__ = [
    "EngineStats",
    "GemVGEngine",
    "Grounding",
    "GroundingEngine",
    "ParsedAnswer",
    "ReplayEngine",
    "create_engine",
    "parse_answer",
    "parse_answer_full",
]

TIMING_KEYS = ("prepare", "vision", "generate", "parse", "total")


@dataclass
class Grounding:
    """The engine's answer for one window and one query.

    Attributes:
        window_id: `Window.id` of the window asked about.
        query_id: `Query.id` of the query.
        detections: Boxes in **original frame pixels**; `image_index` says which frame of the
            window each box is in (0-based); `track_id` is -1 (the tracker assigns ids).
        raw_text: The model's answer as generated (for logs and debugging).
        reasoning: The `<think>` text in reason mode, else `None`.
        model: Name of the model that answered (events carry it).
        timings: Seconds spent on the batch this window was part of: `prepare` (images and
            prompt), `vision` (vision encoder), `generate`, `parse`, `total`.
        parse_ok: `False` when the answer could not be parsed (no boxes, not a plain "no
            match"); counted in `engine.stats.unparseable`, never raised.
        usage: The model's work for this request, for cost accounting: `images_encoded`
            (frames the vision encoder ran on for it), `images_cached` (frames served from
            the visual-token cache), `prefill_tokens` (prompt tokens the language model
            computed; a visual prefix shared by several queries counts once, on the first
            of them), `generated_tokens`. Empty when the engine does not know (replay).
        ambiguous: Boxes of the answer left out because it does not say which frame of the
            window they are in (see `streamvg.grounding.answers`).
        error: `None`, or one sentence saying why this window was not grounded (a frame the
            image processor refuses, out of memory); the window has no boxes and counts in
            `engine.stats.failed_windows`. The other windows of the batch are unaffected.
    """

    window_id: str
    query_id: str
    detections: Detections
    raw_text: str
    reasoning: str | None
    model: str
    timings: dict[str, float] = field(default_factory=dict)
    parse_ok: bool = True
    usage: dict[str, int] = field(default_factory=dict)
    ambiguous: int = 0
    error: str | None = None


@dataclass
class EngineStats:
    """Counters an engine keeps over its life (read them, don't write them).

    Attributes:
        windows: Windows grounded.
        batches: `generate()` batches run.
        unparseable: Answers that could not be parsed (`Grounding.parse_ok` false).
        boxes: Boxes returned.
        dropped_boxes: Boxes read but dropped (degenerate, or naming an image not in the window).
        ambiguous_boxes: Boxes left out because the answer did not name their frame.
        failed_windows: Windows not grounded (`Grounding.error` set: a refused frame, out of memory).
        vision_calls: Vision-encoder invocations.
        vision_images: Images (frames) the vision encoder encoded.
        cache_hits: Frames whose visual tokens came from the cache.
        prepare_s, vision_s, generate_s, parse_s: Seconds spent in each step; `prepare_s`
            includes `preprocess_s`, the image processor's share (resize, normalise, patchify).
        prefill_tokens: Prompt tokens the language model computed (padding excluded; a
            shared visual prefix counts once per window, see `grounding.prefix`).
        generated_tokens: Tokens generated, up to and including the end token.
        shared_prefix_requests: Requests answered on a copy of another request's prefix
            KV cache instead of prefilling their own.
    """

    windows: int = 0
    batches: int = 0
    unparseable: int = 0
    boxes: int = 0
    dropped_boxes: int = 0
    ambiguous_boxes: int = 0
    failed_windows: int = 0
    vision_calls: int = 0
    vision_images: int = 0
    cache_hits: int = 0
    prepare_s: float = 0.0
    vision_s: float = 0.0
    generate_s: float = 0.0
    parse_s: float = 0.0
    preprocess_s: float = 0.0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    shared_prefix_requests: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON."""
        return dict(self.__dict__)


@runtime_checkable
class GroundingEngine(Protocol):
    """What the pipeline needs of an engine."""

    name: str

    def ground(self, windows: Sequence[Window], query: Query) -> list[Grounding]:
        """One `Grounding` per window, in order; the windows are batched together."""
        ...

    def ground_many(self, requests: Sequence[tuple[Window, Query]]) -> list[Grounding]:
        """One `Grounding` per (window, query) pair, in order; mixed queries in one batch."""
        ...

    def close(self) -> None:
        """Release the model / files."""
        ...


def create_engine(cfg: EngineConfig) -> GroundingEngine:
    """The engine `cfg.kind` names, built from the pipeline file's `engine` section.

    Raises:
        ConfigError: a field the kind needs is missing.
        ModelLoadError: the model cannot be loaded (gemvg).
        EngineUnavailableError: the kind needs something not installed here.
    """
    kind = cfg.kind
    if kind == "gemvg":
        from streamvg.grounding.hf import GemVGEngine

        return GemVGEngine(cfg)
    if kind == "replay":
        from streamvg.grounding.replay import ReplayEngine

        if not cfg.replay_path:
            raise ConfigError("engine.replay_path is not set; kind 'replay' needs a groundings JSONL file", field="engine.replay_path")
        return ReplayEngine(cfg.replay_path, latency_s=cfg.replay_latency_s)
    if kind == "gemvg-trt":
        trt = _optional_module("streamvg.grounding.trt", kind)
        engine: GroundingEngine = trt.create_trt_engine(cfg)
        return engine
    if kind == "openai":
        remote = _optional_module("streamvg.grounding.remote", kind)
        engine = remote.create_openai_engine(cfg)
        return engine
    raise ConfigError(f"engine.kind {kind!r} is unknown; use gemvg, gemvg-trt, replay or openai", field="engine.kind")


def _optional_module(name: str, kind: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing = exc.name or name  # the module itself, or a package it needs
        raise EngineUnavailableError(
            f"engine kind {kind!r} is not available in this installation ({missing} cannot be imported); "
            "install the matching extra or use engine kind 'gemvg'"
        ) from exc


def __getattr__(name: str) -> Any:
    # Engines load lazily so that `import streamvg.grounding` stays torch-free.
    if name == "GemVGEngine":
        return importlib.import_module("streamvg.grounding.hf").GemVGEngine
    if name == "ReplayEngine":
        return importlib.import_module("streamvg.grounding.replay").ReplayEngine
    raise AttributeError(f"module 'streamvg.grounding' has no attribute {name!r}")
