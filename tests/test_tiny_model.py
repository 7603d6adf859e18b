"""The tiny offline models look like released Qwen2-VL / Qwen2.5-VL folders and load the standard way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamvg.testing.tiny_model import QWEN_SPECIAL_TOKENS


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_tiny_model_folder_loads_through_transformers(tiny_models: dict[str, Path], family: str) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    folder = tiny_models[family]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= names
    cfg = AutoConfig.from_pretrained(folder)
    assert cfg.model_type == family
    tok = AutoTokenizer.from_pretrained(folder)
    for t in QWEN_SPECIAL_TOKENS:  # each special token is one id, and the config's ids are the tokenizer's
        assert tok(t, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(t)]
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert len(tok) <= cfg.text_config.vocab_size
    answer = 'Image 2: <|object_ref_start|>cup<|object_ref_end|><|box_start|>(12,340),(56,789)<|box_end|> ```json\n[{"bbox_2d": [1, 2, 3, 4]}]```'
    assert tok.decode(tok(answer, add_special_tokens=False)["input_ids"]) == answer
    assert tok.chat_template and "Picture" in tok.chat_template
    gen = json.loads((folder / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == ("Qwen2_5_VLForConditionalGeneration" if family == "qwen2_5_vl" else "Qwen2VLForConditionalGeneration")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_same_seed_same_weights(tmp_path: Path) -> None:
    from streamvg.testing.tiny_model import build

    a = build(tmp_path / "a", "qwen2_vl", seed=3)
    b = build(tmp_path / "b", "qwen2_vl", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="family"):
        build(tmp_path / "c", "llava")  # type: ignore[arg-type]
