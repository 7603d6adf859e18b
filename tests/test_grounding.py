"""GemVGEngine end to end on tiny Qwen2.5-VL / Qwen2-VL models loaded from disk like a user's model.

Frames are real decoded video (carphone 176x144, cup 640x480: sides not multiples of 28,
different sizes in one window). The tiny models' answers are random; a forced answer
(generation constrained to given tokens) checks that boxes land on the right pixels.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from streamvg.cli import main
from streamvg.config import EngineConfig
from streamvg.errors import EngineUnavailableError, ModelLoadError
from streamvg.grounding import GroundingEngine, create_engine
from streamvg.grounding.hf import GemVGEngine
from streamvg.grounding.prompts import build_messages, render_chat
from streamvg.grounding.replay import ReplayEngine
from streamvg.grounding.vision import HFVisionEncoder
from streamvg.types import Frame, Query, Window

MEDIA = Path(__file__).resolve().parent / "media"  # copies of ../shared/media (see its README)
FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
MAX_PIXELS = 112 * 112


def decode(name: str, n: int) -> list[Frame]:
    frames = []
    with av.open(str(MEDIA / name)) as c:
        for i, fr in enumerate(c.decode(video=0)):
            if i == n:
                break
            frames.append(Frame(camera=Path(name).stem, index=i, pts=float(fr.time), image=fr.to_ndarray(format="rgb24")))
    return frames


@pytest.fixture(scope="module")
def phone() -> list[Frame]:
    return decode("carphone.mp4", 8)


@pytest.fixture(scope="module")
def cup() -> list[Frame]:
    return decode("cup.mp4", 3)


def make_engine(model: Path, **kw: Any) -> GemVGEngine:
    opts: dict[str, Any] = {"max_new_tokens": 8, "max_pixels": MAX_PIXELS, "device": "cpu"}
    opts.update(kw)
    return GemVGEngine(model, **opts)


def forcing(tokenizer: Any, answers: list[str], eos: int) -> Callable[[int, torch.Tensor], list[int]]:
    """A prefix_allowed_tokens_fn that makes row b of the batch write answers[b], then stop."""
    targets = [[*list(tokenizer(a, add_special_tokens=False)["input_ids"]), eos] for a in answers]
    start: dict[int, int] = {}

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        step = len(ids) - start.setdefault(batch_id, len(ids))
        t = targets[batch_id]
        return [t[min(step, len(t) - 1)]]

    return allowed


@pytest.mark.parametrize("family", FAMILIES)
def test_windows_of_2_to_6_mixed_size_frames_are_batched(tiny_models: dict[str, Path], phone: list[Frame], cup: list[Frame], family: str) -> None:
    engine = make_engine(tiny_models[family], batch_size=3)
    assert isinstance(engine, GroundingEngine)
    assert engine.convention == family and engine.name == family
    mixed = [phone[0], cup[0], phone[1], cup[1], phone[2], cup[2]]
    windows = [Window(tuple(mixed[:n])) for n in (2, 3, 4, 5, 6)]
    results = engine.ground(windows, Query(id="q1", text="the man on the phone"))
    assert [g.window_id for g in results] == [w.id for w in windows]
    assert engine.stats.batches == 2 and engine.stats.windows == 5
    assert engine.stats.vision_images == 6  # six distinct frames, however many windows hold them
    for g, w in zip(results, windows, strict=True):
        assert g.query_id == "q1" and g.model == family and set(g.timings) == {"prepare", "vision", "generate", "parse", "total"}
        d = g.detections
        d.validate_boxes()
        assert np.all(d.image_index < len(w)) and np.all(d.track_id == -1)
        for box, k in zip(d.xyxy, d.image_index, strict=True):
            assert box[2] <= w.frames[k].width and box[3] <= w.frames[k].height
    assert engine.stats.unparseable == sum(not g.parse_ok for g in results)


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_answers_land_on_the_right_frame_pixels(tiny_models: dict[str, Path], phone: list[Frame], cup: list[Frame], family: str) -> None:
    engine = make_engine(tiny_models[family], max_new_tokens=120)
    w1 = Window((phone[0], cup[0], phone[1]))  # 176x144, 640x480, 176x144
    w2 = Window((cup[1], phone[2]))
    entries, _, _ = engine.visual_tokens([cup[0]])
    in_w, in_h = entries[0].grid_thw[2] * 14, entries[0].grid_thw[1] * 14
    assert (in_w, in_h) != (640, 480)  # resized for max_pixels
    if family == "qwen2_5_vl":
        box = [round(0.25 * in_w), round(0.1 * in_h), round(0.75 * in_w), round(0.9 * in_h)]
        a1 = f'```json\n[{{"bbox_2d": [{box[0]}, {box[1]}, {box[2]}, {box[3]}], "label": "cup", "image": 2}}]\n```'
        want1 = [box[0] * 640 / in_w, box[1] * 480 / in_h, box[2] * 640 / in_w, box[3] * 480 / in_h]
        a2 = "<think>The phone is in the second image.</think><answer>[]</answer>"
    else:
        a1 = "Image 2: <|object_ref_start|>cup<|object_ref_end|><|box_start|>(250,100),(750,900)<|box_end|>"
        want1 = [160.0, 48.0, 480.0, 432.0]
        a2 = "<think>The phone is in the second image.</think><answer>None</answer>"
    engine.generation_kwargs = {"prefix_allowed_tokens_fn": forcing(engine.tokenizer, [a1, a2], engine.eos_ids[0])}
    g1, g2 = engine.ground_many([(w1, Query(id="cup", text="the cup")), (w2, Query(id="ph", text="the phone", mode="reason"))])
    assert g1.raw_text == a1 and g1.parse_ok and g1.reasoning is None
    assert g1.detections.image_index.tolist() == [1]
    np.testing.assert_allclose(g1.detections.xyxy[0], want1, rtol=1e-5)
    assert g2.raw_text == a2 and g2.parse_ok and len(g2.detections) == 0
    assert g2.reasoning == "The phone is in the second image."
    assert engine.stats.unparseable == 0


class CountingEncoder:
    """The model's real vision tower, counting the images it encodes."""

    def __init__(self, inner: HFVisionEncoder) -> None:
        self.inner = inner
        self.images = 0
        self.calls = 0

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images += int(grid_thw.shape[0])
        return self.inner.encode(pixel_values, grid_thw)


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_token_cache_encodes_each_frame_once_and_changes_nothing(tiny_models: dict[str, Path], phone: list[Frame], family: str) -> None:
    windows = [Window(tuple(phone[i : i + 4])) for i in range(len(phone) - 3)]  # size 4, stride 1
    query = Query(id="q", text="the man")
    texts = {}
    counts = {}
    for label, cache_bytes in (("cached", 64 << 20), ("uncached", 0)):
        engine = make_engine(tiny_models[family], batch_size=2, cache_bytes=cache_bytes, generation_kwargs={"min_new_tokens": 8})
        counter = CountingEncoder(HFVisionEncoder(engine.model))
        engine.encoder = counter
        results = [g for w in windows for g in engine.ground([w], query)]  # one window per call, as a live pipeline
        texts[label] = [(g.raw_text, g.detections) for g in results]
        counts[label] = (counter.images, engine.stats.vision_images, engine.stats.cache_hits)
    n = len(phone)
    assert counts["cached"][:2] == (n, n)  # N encodings, not 4N
    assert counts["uncached"][:2] == (4 * len(windows), 4 * len(windows))
    assert counts["cached"][2] == 4 * len(windows) - n
    assert texts["cached"] == texts["uncached"]
    assert all(len(t) > 0 for t, _ in texts["cached"])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_tokens_equal_the_pixel_path_of_transformers(tiny_models: dict[str, Path], phone: list[Frame], cup: list[Frame], family: str) -> None:
    """The engine (cached visual tokens as mm_encoder_outputs) generates what model.generate(pixel_values=…) does."""
    engine = make_engine(tiny_models[family], generation_kwargs={"min_new_tokens": 10}, max_new_tokens=10)
    frames = [phone[3], cup[2], phone[4]]
    engine.visual_tokens([phone[3]])  # one frame cached alone first, the rest encoded together
    (g,) = engine.ground([Window(tuple(frames))], Query(id="q", text="the cup"))
    batch = engine.image_processor(images=[f.image for f in frames], return_tensors="pt")
    entries, _, _ = engine.visual_tokens(frames)
    ids = torch.tensor([engine._expand(engine._template_ids("the cup", 3, "direct"), entries)])
    with torch.inference_mode():
        ref = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == engine.image_token_id).int(),
            max_new_tokens=10, min_new_tokens=10, do_sample=False,
        )
        together = engine.encoder.encode(batch["pixel_values"], batch["image_grid_thw"])
    assert engine._decode(ref[0, ids.shape[1]:].tolist()) == g.raw_text
    torch.testing.assert_close(torch.cat([e.tokens for e in entries]), together, rtol=1e-5, atol=1e-5)
    assert [list(e.grid_thw) for e in entries] == batch["image_grid_thw"].tolist()


def test_prompt_renderer_matches_the_model_chat_template(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["qwen2_5_vl"])
    for vision_id in (True, False):
        for conv in FAMILIES:
            msgs = build_messages("the red cup", n_images=3, convention=conv, mode="reason")  # type: ignore[arg-type]
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, add_vision_id=vision_id) == render_chat(msgs, add_vision_id=vision_id)
    text = render_chat(build_messages("x", n_images=2, system=None))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: ")


def test_model_loading_errors_are_one_sentence(tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_models["qwen2_vl"] / "config.json", no_weights / "config.json")
    cases = {
        str(no_weights): "no weights",
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path): "no config.json",
        str(no_weights / "config.json"): "is a file",
    }
    for model, words in cases.items():
        with pytest.raises(ModelLoadError, match=words) as info:
            GemVGEngine(model)
        assert len(str(info.value).splitlines()) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        GemVGEngine("streamvg-test/not-a-model")
    assert len(str(info.value).splitlines()) == 1


def test_create_engine_dispatches_by_kind(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    engine = create_engine(EngineConfig(kind="gemvg", model=str(tiny_models["qwen2_vl"]), max_pixels=MAX_PIXELS, batch_size=2, max_new_tokens=4, device="cpu"))
    assert isinstance(engine, GemVGEngine) and engine.batch_size == 2 and engine.max_new_tokens == 4
    assert engine.image_processor.size.longest_edge == MAX_PIXELS
    engine.close()
    replay = tmp_path / "g.jsonl"
    replay.write_text(json.dumps({"camera": "a", "pts": 0.0, "query": None, "boxes": []}) + "\n")
    assert isinstance(create_engine(EngineConfig(kind="replay", replay_path=str(replay))), ReplayEngine)
    with pytest.raises(EngineUnavailableError, match="gemvg-trt"):
        create_engine(EngineConfig(kind="gemvg-trt", model=str(tiny_models["qwen2_vl"]), engine_dir=str(tmp_path)))
    from streamvg.grounding import _optional_module

    with pytest.raises(EngineUnavailableError, match="'openai' is not available"):
        _optional_module("streamvg.grounding.no_such_module", "openai")


def test_ground_command_prints_boxes_and_annotates(tiny_models: dict[str, Path], phone: list[Frame], cup: list[Frame], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cv2

    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    cv2.imwrite(str(a), phone[0].image[:, :, ::-1])
    cv2.imwrite(str(b), cup[0].image[:, :, ::-1])
    out = tmp_path / "annotated.jpg"
    rc = main(["ground", str(a), str(b), "--query", "the cup", "--model", str(tiny_models["qwen2_5_vl"]),
               "--max-pixels", str(MAX_PIXELS), "--max-new-tokens", "6", "--device", "cpu", "--json", "--annotate", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == [{"path": str(a), "width": 176, "height": 144}, {"path": str(b), "width": 640, "height": 480}]
    assert isinstance(report["parse_ok"], bool) and isinstance(report["boxes"], list) and report["model"] == "qwen2_5_vl"
    picture = cv2.imread(str(out))
    assert picture.shape == (480, round(176 * 480 / 144) + 640, 3)
    rc = main(["ground", str(tmp_path / "missing.jpg"), "--query", "x", "--model", str(tiny_models["qwen2_5_vl"])])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.jpg not found" in err and "Traceback" not in err


@pytest.mark.parametrize("family", FAMILIES)
def test_batching_gives_the_same_answers_as_one_by_one(tiny_models: dict[str, Path], phone: list[Frame], cup: list[Frame], family: str) -> None:
    """Left padding and per-row rope indices keep a batched window's answer what it is alone."""
    engine = make_engine(tiny_models[family], batch_size=5, max_new_tokens=10, generation_kwargs={"min_new_tokens": 10})
    mixed = [phone[5], cup[0], phone[6], cup[1], phone[7], cup[2]]
    windows = [Window(tuple(mixed[:n])) for n in (2, 3, 4, 5, 6)]
    query = Query(id="q", text="the man")
    batched = [g.raw_text for g in engine.ground(windows, query)]
    alone = [engine.ground([w], query)[0].raw_text for w in windows]
    assert engine.stats.batches == 6 and batched == alone


def test_frames_the_processor_refuses_fail_their_window_in_one_sentence(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["qwen2_vl"])
    thin = Frame(camera="slit", index=3, pts=0.1, image=np.zeros((2, 600, 3), np.uint8))
    (g,) = engine.ground([Window((thin,))], Query(id="q", text="x"))
    assert g.error is not None and "slit#3 600x2" in g.error and len(g.error.splitlines()) == 1
    assert engine.stats.failed_windows == 1 and len(g.detections) == 0


def test_visual_token_cache_is_an_lru_bounded_by_bytes(phone: list[Frame]) -> None:
    from streamvg.grounding.cache import CacheEntry, VisualTokenCache, content_key, frame_key

    cache = VisualTokenCache(max_bytes=3 * 16 * 8 * 4)  # three entries of 16x8 float32
    for i in range(3):
        cache.put(i, CacheEntry(torch.zeros(16, 8), (1, 8, 8)))
    assert cache.get(0) is not None  # 0 is now the most recently used
    cache.put(3, CacheEntry(torch.zeros(16, 8), (1, 8, 8)))
    assert 1 not in cache and {0, 2, 3} <= {k for k in range(4) if k in cache}
    assert cache.bytes == 3 * 16 * 8 * 4 and cache.evictions == 1 and cache.hits == 1
    cache.put(9, CacheEntry(torch.zeros(1000, 8), (1, 8, 8)))  # larger than the budget: not kept
    assert 9 not in cache and len(cache) == 3
    assert content_key(phone[0]) != content_key(phone[1])
    same = Frame(camera="other", index=99, pts=5.0, image=phone[0].image.copy())
    assert content_key(same) == content_key(phone[0]) and frame_key(same) != frame_key(phone[0])
    with pytest.raises(ValueError, match="max_bytes"):
        VisualTokenCache(-1)
