"""Acceptance: the engine feeds generate() exactly what transformers' own processor + model.generate would.

The reference is the family's real processor class (`Qwen2_5_VLProcessor` / `Qwen2VLProcessor`)
built from the tiny checkpoint's image processor and tokenizer, rendering the checkpoint's chat
template with its own `apply_chat_template` and expanding image slots with its own `__call__`.
(Its video processor needs torchvision, which the engine does not use: it is left out, and the
class check that insists on it is skipped for this construction only.) For 1-4 frame windows of
mixed sizes, batched and after the cache is warm, with the checkpoint's defaults and with
`add_vision_id` on: input ids, attention mask, pixel values, image_grid_thw and the greedy
output of `model.generate(pixel_values=…)` equal the engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_grounding import decode

from streamvg.grounding.hf import GemVGEngine
from streamvg.grounding.prompts import build_messages
from streamvg.types import Frame, Query, Window

TOKENS = 8


@pytest.fixture(scope="module")
def frames() -> list[Frame]:
    phone, cup = decode("carphone.mp4", 4), decode("cup.mp4", 2)  # 176x144 and 640x480
    return [phone[0], cup[0], phone[1], cup[1], phone[2], phone[3]]


def real_processor(engine: GemVGEngine, family: str) -> Any:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    cls = Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None if arg is None else check(self, name, arg)  # type: ignore[method-assign]
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(engine.model_path, max_pixels=engine.max_pixels)
        return cls(image_processor=image_processor, tokenizer=engine.tokenizer, video_processor=None, chat_template=engine.chat_template)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check  # type: ignore[method-assign]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
@pytest.mark.parametrize("vision_id", [None, True])
def test_engine_inputs_and_answers_equal_the_processor_and_generate(tiny_models: dict[str, Path], frames: list[Frame], family: str, vision_id: bool | None) -> None:
    engine = GemVGEngine(tiny_models[family], device="cpu", max_pixels=128 * 128, batch_size=4, max_new_tokens=TOKENS,
                         add_vision_id=vision_id, generation_kwargs={"min_new_tokens": TOKENS})
    proc = real_processor(engine, family)
    windows = [Window(tuple(frames[:1])), Window(tuple(frames[1:3])), Window(tuple(frames[2:5])), Window(tuple(frames[:4]))]
    queries = [Query(id=f"q{i}", text=t) for i, t in enumerate(["the man", "the cup", "a red cup on the table", "the phone"])]
    requests = list(zip(windows, queries, strict=True))
    engine.visual_tokens([frames[1], frames[4]])  # part of the batch comes from the cache
    results = engine.ground_many(requests)
    got = engine.last_inputs

    texts = [
        proc.apply_chat_template(build_messages(q.text, n_images=len(w), convention=engine.convention), tokenize=False,
                                 add_generation_prompt=True, **({"add_vision_id": True} if vision_id else {}))
        for w, q in requests
    ]
    proc.tokenizer.padding_side = "left"
    ref = proc(text=texts, images=[f.image for w in windows for f in w.frames], padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"].cpu(), ref["input_ids"])
    assert torch.equal(got["attention_mask"].cpu(), ref["attention_mask"])
    assert torch.equal(got["image_grid_thw"].cpu(), ref["image_grid_thw"])
    assert torch.equal(got["mm_token_type_ids"].cpu().long(), ref["mm_token_type_ids"].long())
    # Pixel values: the engine's cache holds tokens, so compare its processor's patches for the same frames.
    mine = engine.image_processor(images=[f.image for w in windows for f in w.frames], return_tensors="pt")
    torch.testing.assert_close(mine["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
    assert ("Picture 1:" in texts[1]) is bool(vision_id)
    with torch.inference_mode():
        out = engine.model.generate(**ref, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                                    pad_token_id=engine.pad_id, eos_token_id=engine.eos_ids)
    width = ref["input_ids"].shape[1]
    assert [engine._decode(row) for row in out[:, width:].tolist()] == [g.raw_text for g in results]
    assert all(g.error is None for g in results) and engine.stats.cache_hits >= 2
