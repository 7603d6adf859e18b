"""parse_answer on answers written the way Qwen2-VL / Qwen2.5-VL models write them.

Input sizes come from the real image processor (`image_grid_thw`), for frames whose sides
are not multiples of 28, in a downscaling and an upscaling min/max-pixels regime; the
expected frame pixels are computed here independently (x * frame_w / input_w).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvg.grounding import parse_answer, parse_answer_full
from streamvg.grounding.answers import split_reasoning
from streamvg.types import Detections

FRAMES = [(1920, 1080), (640, 272), (176, 144)]
REGIMES = {"downscale": (56 * 56, 448 * 448), "upscale": (800 * 800, 1600 * 1600)}


def processor_input_sizes(frames: list[tuple[int, int]], min_pixels: int, max_pixels: int) -> list[tuple[int, int]]:
    """(w, h) of each frame as the model sees it, read from the real processor's grid."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc(images=[np.zeros((h, w, 3), np.uint8) for w, h in frames], return_tensors="np")
    return [(int(g[2]) * 14, int(g[1]) * 14) for g in out["image_grid_thw"]]


@pytest.fixture(scope="module", params=sorted(REGIMES))
def sizes(request: pytest.FixtureRequest) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    inputs = processor_input_sizes(FRAMES, *REGIMES[request.param])
    for (fw, fh), (iw, ih) in zip(FRAMES, inputs, strict=True):
        assert iw % 28 == 0 and ih % 28 == 0
        assert (iw, ih) != (fw, fh)  # the resize really changes every frame here
    if request.param == "downscale":
        assert inputs[0][0] < 1920
    else:
        assert inputs[2][0] > 176
    return FRAMES, inputs


def expected(box: list[float], frame: tuple[int, int], inp: tuple[int, int]) -> list[float]:
    sx, sy = frame[0] / inp[0], frame[1] / inp[1]
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def in_input(frac: tuple[float, float, float, float], inp: tuple[int, int]) -> list[int]:
    """A box at fractions of the input image, as integer input pixels (what the model writes)."""
    return [round(frac[0] * inp[0]), round(frac[1] * inp[1]), round(frac[2] * inp[0]), round(frac[3] * inp[1])]


def test_qwen25_fenced_json_several_boxes_and_images(sizes: tuple[list, list]) -> None:
    frames, inputs = sizes
    b0 = in_input((0.1, 0.2, 0.3, 0.5), inputs[0])
    b2 = in_input((0.5, 0.1, 0.9, 0.8), inputs[2])
    b2b = in_input((0.05, 0.6, 0.2, 0.95), inputs[2])
    text = (
        "Sure! Here are the red cups I found:\n```json\n[\n"
        f'  {{"bbox_2d": {b0}, "label": "red cup", "image": 1}},\n'
        f'  {{"bbox_2d": {b2}, "label": "red cup", "image": 3}},\n'
        f'  {{"bbox_2d": {b2b}, "label": "red cup", "image": 3}}\n'
        "]\n```\nLet me know if you need anything else."
    )
    parsed = parse_answer_full(text, frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert parsed.ok and parsed.found == 3 and parsed.dropped == 0
    d = parsed.detections
    assert d.image_index.tolist() == [0, 2, 2]
    np.testing.assert_allclose(d.xyxy[0], expected(b0, frames[0], inputs[0]), rtol=1e-6)
    np.testing.assert_allclose(d.xyxy[1], expected(b2, frames[2], inputs[2]), rtol=1e-6)
    np.testing.assert_allclose(d.xyxy[2], expected(b2b, frames[2], inputs[2]), rtol=1e-6)
    assert parsed.labels == ["red cup"] * 3
    assert d.score.tolist() == [1.0, 1.0, 1.0] and d.track_id.tolist() == [-1, -1, -1]


def test_qwen25_image_named_in_prose_before_each_block(sizes: tuple[list, list]) -> None:
    frames, inputs = sizes
    b1 = in_input((0.2, 0.2, 0.4, 0.6), inputs[1])
    b2 = in_input((0.6, 0.3, 0.7, 0.9), inputs[2])
    text = (
        "The cup is visible in two of the images.\n\n"
        f'Image 2:\n```json\n[{{"bbox_2d": {b1}, "label": "cup"}}]\n```\n\n'
        f'Image 3:\n```json\n[{{"bbox_2d": {b2}, "label": "cup"}}]\n```'
    )
    d = parse_answer(text, frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert d.image_index.tolist() == [1, 2]
    np.testing.assert_allclose(d.xyxy[0], expected(b1, frames[1], inputs[1]), rtol=1e-6)
    np.testing.assert_allclose(d.xyxy[1], expected(b2, frames[2], inputs[2]), rtol=1e-6)


def test_qwen25_prose_ordinals_bare_lists_and_after_style(sizes: tuple[list, list]) -> None:
    frames, inputs = sizes
    b = in_input((0.25, 0.25, 0.75, 0.75), inputs[2])
    d = parse_answer(f"In the third image, the man is at {b}.", frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert d.image_index.tolist() == [2]
    np.testing.assert_allclose(d.xyxy[0], expected(b, frames[2], inputs[2]), rtol=1e-6)
    a, c = in_input((0.1, 0.1, 0.2, 0.2), inputs[1]), in_input((0.3, 0.3, 0.4, 0.4), inputs[0])
    d = parse_answer(f"{a} in image 2, and {c} in picture 1", frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert d.image_index.tolist() == [1, 0]
    np.testing.assert_allclose(d.xyxy[1], expected(c, frames[0], inputs[0]), rtol=1e-6)
    d = parse_answer(f"The last frame shows it at {a}", frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert d.image_index.tolist() == [2]


def test_qwen25_single_object_zero_based_field_and_nested_groups(sizes: tuple[list, list]) -> None:
    frames, inputs = sizes
    b = in_input((0.1, 0.1, 0.5, 0.5), inputs[1])
    d = parse_answer(f'{{"bbox_2d": {b}, "label": "dog", "image_index": 1}}', frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert d.image_index.tolist() == [0]  # "image_index" 1 and no 0 anywhere: counted from 1
    d = parse_answer(
        f'[{{"bbox_2d": {b}, "image_index": 0}}, {{"bbox_2d": {b}, "image_index": 1}}]',
        frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl",
    )
    assert d.image_index.tolist() == [0, 1]  # a 0 means the answer counts from 0
    text = f'[{{"image": 3, "objects": [{{"bbox_2d": {b}, "label": "dog"}}, {{"bbox_2d": [[1, 2, 30, 40], [5, 6, 70, 80]]}}]}}]'
    d = parse_answer(text, frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert d.image_index.tolist() == [2, 2, 2] and len(d) == 3
    d = parse_answer(f'{{"bbox_2d": {b}, "image": "Image 2", "score": 0.7}}', frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert d.image_index.tolist() == [1] and d.score.tolist() == pytest.approx([0.7])


def test_reasoning_tags_and_truncated_answers(sizes: tuple[list, list]) -> None:
    frames, inputs = sizes
    b = in_input((0.3, 0.3, 0.6, 0.6), inputs[0])
    text = (
        "<think>The first image shows a kitchen; the red cup is next to the kettle, "
        "so its box is around the centre.</think>\n"
        f'<answer>```json\n[{{"bbox_2d": {b}, "label": "red cup", "image": 1}}]\n```</answer>'
    )
    parsed = parse_answer_full(text, frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert parsed.ok and parsed.reasoning is not None and parsed.reasoning.startswith("The first image")
    np.testing.assert_allclose(parsed.detections.xyxy[0], expected(b, frames[0], inputs[0]), rtol=1e-6)
    # Thinking cut off by max_new_tokens: no answer, unparseable, reasoning kept.
    cut = parse_answer_full("<think>Let me look at image 2 [10, 10, 50, 50", frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert not cut.ok and len(cut.detections) == 0 and cut.reasoning is not None
    # A list cut mid-way keeps the complete boxes.
    trunc = parse_answer_full('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "a", "image": 2}, {"bbox_2d": [5, 6',
                              frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl")
    assert trunc.ok and trunc.detections.image_index.tolist() == [1]
    assert split_reasoning("plain [1, 2, 3, 4]") == ("plain [1, 2, 3, 4]", None)


def test_qwen2vl_relative_boxes_with_and_without_special_tokens() -> None:
    frames = FRAMES
    text = (
        "Image 1: <|object_ref_start|>the red cup<|object_ref_end|><|box_start|>(100,200),(300,450)<|box_end|>\n"
        "Image 3: <|object_ref_start|>the red cup<|object_ref_end|><|box_start|>(500,0),(999,999)<|box_end|><|im_end|>"
    )
    parsed = parse_answer_full(text, frame_sizes=frames, input_sizes=None, convention="qwen2_vl")
    d = parsed.detections
    assert parsed.ok and d.image_index.tolist() == [0, 2]
    np.testing.assert_allclose(d.xyxy[0], [192.0, 216.0, 576.0, 486.0], rtol=1e-6)  # 1920x1080, /1000 per axis
    np.testing.assert_allclose(d.xyxy[1], [88.0, 0.0, 175.824, 143.856], rtol=1e-5)  # 176x144
    assert parsed.labels == ["the red cup", "the red cup"]
    # The same answer decoded with skip_special_tokens=True (box tokens gone).
    d2 = parse_answer("Image 2: the red cup(100,200),(300,450)", frame_sizes=frames, convention="qwen2_vl")
    np.testing.assert_allclose(d2.xyxy[0], [64.0, 54.4, 192.0, 122.4], rtol=1e-6)  # 640x272
    assert d2.image_index.tolist() == [1]
    # Input sizes are irrelevant to the relative convention.
    d3 = parse_answer("(100,200),(300,450)", frame_sizes=[(640, 272)], input_sizes=[(644, 280)], convention="qwen2_vl")
    np.testing.assert_allclose(d3.xyxy[0], [64.0, 54.4, 192.0, 122.4], rtol=1e-6)


def test_clamping_ordering_and_dropping() -> None:
    frames, inputs = [(640, 272), (176, 144)], [(644, 280), (168, 140)]
    parsed = parse_answer_full(
        '[{"bbox_2d": [600, -20, 700, 300], "image": 1}, {"bbox_2d": [100, 90, 40, 10], "image": 2}, '
        '{"bbox_2d": [50, 50, 50, 90], "image": 1}, {"bbox_2d": [10, 10, 20, 20], "image": 7}, '
        '{"bbox_2d": [900, 900, 990, 990], "image": 2}]',
        frame_sizes=frames, input_sizes=inputs, convention="qwen2_5_vl",
    )
    d = parsed.detections
    assert parsed.ok and parsed.found == 5 and parsed.dropped == 3 and len(d) == 2
    np.testing.assert_allclose(d.xyxy[0], [600 * 640 / 644, 0.0, 640.0, 272.0], rtol=1e-6)  # clamped to the frame
    np.testing.assert_allclose(d.xyxy[1], [40 * 176 / 168, 10 * 144 / 140, 100 * 176 / 168, 90 * 144 / 140], rtol=1e-6)  # corners ordered
    d.validate_boxes()


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("```json\n[]\n```", True),
        ("There is no red cup in these images.", True),
        ("None", True),
        ("<think>nothing matches</think><answer>[]</answer>", True),
        ("I think it is a cup.", False),
        ("", False),
        ('{"label": "cup"}', False),
    ],
)
def test_answers_without_boxes(text: str, ok: bool) -> None:
    parsed = parse_answer_full(text, frame_sizes=[(640, 480)], input_sizes=[(644, 476)], convention="qwen2_5_vl")
    assert len(parsed.detections) == 0 and parsed.ok is ok


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="input_sizes"):
        parse_answer("[1, 2, 3, 4]", frame_sizes=[(640, 480)], convention="qwen2_5_vl")
    with pytest.raises(ValueError, match="2 entries for 1 frames"):
        parse_answer("[1, 2, 3, 4]", frame_sizes=[(640, 480)], input_sizes=[(1, 1), (2, 2)], convention="qwen2_5_vl")
    with pytest.raises(ValueError, match="convention"):
        parse_answer("[1, 2, 3, 4]", frame_sizes=[(640, 480)], convention="yolo")  # type: ignore[arg-type]


_PIECES = st.sampled_from([
    "[", "]", "{", "}", "(", ")", ",", ":", '"', " ", "\n", "-", ".", "0", "7", "28", "999", "1e309",
    "99999999999999999999999", '"bbox_2d"', '"image"', '"image_index"', '"score"', '"label"', "Image", "image 0",
    "third image", "last frame", "<think>", "</think>", "<answer>", "</answer>", "```json", "```",
    "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|im_end|>", "none", "NaN",
])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(st.text(max_size=300), st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=80).map("".join)),
    sizes=st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), min_size=1, max_size=6),
    convention=st.sampled_from(["qwen2_vl", "qwen2_5_vl"]),
)
def test_parser_never_raises_and_boxes_stay_in_their_frames(text: str, sizes: list[tuple[int, int]], convention: str) -> None:
    inputs = [(max(28, w // 28 * 28), max(28, h // 28 * 28)) for w, h in sizes]
    parsed = parse_answer_full(text, frame_sizes=sizes, input_sizes=inputs, convention=convention)  # type: ignore[arg-type]
    d = parsed.detections
    assert isinstance(d, Detections) and len(parsed.labels) == len(d)
    assert parsed.found == len(d) + parsed.dropped + parsed.ambiguous
    if len(sizes) == 1:
        assert parsed.ambiguous == 0
    if len(d):
        assert np.all(np.isfinite(d.xyxy))
        assert np.all((d.image_index >= 0) & (d.image_index < len(sizes)))
        w = np.array([sizes[i][0] for i in d.image_index])
        h = np.array([sizes[i][1] for i in d.image_index])
        assert np.all(d.xyxy[:, 0] >= 0) and np.all(d.xyxy[:, 2] <= w) and np.all(d.xyxy[:, 3] <= h)
        assert np.all(d.xyxy[:, 2] > d.xyxy[:, 0]) and np.all(d.xyxy[:, 3] > d.xyxy[:, 1])
        assert np.all((d.score >= 0) & (d.score <= 1))


# --- which image: every naming form, and never a box on an image the answer did not name ---

FOUR = [(1000, 800), (640, 480), (800, 600), (1200, 900)]  # mixed sizes, so a wrong image shows in the pixels
FOUR_IN = [(1008, 812), (644, 476), (812, 588), (1204, 896)]


@pytest.mark.parametrize(
    ("text", "images"),
    [
        ("The bird is in Image-2 at [100, 200, 300, 400].", [1]),  # MIG-Bench's own wording
        ("Image-3: [100, 200, 300, 400]", [2]),
        ('{"image_1": [10, 20, 30, 40], "image_2": [50, 60, 70, 80]}', [0, 1]),
        ('{"image_2": [[10, 20, 30, 40], [50, 60, 70, 80]], "image_4": [1, 2, 30, 40]}', [1, 1, 3]),
        ("in Image-3 <|box_start|>(100,200),(300,400)<|box_end|>", [2]),
        ("images 1 and 3: [10, 20, 30, 40] and [50, 60, 70, 80]", [0, 2]),
        ("Images 1, 2 and 4: [10, 20, 30, 40], [50, 60, 70, 80], [5, 6, 70, 80]", [0, 1, 3]),
        ("Image-1 and Image-3: [10, 20, 30, 40], [50, 60, 70, 80]", [0, 2]),
        ("[10, 20, 30, 40] and [50, 60, 70, 80] in images 2 and 4", [1, 3]),
        ("the first and third images: [10, 20, 30, 40], [50, 60, 70, 80]", [0, 2]),
        ("It is in the 2th image [10, 20, 30, 40]", [1]),  # MIG-Bench's "1th image" ordinals
        ("In the fourth picture: (100, 200, 300, 300)", [3]),  # a parenthesised 4-tuple
        ("Frame 2: (100, 200, 300, 300)", [1]),
        ("Picture 4: <|object_ref_start|>cup<|object_ref_end|><|box_start|>(1,2),(30,40)<|box_end|>", [3]),
        ("<image_2> [10, 20, 30, 40]", [1]),
        ('[{"bbox_2d": [1, 2, 30, 40], "image_id": 2}, {"bbox_2d": [5, 6, 70, 80], "image": "Image-4"}]', [1, 3]),
        ("<think>It is in the second image.</think><answer>Image 2: [10, 20, 30, 40]</answer>", [1]),
    ],
)
def test_every_way_of_naming_the_image(text: str, images: list[int]) -> None:
    parsed = parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, convention="qwen2_5_vl", image_base=1)
    assert parsed.ok and parsed.ambiguous == 0 and parsed.dropped == 0
    assert parsed.detections.image_index.tolist() == images
    first = parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, convention="qwen2_5_vl")
    assert first.detections.image_index.tolist() == images  # inferred numbering agrees (no 0 in these)


@pytest.mark.parametrize(
    "text",
    [
        "[100, 200, 300, 400]",
        "(100, 200, 300, 300)",
        "<|box_start|>(100,200),(300,400)<|box_end|>",
        "The cup appears in images 1 and 3 at [10, 20, 30, 40].",  # two images, one box: which?
        "[10, 20, 30, 40]. It is not in image 3.",  # the mention is another sentence
        '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cup"}]\n```',
    ],
)
def test_a_box_on_no_named_image_is_ambiguous_not_image_0(text: str) -> None:
    parsed = parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, convention="qwen2_5_vl")
    assert len(parsed.detections) == 0 and parsed.ambiguous == parsed.found >= 1 and not parsed.ok
    one = parse_answer_full(text, frame_sizes=FOUR[:1], input_sizes=FOUR_IN[:1], convention="qwen2_5_vl")
    assert one.ok and one.ambiguous == 0 and one.detections.image_index.tolist() == [0] * one.found  # one frame: it is that one
    told = parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, convention="qwen2_5_vl", default_image=2)
    assert told.ok and told.detections.image_index.tolist() == [2] * told.found  # MIG-Bench: the asked-about image


def test_image_base_follows_the_prompt() -> None:
    text = '[{"bbox_2d": [1, 2, 30, 40], "image": 0}, {"bbox_2d": [5, 6, 70, 80], "image": 3}]'
    zero = parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, image_base=0)
    assert zero.detections.image_index.tolist() == [0, 3]
    one = parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, image_base=1)
    assert one.detections.image_index.tolist() == [2] and one.dropped == 1  # "image 0" names no frame
    assert parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN).detections.image_index.tolist() == [0, 3]
    with pytest.raises(ValueError, match="image_base"):
        parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, image_base=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="default_image 4"):
        parse_answer_full(text, frame_sizes=FOUR, input_sizes=FOUR_IN, default_image=4)


_NAMINGS = [
    "Image-{k}: ", "Image {k}: ", "in Image-{k} at ", "image_{k}: ", "Picture {k}: ", "Frame {k}: ",
    '"image_{k}": ', "<image_{k}> ", "In the {ord} image, ", "the {k}th image: ",
]
_ORD_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth"]
_FILLER = st.sampled_from(["", " ", "\n", ", ", " and ", ". ", " the cup is there ", " json ", " ``` ", " - "])


@st.composite
def _answers(draw: st.DrawFn) -> tuple[str, list[tuple[tuple[int, int, int, int], int | None]], int]:
    """An answer of several boxes, each named with a random form or not named at all; truth per box."""
    n = draw(st.integers(2, 6))
    parts: list[str] = [draw(_FILLER)]
    truth: list[tuple[tuple[int, int, int, int], int | None]] = []
    for i in range(draw(st.integers(1, 5))):
        box = (10 + i, 20 + i, 300 + i, 400 + i)  # distinct, so output rows match their segment
        form = draw(st.sampled_from([*_NAMINGS, None]))
        k = draw(st.integers(1, n)) if form else None
        if form:
            parts.append(form.format(k=k, ord=_ORD_WORDS[(k or 1) - 1]))
        box_text = draw(st.sampled_from(["[{}, {}, {}, {}]", "({}, {}, {}, {})", "<|box_start|>({},{}),({},{})<|box_end|>"]))
        parts.append(box_text.format(*box))
        parts.append(draw(_FILLER))
        truth.append((box, None if k is None else k - 1))
    return "".join(parts), truth, n


@settings(max_examples=200, deadline=None)
@given(case=_answers())
def test_a_multi_image_answer_never_puts_a_box_on_an_image_it_did_not_name(case: tuple[str, list, int]) -> None:
    text, truth, n = case
    parsed = parse_answer_full(text, frame_sizes=[(1000, 1000)] * n, input_sizes=[(1000, 1000)] * n, image_base=1)
    named = {k for _, k in truth if k is not None}
    assert parsed.found == len(truth) == len(parsed.detections) + parsed.ambiguous + parsed.dropped
    assert set(parsed.detections.image_index.tolist()) <= named  # never an image it did not name
    if not named:
        assert len(parsed.detections) == 0 and not parsed.ok
    got = {tuple(round(v) for v in row): int(k) for row, k in zip(parsed.detections.xyxy.tolist(), parsed.detections.image_index.tolist(), strict=True)}
    for box, k in truth:
        if k is not None and box in got:
            assert got[box] == k  # a named box is on its own image, never a neighbour's
        if k is not None and truth[0][1] is not None:
            assert box in got  # every box named the same way as the first is placed
