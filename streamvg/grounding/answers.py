"""Model answers to boxes: the one place where GeM-VG's text becomes `Detections`.

Pure Python + numpy (no torch), shared by every engine. `parse_answer` reads the answer
formats the Qwen2-VL / Qwen2.5-VL family really emits and never raises on model output:

- Qwen2.5-VL JSON, fenced or not, with prose around it, one object or a list, keys
  `bbox_2d` / `bbox` / `box`, several boxes per key, truncated mid-list;
- bare `[x1, y1, x2, y2]` lists, parenthesised 4-tuples `(x1, y1, x2, y2)` and Qwen2-VL pairs
  `(x1,y1),(x2,y2)`, with or without `<|box_start|>…<|box_end|>` and
  `<|object_ref_start|>label<|object_ref_end|>`;
- the image a box is in, as a field (`"image": 2`, `"image_id": 0`, `"image": "Image-2"`), a
  key (`{"image_1": […], "image_2": […]}`), in prose ("Image-2:", MIG-Bench's "in Image-2 at
  […]", "Picture 3", "frame 4", `<image_2>`, "in the third image", "the 1th image"), or for
  several boxes at once ("images 1 and 3: […] and […]", "the first and third images");
- R1-style reasoning `<think>…</think><answer>…</answer>` (the reasoning is returned apart).

**A box is never put on a frame the answer does not name.** In a window of several frames,
a box whose image cannot be read (no mention, "images 1 and 3" with one box, "[…]. Not in
image 3.") is *ambiguous*: counted in `ParsedAnswer.ambiguous` (engines add it to
`stats.ambiguous_boxes`) and left out, unless the caller gives `default_image` (the frame
the question asked about). In a one-frame window it is that frame's box. Whether numbers
count from 0 or 1 is what the prompt said (`image_base`), or inferred from the answer.

The numbers' meaning comes from the `convention`, not from the syntax:

- `qwen2_vl`: integers in [0, 1000) relative to each image's own width and height;
- `qwen2_5_vl`: absolute pixels of the image as the processor resized it, so they map back
  per axis with `input_sizes` (from the processor's `image_grid_thw`, never recomputed).

Boxes come back in **original frame pixels**, corners ordered, clamped to the frame;
degenerate boxes (no area after clamping) and boxes naming an image outside the window
are dropped. An answer is "parseable" when it holds at least one box it can place or says
plainly that there is no match (`[]`, "None", "there is no …"); anything else counts as
unparseable.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from streamvg.types import Detections

__all__ = ["ParsedAnswer", "parse_answer", "parse_answer_full", "split_reasoning"]

Convention = Literal["qwen2_vl", "qwen2_5_vl"]
Size = tuple[int, int]

MAX_ANSWER_CHARS = 100_000  # longer answers are cut (a runaway generation, not a grounding)

_NUM = r"(-?\d+(?:\.\d+)?)"
_QUAD_RE = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]")
_TUPLE_RE = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\)")
_PAIR_RE = re.compile(rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,?\s*(?:to\s*)?\(\s*{_NUM}\s*,\s*{_NUM}\s*\)")
_OBJECT_RE = re.compile(r"\{[^{}]*\}")
_KEYED_RE = re.compile(r"[\"']?(x1|y1|x2|y2|xmin|ymin|xmax|ymax)[\"']?\s*:\s*" + _NUM, re.IGNORECASE)
_SCORE_RE = re.compile(r"[\"']?(?:score|confidence|conf|prob|probability)[\"']?\s*:\s*\"?" + _NUM, re.IGNORECASE)
_LABEL_RE = re.compile(r"[\"']?(?:label|name|object|category)[\"']?\s*:\s*\"([^\"]{0,200})\"", re.IGNORECASE)
_REF_RE = re.compile(r"<\|object_ref_start\|>(.{0,200}?)<\|object_ref_end\|>", re.DOTALL)
_WORD = r"(?:image|img|picture|pic|frame)"
# A field naming the image of the object it is in: "image": 2, "image_id": 0, image_index=1, "image": "Image-2".
_FIELD_RE = re.compile(
    rf"[\"']?{_WORD}(?:[ _-]?(?:index|idx|id|no|num|number))?[\"']?\s*[:=]\s*[\"']?(?:{_WORD}[\s_#-]*)?(\d{{1,6}})",
    re.IGNORECASE,
)
_SEP = r"[\s_#-]*(?:no\.?\s*|number\s*)?"
# "images 1 and 3", "Frames 2, 3 & 4", "images 1-2"? (ranges are not read: too rare to guess)
_GROUP_RE = re.compile(
    rf"\b{_WORD}s{_SEP}(\d{{1,6}})((?:\s*,\s*\d{{1,6}})*)\s*,?\s*(?:and|&)\s*(\d{{1,6}})\b", re.IGNORECASE
)
# "Image 2", "Image-2:", "image_2" (a JSON key), "Picture #3", "<image_2>", "frame no. 4".
_PROSE_RE = re.compile(rf"(?<![A-Za-z]){_WORD}s?{_SEP}(\d{{1,6}})(?!\d)(?!\.\d)", re.IGNORECASE)
_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6,
    "seventh": 7, "eighth": 8, "ninth": 9, "tenth": 10,
}
_ORD = r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last|\d{1,3}(?:st|nd|rd|th))"
# "the third image", "3rd frame", "1th image" (MIG-Bench's wording), "the first and third images".
_ORDINAL_RE = re.compile(rf"\b({_ORD}(?:\s*(?:,|and|&)\s*{_ORD})*)\s+{_WORD}s?\b", re.IGNORECASE)
_ORDINAL_ONE_RE = re.compile(_ORD, re.IGNORECASE)
# Between a box and a later "in image k", a sentence end or a line break cuts the link.
_CLAUSE_END_RE = re.compile(r"[.;!?](?:\s|$)|\n")
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_END_TOKENS_RE = re.compile(r"<\|(?:im_end|endoftext|im_start)\|>")
_FENCE_RE = re.compile(r"```[a-zA-Z]*")
_EMPTY_RE = re.compile(r"^\W*(?:none|no|null|nothing|n/a|\[\s*\]|\{\s*\})\W*$", re.IGNORECASE)
_NONE_PHRASE_RE = re.compile(
    r"\b(?:there (?:is|are) no|not (?:found|present|visible|shown)|no (?:match|such|matching)|"
    r"(?:cannot|can't|could not|couldn't|unable to) (?:find|see|locate|identify)|"
    r"(?:does|do) not (?:appear|exist|contain)|(?:doesn't|don't) (?:appear|exist|contain))\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedAnswer:
    """Everything read from one answer.

    Attributes:
        detections: Boxes in original frame pixels with 0-based `image_index`.
        labels: Label of each kept box (`""` when the answer gave none), row-aligned.
        answer: The answer part of the text (reasoning removed, end tokens stripped).
        reasoning: The `<think>` text (or the text before `<answer>`), `None` without one.
        ok: Whether the answer was parseable (boxes, or a plain "no match").
        found: Boxes read before dropping.
        dropped: Boxes dropped (degenerate after clamping, or naming an image not in the window).
        ambiguous: Boxes left out because the answer does not say which frame of a
            multi-frame window they are in (`found == len(detections) + dropped + ambiguous`).
            An answer whose boxes are all ambiguous is not `ok`.
    """

    detections: Detections
    labels: list[str] = field(default_factory=list)
    answer: str = ""
    reasoning: str | None = None
    ok: bool = False
    found: int = 0
    dropped: int = 0
    ambiguous: int = 0


def split_reasoning(text: str) -> tuple[str, str | None]:
    """`(answer, reasoning)` of an R1-style `<think>…</think><answer>…</answer>` text.

    Without tags the whole text is the answer. An unclosed `<think>` with no answer means
    the model ran out of tokens while thinking: the answer is empty.

    Example:
        >>> split_reasoning("<think>the cup is left</think><answer>[1, 2, 3, 4]</answer>")
        ('[1, 2, 3, 4]', 'the cup is left')
    """
    text = _END_TOKENS_RE.sub("", text)
    think = _THINK_RE.search(text)
    reasoning = think.group(1).strip() if think else None
    ans = _ANSWER_RE.search(text)
    if ans:
        if reasoning is None:
            before = text[: ans.start()].strip()
            reasoning = before or None
        return ans.group(1).strip(), reasoning
    if think:
        close = text.lower().rfind("</think>")
        return (text[close + len("</think>"):].strip() if close >= 0 else ""), reasoning
    return text.strip(), None


@dataclass
class _Box:
    pos: int
    end: int
    coords: tuple[float, float, float, float]
    image: int | None = None  # raw number from the box's own object field
    score: float = 1.0
    label: str = ""


def _image_number(token: str, n_images: int) -> tuple[int, bool]:
    """(number, is_ordinal_word) from "3", "third", "3rd", "last"."""
    t = token.lower()
    if t == "last":
        return n_images, True
    if t in _ORDINALS:
        return _ORDINALS[t], True
    digits = re.match(r"\d+", t)
    return (int(digits.group(0)) if digits else 1), not t.isdigit()


def _find_boxes(text: str) -> tuple[list[_Box], list[tuple[int, int]]]:
    """All boxes in `text`, in order, and the spans of the flat `{…}` objects whose boxes name their image."""
    boxes: list[_Box] = []
    for m in _QUAD_RE.finditer(text):
        boxes.append(_Box(m.start(), m.end(), (float(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4)))))
    for m in _TUPLE_RE.finditer(text):
        boxes.append(_Box(m.start(), m.end(), (float(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4)))))
    for m in _PAIR_RE.finditer(text):
        boxes.append(_Box(m.start(), m.end(), (float(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4)))))
    boxes.sort(key=lambda b: b.pos)
    starts = [b.pos for b in boxes]
    objects: list[tuple[int, int]] = []
    keyed_boxes: list[_Box] = []
    for om in _OBJECT_RE.finditer(text):
        s, e = om.span()
        body = om.group(0)
        inside = boxes[bisect.bisect_left(starts, s) : bisect.bisect_left(starts, e)]
        if not inside:
            keyed = {k.lower(): float(v) for k, v in _KEYED_RE.findall(body)}
            keyed = {{"xmin": "x1", "ymin": "y1", "xmax": "x2", "ymax": "y2"}.get(k, k): v for k, v in keyed.items()}
            if all(k in keyed for k in ("x1", "y1", "x2", "y2")):
                b = _Box(s, e, (keyed["x1"], keyed["y1"], keyed["x2"], keyed["y2"]))
                keyed_boxes.append(b)
                inside = [b]
        if not inside:
            continue
        fm = _FIELD_RE.search(body)
        if fm:
            objects.append((s, e))  # mentions inside it belong to its own boxes
        sm = _SCORE_RE.search(body)
        lm = _LABEL_RE.search(body)
        for b in inside:
            if fm:
                b.image = int(fm.group(1))
            if sm:
                b.score = float(sm.group(1))
            if lm:
                b.label = lm.group(1).strip()
    if keyed_boxes:
        boxes = sorted(boxes + keyed_boxes, key=lambda b: b.pos)
        starts = [b.pos for b in boxes]
    for rm in _REF_RE.finditer(text):
        i = bisect.bisect_left(starts, rm.end())
        if i < len(boxes) and not boxes[i].label and boxes[i].pos - rm.end() <= 40:
            boxes[i].label = rm.group(1).strip()  # the box right after the reference names it
    return boxes, objects


@dataclass
class _Mention:
    """Where an answer names images, and which (raw numbers; ordinals are always 1-based)."""

    pos: int
    end: int
    numbers: tuple[int, ...]
    ordinal: bool = False


def _find_mentions(text: str, objects: list[tuple[int, int]], n_images: int) -> list[_Mention]:
    """Image mentions outside the objects whose boxes carry their own image field, in order.

    A group ("images 1 and 3", "Image-1 and Image-3", "the first and third images") is one
    mention with several numbers; adjacent single mentions joined by "and" / "," merge into one.
    """
    object_starts = [s for s, _ in objects]  # flat objects never overlap, so starts are sorted

    def inside_object(pos: int) -> bool:
        i = bisect.bisect_right(object_starts, pos) - 1
        return i >= 0 and pos < objects[i][1]

    taken: list[tuple[int, int]] = []

    def free(start: int, end: int) -> bool:
        return not inside_object(start) and all(end <= a or start >= b for a, b in taken)

    found: list[_Mention] = []
    for m in _FIELD_RE.finditer(text):
        if free(*m.span()):
            found.append(_Mention(m.start(), m.end(), (int(m.group(1)),)))
        taken.append(m.span())
    for m in _GROUP_RE.finditer(text):
        if free(*m.span()):
            group = [int(m.group(1)), *(int(x) for x in re.findall(r"\d+", m.group(2) or "")), int(m.group(3))]
            found.append(_Mention(m.start(), m.end(), tuple(group)))
            taken.append(m.span())
    for m in _PROSE_RE.finditer(text):
        if free(*m.span()):
            found.append(_Mention(m.start(), m.end(), (int(m.group(1)),)))
            taken.append(m.span())
    for m in _ORDINAL_RE.finditer(text):
        if free(*m.span()):
            nums = tuple(_image_number(o.group(0), n_images)[0] for o in _ORDINAL_ONE_RE.finditer(m.group(1)))
            found.append(_Mention(m.start(), m.end(), nums, ordinal=True))
            taken.append(m.span())
    found.sort(key=lambda x: x.pos)
    merged: list[_Mention] = []
    for mention in found:
        prev = merged[-1] if merged else None
        if prev is not None and prev.ordinal == mention.ordinal and _JOIN_RE.fullmatch(text[prev.end : mention.pos]):
            merged[-1] = _Mention(prev.pos, mention.end, prev.numbers + mention.numbers, prev.ordinal)
        else:
            merged.append(mention)
    return merged


_LABEL_AFTER_RE = re.compile(r"[\"'>|\]]*\s*:")
_LABEL_GAP_RE = re.compile(r"[\"'>|\]]*\s*(?:,|at|is at)?\s*", re.IGNORECASE)
_JOIN_RE = re.compile(r"\s*(?:,|and|&|,\s*and)\s*", re.IGNORECASE)


def _assign_images(text: str, boxes: list[_Box], mentions: list[_Mention]) -> list[tuple[int, bool] | None]:
    """(raw image number, is_ordinal) of each box, or `None` when the answer does not say.

    A box's own field wins. Otherwise the answer's style decides: if a mention comes before
    the first box ("Image 2: […]"), each box belongs to the nearest mention before it;
    otherwise ("[…] in image 2") to the first mention after it in the same clause. A mention
    of several images governs as many boxes, in order; any other count is ambiguous.
    """
    out: list[tuple[int, bool] | None] = [(b.image, False) if b.image is not None else None for b in boxes]
    if not mentions:
        return out
    before_style = mentions[0].pos < boxes[0].pos
    where = [m.pos for m in mentions]
    starts = [b.pos for b in boxes]

    def labels(j: int) -> bool:
        # "Image-2: …", "in Image-2 at […]", "<image_2> […]": the mention names what follows it.
        m = mentions[j]
        if _LABEL_AFTER_RE.match(text, m.end):
            return True
        k = bisect.bisect_left(starts, m.end)
        return k < len(boxes) and _LABEL_GAP_RE.fullmatch(text, m.end, boxes[k].pos) is not None

    governed: dict[int, list[int]] = {}
    for i, b in enumerate(boxes):
        if b.image is not None:
            continue
        before = bisect.bisect_left(where, b.pos) - 1
        if before_style or (before >= 0 and labels(before)):
            j = before
        else:
            j = bisect.bisect_left(where, b.end)
            if j >= len(mentions) or labels(j) or _CLAUSE_END_RE.search(text, b.end, mentions[j].pos):
                j = -1  # a label of later boxes, or another sentence ("[…]. Not in image 3.")
        if j >= 0:
            governed.setdefault(j, []).append(i)
    for j, idx in governed.items():
        m = mentions[j]
        if len(m.numbers) == 1:
            for i in idx:
                out[i] = (m.numbers[0], m.ordinal)
        elif len(m.numbers) == len(idx):
            for i, num in zip(idx, m.numbers, strict=True):
                out[i] = (num, m.ordinal)
        # else: "images 1 and 3" with one box (or three): which image is not said
    return out


def parse_answer_full(
    text: str,
    *,
    frame_sizes: Sequence[Size],
    input_sizes: Sequence[Size] | None = None,
    convention: Convention = "qwen2_5_vl",
    image_base: Literal[0, 1] | None = None,
    default_image: int | None = None,
) -> ParsedAnswer:
    """Parse one model answer into boxes in original frame pixels (see module docstring).

    Args:
        text: The model's decoded answer (special tokens may be present).
        frame_sizes: `(width, height)` of each original frame of the window, in order.
        input_sizes: `(width, height)` of each image as the model saw it (the processor's
            resize: `grid_w * patch_size`, `grid_h * patch_size`); needed for `qwen2_5_vl`.
        convention: `"qwen2_vl"` (0–1000 relative) or `"qwen2_5_vl"` (resized-input pixels).
        image_base: How the prompt numbered the images: 1 ("image 1" is the first frame, as
            StreamVG's prompts say), 0, or `None` to infer it from the answer (a 0 anywhere
            means 0-based). Ordinal words ("the second image") are always 1-based.
        default_image: 0-based image a box goes to when the answer does not name one (e.g.
            the image the question asked about, as in MIG-Bench); `None`: such boxes are
            ambiguous in a window of several frames (counted in `ambiguous`, not returned)
            and go to image 0 in a one-frame window.

    Returns:
        A `ParsedAnswer`; never raises on model output.

    Raises:
        ValueError: the arguments (not the answer) are inconsistent.
    """
    n = len(frame_sizes)
    if n < 1:
        raise ValueError("frame_sizes must name at least one frame")
    if convention not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"convention must be 'qwen2_vl' or 'qwen2_5_vl', got {convention!r}")
    if image_base not in (0, 1, None):
        raise ValueError(f"image_base must be 0, 1 or None, got {image_base!r}")
    if default_image is not None and not 0 <= default_image < n:
        raise ValueError(f"default_image {default_image} is not an image of this {n}-frame window (0 to {n - 1})")
    if convention == "qwen2_5_vl":
        if input_sizes is None:
            raise ValueError("input_sizes is required for the qwen2_5_vl convention (absolute resized-input pixels)")
        if len(input_sizes) != n:
            raise ValueError(f"input_sizes has {len(input_sizes)} entries for {n} frames")
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    answer, reasoning = split_reasoning(text[:MAX_ANSWER_CHARS])
    boxes, objects = _find_boxes(answer)
    if not boxes:
        stripped = _FENCE_RE.sub("", answer).strip()
        ok = bool(_EMPTY_RE.match(stripped) or _NONE_PHRASE_RE.search(stripped))
        return ParsedAnswer(Detections.empty(), [], answer, reasoning, ok, 0, 0)

    mentions = _find_mentions(answer, objects, n)
    raw_images = _assign_images(answer, boxes, mentions)
    zero_based = image_base == 0
    if image_base is None:
        zero_based = any(r is not None and not r[1] and r[0] == 0 for r in raw_images) or any(
            not m.ordinal and 0 in m.numbers for m in mentions
        )
    fallback = default_image if default_image is not None else (0 if n == 1 else None)

    coords = np.array([b.coords for b in boxes], dtype=np.float64)
    images = np.zeros(len(boxes), dtype=np.int64)
    valid = np.ones(len(boxes), dtype=bool)
    unnamed = np.zeros(len(boxes), dtype=bool)
    for i, raw in enumerate(raw_images):
        if raw is None:
            if fallback is None:
                unnamed[i] = True
                valid[i] = False
                continue
            images[i] = fallback
        else:
            num, ordinal = raw
            images[i] = num - 1 if ordinal or not zero_based else num
        if not 0 <= images[i] < n:
            valid[i] = False
            images[i] = 0

    frames = np.array(frame_sizes, dtype=np.float64).reshape(n, 2)
    fw, fh = frames[images, 0], frames[images, 1]
    if convention == "qwen2_vl" or input_sizes is None:
        sx, sy = fw / 1000.0, fh / 1000.0
    else:
        inputs = np.maximum(np.array(input_sizes, dtype=np.float64).reshape(n, 2), 1.0)
        sx, sy = fw / inputs[images, 0], fh / inputs[images, 1]
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.sort(coords[:, [0, 2]], axis=1) * sx[:, None]
        y = np.sort(coords[:, [1, 3]], axis=1) * sy[:, None]
        x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1e18, neginf=-1e18), 0.0, fw[:, None])
        y = np.clip(np.nan_to_num(y, nan=0.0, posinf=1e18, neginf=-1e18), 0.0, fh[:, None])
    valid &= (x[:, 1] > x[:, 0]) & (y[:, 1] > y[:, 0])
    scores = np.clip(np.nan_to_num(np.array([b.score for b in boxes], dtype=np.float64), nan=0.0), 0.0, 1.0)
    xyxy = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)[valid]
    det = Detections(xyxy=xyxy.astype(np.float32), score=scores[valid].astype(np.float32), image_index=images[valid])
    labels = [b.label for b, v in zip(boxes, valid.tolist(), strict=True) if v]
    ambiguous = int(unnamed.sum())
    dropped = int((~valid).sum()) - ambiguous
    # Boxes that cannot be placed on any frame are not an answer: unparseable, like no boxes.
    return ParsedAnswer(det, labels, answer, reasoning, ambiguous < len(boxes), len(boxes), dropped, ambiguous)


def parse_answer(
    text: str,
    *,
    frame_sizes: Sequence[Size],
    input_sizes: Sequence[Size] | None = None,
    convention: Convention = "qwen2_5_vl",
    image_base: Literal[0, 1] | None = None,
    default_image: int | None = None,
) -> Detections:
    """Boxes of one model answer in original frame pixels, with 0-based `image_index`.

    `frame_sizes` / `input_sizes` are per-image `(width, height)` of the original frame and
    of the model input; `convention` is `"qwen2_vl"` or `"qwen2_5_vl"`; `image_base` and
    `default_image` as in `parse_answer_full` (a box whose image the answer does not name is
    left out of a multi-frame window unless `default_image` says where it goes). Never
    raises on model output; an unparseable answer gives no boxes (see `parse_answer_full`).

    Example:
        >>> d = parse_answer('```json\\n[{"bbox_2d": [14, 28, 42, 56], "label": "cup", "image": 2}]\\n```',
        ...                  frame_sizes=[(640, 272), (640, 272)], input_sizes=[(644, 280), (644, 280)],
        ...                  convention="qwen2_5_vl")
        >>> d.image_index.tolist(), [round(v, 2) for v in d.xyxy[0].tolist()]
        ([1], [13.91, 27.2, 41.74, 54.4])
    """
    return parse_answer_full(
        text, frame_sizes=frame_sizes, input_sizes=input_sizes, convention=convention,
        image_base=image_base, default_image=default_image,
    ).detections
