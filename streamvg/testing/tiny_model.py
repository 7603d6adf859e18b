"""Tiny Qwen2-VL / Qwen2.5-VL models built offline, for tests and CPU benchmarks.

`build(path, family=...)` writes a complete model folder the way a released model looks:
`config.json` + `model.safetensors` (random weights, `save_pretrained`), a byte-level BPE
tokenizer trained here with `tokenizers` that holds the Qwen special tokens and the Qwen
chat template (`chat_template.jinja`), `preprocessor_config.json` for the image processor, and
`generation_config.json`. Engines load it through exactly the path a user's model takes
(`GemVGEngine(path)`), so the plumbing is real; the answers are random.

Example:
    >>> from pathlib import Path; import tempfile
    >>> folder = build(Path(tempfile.mkdtemp()) / "tiny", family="qwen2_vl")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

__all__ = ["QWEN_SPECIAL_TOKENS", "build", "build_tokenizer", "place_chat_template"]

Family = Literal["qwen2_5_vl", "qwen2_vl"]
ChatTemplatePlace = Literal["jinja", "processor_json", "tokenizer", "none"]

# The special tokens of the Qwen2-VL family (same strings as the released tokenizers).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _corpus() -> list[str]:
    """Text the tokenizer learns merges from: prompts, answers in both conventions, digits."""
    from streamvg.grounding.prompts import build_question

    lines: list[str] = []
    for conv in ("qwen2_vl", "qwen2_5_vl"):
        for mode in ("direct", "reason"):
            for n in (1, 2, 4, 6):
                lines.append(build_question("the red cup on the table", n_images=n, convention=conv, mode=mode))  # type: ignore[arg-type]
    for i in range(200):
        a, b, c, d = (i * 7) % 640, (i * 13) % 480, (i * 17) % 640 + 10, (i * 19) % 480 + 10
        lines.append(f'```json\n[{{"bbox_2d": [{a}, {b}, {c}, {d}], "label": "cup", "image": {i % 6 + 1}}}]\n```')
        lines.append(f"Image {i % 6 + 1}: <|object_ref_start|>the cup<|object_ref_end|><|box_start|>({a},{b}),({c},{d})<|box_end|>")
    lines += ["<think>The cup is in the second image, left of the plate.</think><answer>[]</answer>"] * 5
    lines += ["You are a helpful assistant.", "There is no such object in the images. None."]
    return lines


def build_tokenizer(vocab_size: int = 480) -> object:
    """A byte-level BPE `PreTrainedTokenizerFast` with the Qwen special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from streamvg.grounding.prompts import QWEN_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build(
    path: str | Path,
    family: Family = "qwen2_5_vl",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 2,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    chat_template_in: ChatTemplatePlace = "jinja",
    chat_template: str | None = None,
) -> Path:
    """Write a tiny random-weight model of `family` into `path` (created); returns `path`.

    Args:
        path: Output folder.
        family: `"qwen2_5_vl"` or `"qwen2_vl"`; sets `model_type`, hence the box convention.
        seed: Torch seed for the random weights (same seed, same model).
        hidden_size: Language-model width (the vision tower's output width too).
        num_layers: Language-model layers.
        vision_depth: Vision-transformer blocks.
        min_pixels: Image processor's smallest input per image, in pixels.
        max_pixels: Image processor's largest input per image, in pixels.
        chat_template_in: Where the checkpoint keeps its chat template, as released models
            do: `"jinja"` (`chat_template.jinja`, what `save_pretrained` writes now),
            `"processor_json"` (the processor's legacy `chat_template.json`, as Qwen2.5-VL's
            release), `"tokenizer"` (a key of `tokenizer_config.json`) or `"none"`.
        chat_template: The template text (default: Qwen's own, `QWEN_CHAT_TEMPLATE`).
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in ("qwen2_5_vl", "qwen2_vl"):
        raise ValueError(f"family must be 'qwen2_5_vl' or 'qwen2_vl', got {family!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}  # type: ignore[attr-defined]
    vocab = len(tokenizer)  # type: ignore[arg-type]
    vocab += -vocab % 64
    text = {
        "vocab_size": vocab,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    special = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    torch.manual_seed(seed)
    model: torch.nn.Module
    if family == "qwen2_5_vl":
        vision = {
            "depth": vision_depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "out_hidden_size": hidden_size, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [vision_depth - 1],
        }
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special))
    else:
        vision = {
            "depth": vision_depth, "embed_dim": 32, "hidden_size": hidden_size, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        }
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **special))
    with torch.no_grad():  # wide random weights, so answers depend on the pixels and differences show
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.2)
            elif "norm" in name or "ln_q" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    place_chat_template(out, chat_template_in, chat_template)
    return out


def place_chat_template(out: Path, where: ChatTemplatePlace, template: str | None = None) -> None:
    """Keep the chat template of the model folder `out` where `where` says (and nowhere else)."""
    import json

    from streamvg.grounding.prompts import QWEN_CHAT_TEMPLATE

    text = template if template is not None else QWEN_CHAT_TEMPLATE
    jinja = out / "chat_template.jinja"
    jinja.unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    if where == "jinja":
        jinja.write_text(text, encoding="utf-8")
    elif where == "processor_json":
        (out / "chat_template.json").write_text(json.dumps({"chat_template": text}, indent=2), encoding="utf-8")
    elif where == "tokenizer":
        cfg["chat_template"] = text
    elif where != "none":
        raise ValueError(f"chat_template_in must be jinja, processor_json, tokenizer or none, got {where!r}")
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
