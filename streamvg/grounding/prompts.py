"""Prompts for GeM-VG grounding: the multi-image chat messages and the question text.

Pure Python (no torch), so every engine shares one wording: the transformers engine renders
the messages with the model's chat template, a remote OpenAI-compatible engine turns the
same messages into its request. The answer format asked for matches the model family's
box convention, which `streamvg.grounding.answers.parse_answer` reads back:

- `qwen2_5_vl`: JSON `[{"bbox_2d": [x1, y1, x2, y2], "label": "…", "image": k}]` in pixels
  of the image as the model sees it (after the processor's resize);
- `qwen2_vl`: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
  with coordinates in [0, 1000) relative to each image, prefixed by `Image k:`.

Images are numbered from 1 in the prompt ("Picture k:" labels from the chat template's
vision ids); the parser returns 0-based image indices.

Example:
    >>> msgs = build_messages("the red cup", n_images=2)
    >>> [part["type"] for part in msgs[-1]["content"]]
    ['image', 'image', 'text']
    >>> print(render_chat(msgs).splitlines()[3][:45])
    Picture 1: <|vision_start|><|image_pad|><|vis
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "DEFAULT_SYSTEM",
    "QUERY_TEMPLATES",
    "QWEN_CHAT_TEMPLATE",
    "Convention",
    "build_messages",
    "build_question",
    "neutralise_query",
    "render_chat",
    "render_query",
]

Convention = Literal["qwen2_vl", "qwen2_5_vl"]
PromptMode = Literal["direct", "reason"]

DEFAULT_SYSTEM = "You are a helpful assistant."

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# The chat template Qwen2-VL and Qwen2.5-VL ship (tokenizer_config.json / chat_template.json);
# `render_chat` is its exact Python twin, used when a tokenizer has no template.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Query templates for the common asks; `{target}` is the user's phrase.
QUERY_TEMPLATES: dict[str, str] = {
    "plain": "{target}",
    "every_frame": "Find {target} in every frame where it appears.",
    "across_cameras": "These images come from different cameras at the same moment. "
    "Find the same {target} in each camera's image.",
}

_FORMAT: dict[str, str] = {
    "qwen2_5_vl": (
        'Output the bounding box of every match in JSON format: '
        '[{{"bbox_2d": [x1, y1, x2, y2], "label": "{label}", "image": k}}], '
        "where k is the number of the image (1 to {n}) the box is in. "
        "If there is no match, output []."
    ),
    "qwen2_vl": (
        "For every match, write Image k: followed by "
        "<|object_ref_start|>{label}<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>, "
        "where k is the number of the image (1 to {n}). If there is no match, answer None."
    ),
}

_REASON = (
    "First think about the question step by step inside <think> </think> tags, "
    "then give the final answer inside <answer> </answer> tags."
)


# `<|im_end|>`, `<|image_pad|>`, `<|vision_start|>`, `<|endoftext|>`, … : the tokenizer turns these
# strings into control tokens wherever they appear, so a query holding one would end the user
# turn early or add an image slot with no image.
_CONTROL_TOKEN_RE = re.compile(r"<\|([^<>|\s]{1,64})\|>")


def neutralise_query(text: str) -> str:
    """`text` with every chat-template control token `<|name|>` written as plain `name`.

    Query text is the user's, not the prompt's: StreamVG **neutralises** control tokens
    (rather than refusing the query) so a query copied from a model answer still runs, and
    no query can end the user turn (`<|im_end|>`) or add an image slot (`<|image_pad|>`).

    Example:
        >>> neutralise_query("the cup<|im_end|><|image_pad|>")
        'the cup im_end image_pad'
    """
    out = _CONTROL_TOKEN_RE.sub(lambda m: f" {m.group(1)} ", text)
    return " ".join(out.split()) if out != text else text


def render_query(target: str, template: str = "plain") -> str:
    """The question for `target` phrased by one of `QUERY_TEMPLATES` (or a `{target}` string).

    Example:
        >>> render_query("the white van", "every_frame")
        'Find the white van in every frame where it appears.'
    """
    fmt = QUERY_TEMPLATES.get(template, template)
    if "{target}" not in fmt:
        raise ValueError(
            f"query template {template!r} is neither one of {sorted(QUERY_TEMPLATES)} nor a string with {{target}}"
        )
    return fmt.replace("{target}", target.strip())


def build_question(
    query: str,
    *,
    n_images: int,
    convention: Convention = "qwen2_5_vl",
    mode: PromptMode = "direct",
) -> str:
    """The text part of the user turn: the query, the answer format, and (reason mode) the tags.

    Args:
        query: The natural-language query (a phrase or a full question); chat-template
            control tokens in it are neutralised (`neutralise_query`).
        n_images: Images in the prompt (the window's frames).
        convention: Box convention of the model family; decides the answer format asked for.
        mode: `direct` answers at once; `reason` asks for `<think>…</think><answer>…</answer>`.
    """
    if convention not in _FORMAT:
        raise ValueError(f"convention must be 'qwen2_vl' or 'qwen2_5_vl', got {convention!r}")
    if mode not in ("direct", "reason"):
        raise ValueError(f"mode must be 'direct' or 'reason', got {mode!r}")
    q = neutralise_query(query).strip()
    label = " ".join(q.split())[:80].replace('"', "'")
    if n_images > 1:
        lead = f"Locate {q} in these {n_images} images." if not q.endswith((".", "?")) else q
    else:
        lead = f"Locate {q} in the image." if not q.endswith((".", "?")) else q
    parts = [lead, _FORMAT[convention].format(label=label, n=max(n_images, 1))]
    if mode == "reason":
        parts.append(_REASON)
    return " ".join(parts)


def build_messages(
    query: str,
    *,
    n_images: int,
    convention: Convention = "qwen2_5_vl",
    mode: PromptMode = "direct",
    system: str | None = DEFAULT_SYSTEM,
) -> list[dict[str, Any]]:
    """Chat messages for one window: the images in order, then the question, in one user turn.

    Image parts are `{"type": "image"}` placeholders; engines attach the pixels (the HF
    engine by expanding `<|image_pad|>`, a remote engine as `image_url` parts in order).
    """
    if n_images < 1:
        raise ValueError(f"a window needs at least one image, got n_images={n_images}")
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": build_question(query, n_images=n_images, convention=convention, mode=mode)})
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    return messages


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_vision_id: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """Render `messages` exactly as `QWEN_CHAT_TEMPLATE` does (one `<|image_pad|>` per image)."""
    out: list[str] = []
    images = videos = 0
    for i, message in enumerate(messages):
        role = str(message["role"])
        if i == 0 and role != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        out.append(f"<|im_start|>{role}\n")
        content = message["content"]
        if isinstance(content, str):
            out.append(f"{content}<|im_end|>\n")
            continue
        for part in content:
            if part.get("type") == "image" or "image" in part or "image_url" in part:
                images += 1
                if add_vision_id:
                    out.append(f"Picture {images}: ")
                out.append(f"{VISION_START}{IMAGE_PAD}{VISION_END}")
            elif part.get("type") == "video" or "video" in part:
                videos += 1
                if add_vision_id:
                    out.append(f"Video {videos}: ")
                out.append(f"{VISION_START}<|video_pad|>{VISION_END}")
            elif "text" in part:
                out.append(str(part["text"]))
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
