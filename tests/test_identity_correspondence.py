"""The correspondence request: prompt in MIG-Bench's multi-view style, the marked reference
image, answers read per target camera, and tiny models of both families end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.config import (
    EngineConfig,
    IdentityConfig,
    PipelineConfig,
    QueryConfig,
    SamplingConfig,
    SourceConfig,
)
from streamvg.grounding.prompts import render_chat
from streamvg.grounding.remote import smart_resize
from streamvg.identity import (
    CorrespondenceRequest,
    correspondence_text,
    is_correspondence,
    mark_box,
    parse_correspondence,
)
from streamvg.identity.correspondence import MARK_RGB, build_correspondence_messages, read_answer
from streamvg.pipeline.identity_stage import IdentityStage
from streamvg.types import Detections, Frame, Query, Window

MIG = Path(__file__).resolve().parent / "data" / "migbench" / "MIG_sample.json"


def frames(w: int = 160, h: int = 96) -> list[Frame]:
    rng = np.random.default_rng(0)
    out = []
    for k, cam in enumerate(["cam0", "cam1", "cam2"]):
        img = rng.integers(0, 255, size=(h + 8 * k, w, 3), dtype=np.uint8)
        out.append(Frame(cam, 10 + k, 2.0, img))
    return out


def test_the_question_is_worded_like_mig_bench_multi_view_items() -> None:
    items = [i for i in json.loads(MIG.read_text()) if i["task"] == "multi_view"]
    assert items
    box_re = r"<\|box_start\|>\(\d+,\d+\),\(\d+,\d+\)<\|box_end\|>"
    for item in items:
        target = int(re.search(r"in the (\d+)th image", item["question"]).group(1))  # type: ignore[union-attr]
        ours = correspondence_text((10, 10, 50, 50), (100, 100), targets=[target], convention="qwen2_vl")
        # Same sentence, box aside: what the model was trained on.
        assert re.sub(box_re, "BOX", ours) == re.sub(box_re, "BOX", item["question"]).strip()
    assert is_correspondence(ours) and not is_correspondence("the red cup")


def test_the_reference_box_is_written_in_each_family_s_convention() -> None:
    q2 = correspondence_text((32, 24, 96, 72), (640, 480), targets=[2, 3], convention="qwen2_vl")
    assert "<|box_start|>(50,50),(150,150)<|box_end|>" in q2 and "the 2th image and the 3th image." in q2
    q25 = correspondence_text((32, 24, 96, 72), (640, 480), targets=[2], convention="qwen2_5_vl", input_size=(320, 240))
    assert '{"bbox_2d": [16, 12, 48, 36]}' in q25
    with pytest.raises(ValueError, match="image numbers >= 2"):
        correspondence_text((0, 0, 1, 1), (10, 10), targets=[1])


def test_the_reference_image_has_the_box_drawn_in_red_and_a_cache_safe_index() -> None:
    f = frames()
    before = f[0].image.copy()
    img = mark_box(f[0].image, (20, 10, 60, 50), thickness=2)
    assert (img[10, 30] == MARK_RGB).all() and (img[49, 30] == MARK_RGB).all() and (img[30, 21] == MARK_RGB).all()
    assert (img[30, 40] == f[0].image[30, 40]).all()  # inside untouched
    assert np.array_equal(f[0].image, before)  # the original is not modified
    req = CorrespondenceRequest.build(query_id="q", ref=f[0], track_id=4, ref_xyxy=(20, 10, 60, 50), others=f[1:], window_id="w")
    assert req.window.frames[0].index == -(f[0].index + 1) and req.window.frames[0].camera == "cam0"
    assert req.targets == ("cam1", "cam2") and req.query.id == "q~same"
    msgs = build_correspondence_messages(req)
    text = render_chat(msgs)
    assert text.count("<|image_pad|>") == 3 and "Recognize and locate this object in the 2th image and the 3th image." in text


def test_answers_are_read_per_target_camera() -> None:
    f = frames()
    req = CorrespondenceRequest.build(query_id="q", ref=f[0], track_id=4, ref_xyxy=(20, 10, 60, 50), others=f[1:2], window_id="w")
    sizes = req.window.frame_sizes
    # Qwen2-VL answer that names the image.
    got = parse_correspondence("Image 2: <|box_start|>(100,100),(500,500)<|box_end|>", req)
    w, h = sizes[1]
    assert got["cam1"] == pytest.approx((w * 0.1, h * 0.1, w * 0.5, h * 0.5), abs=0.01)
    # MIG-style answer with no image named: the single target's, rescaled from the reference size.
    got = parse_correspondence("<|box_start|>(100,100),(500,500)<|box_end|>", req)
    assert got["cam1"] == pytest.approx((w * 0.1, h * 0.1, w * 0.5, h * 0.5), abs=0.5)
    # An echo of the reference box is not an answer; two boxes in one target are ambiguous.
    rw, rh = sizes[0]
    echo = f"<|box_start|>({round(20 / rw * 1000)},{round(10 / rh * 1000)}),({round(60 / rw * 1000)},{round(50 / rh * 1000)})<|box_end|>"
    assert parse_correspondence(echo, req) == {"cam1": None}
    two = "Image 2: <|box_start|>(1,1),(100,100)<|box_end|> Image 2: <|box_start|>(300,300),(600,600)<|box_end|>"
    assert parse_correspondence(two, req) == {"cam1": None}
    assert read_answer(req, Detections.empty()) == {"cam1": None}


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300) | st.builds(lambda a, b: f"Image {a}: [{b}, 5, 60, 70] {a}th image", st.integers(-3, 9), st.integers(-50, 900)))
def test_no_answer_text_makes_the_reader_raise(text: str) -> None:
    f = frames()
    req = CorrespondenceRequest.build(query_id="q", ref=f[0], track_id=1, ref_xyxy=(5, 5, 30, 30), others=f[1:], window_id="w")
    got = parse_correspondence(text, req, convention="qwen2_vl")
    assert set(got) == {"cam1", "cam2"}
    for box in got.values():
        assert box is None or (box[0] <= box[2] and box[1] <= box[3])


# --- tiny models of both families, end to end ---------------------------------------


def _stage(**identity: Any) -> IdentityStage:
    cfg = PipelineConfig(
        name="t", sources=[SourceConfig(name=c, uri=f"{c}.mp4") for c in ("cam0", "cam1", "cam2")],
        sampling=SamplingConfig(multi_camera=True), queries=[QueryConfig(id="q", text="a shape")],
        engine=EngineConfig(max_pixels=112 * 112), identity=IdentityConfig(**identity),
    )
    return IdentityStage(cfg, publish=lambda e: None)


def _tracked() -> dict[int, Detections]:
    return {
        0: Detections(np.array([[20, 10, 60, 50]], np.float32), track_id=np.array([0])),
        1: Detections(np.array([[30, 20, 70, 60], [100, 40, 150, 90]], np.float32), track_id=np.array([3, 4])),
        2: Detections(np.array([[5, 5, 40, 40]], np.float32), track_id=np.array([7])),
    }


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_tiny_models_run_correspondence_requests_end_to_end(tiny_models: dict[str, Path], family: str) -> None:
    from streamvg.grounding.hf import GemVGEngine
    from tests.test_grounding import forcing  # the same forced-decoding helper the engine tests use

    engine = GemVGEngine(tiny_models[family], device="cpu", max_pixels=112 * 112, max_new_tokens=12, batch_size=4)
    window = Window(tuple(frames()))
    query = Query("q", "a shape")

    # Random weights, random answers: requests go through, nothing raises, no vote is invented
    # from an answer that points at no tracked box.
    stage = _stage(max_requests_per_window=2)
    stage.bind_engine(engine)
    stage.observe(window, query, _tracked())
    assert stage.pending == 2  # four tracks, the budget allows two requests
    stage.ask(engine, batch_size=2)
    assert stage.stats.requests == 2 and stage.stats.requests_failed == 0

    # A forced answer: cam0's track 0 is cam1's track 3, and cam2's track 7 is not it.
    stage = _stage(max_requests_per_window=1)
    stage.bind_engine(engine)
    stage.observe(window, query, _tracked())
    assert stage.pending == 1
    f = window.frames
    if family == "qwen2_vl":
        def rel(b: tuple[int, ...], fr: Frame) -> str:
            w, h = fr.size
            return f"<|box_start|>({round(b[0] / w * 1000)},{round(b[1] / h * 1000)}),({round(b[2] / w * 1000)},{round(b[3] / h * 1000)})<|box_end|>"
        answer = f"Image 2: {rel((30, 20, 70, 60), f[1])} Image 3: {rel((60, 50, 100, 80), f[2])}"
    else:
        def px(b: tuple[int, ...], fr: Frame) -> list[int]:
            ih, iw = smart_resize(fr.height, fr.width, max_pixels=112 * 112)
            return [round(b[0] * iw / fr.width), round(b[1] * ih / fr.height), round(b[2] * iw / fr.width), round(b[3] * ih / fr.height)]
        answer = json.dumps([{"bbox_2d": px((30, 20, 70, 60), f[1]), "image": 2}, {"bbox_2d": px((60, 50, 100, 80), f[2]), "image": 3}])
    eos = engine.eos_ids[0]
    engine.max_new_tokens = 160
    engine.generation_kwargs["prefix_allowed_tokens_fn"] = forcing(engine.tokenizer, [answer], eos)
    stage.ask(engine, batch_size=1)
    lk = stage.linker("q")
    ev = lk.evidence[(("cam0", 0), ("cam1", 3))]
    assert (ev.agree, ev.contradict) == (1, 0)
    assert lk.evidence[(("cam0", 0), ("cam1", 4))].contradict == 1  # the other cam1 track: not it
    assert lk.evidence[(("cam0", 0), ("cam2", 7))].contradict == 1  # answered box overlaps no track 7
    engine.close()


class _FailingEngine:
    """A fake engine whose every request raises (a model server that is down)."""

    name = "down"

    def ground_many(self, requests: Any) -> Any:
        from streamvg.errors import GroundingError

        raise GroundingError("model server http://gpu:8000 refused the connection")


def test_failed_or_unanswerable_requests_are_counted_not_raised(tmp_path: Path) -> None:
    from streamvg.grounding.replay import ReplayEngine

    window, query = Window(tuple(frames())), Query("q", "a shape")
    stage = _stage(max_requests_per_window=3)
    stage.observe(window, query, _tracked())
    stage.ask(_FailingEngine(), batch_size=2)  # type: ignore[arg-type]
    assert stage.stats.requests_failed == 3 and stage.stats.requests == 0 and stage.pending == 0
    stage.observe(window, query, _tracked())
    stage.ask(ReplayEngine([]), batch_size=2)
    assert stage.stats.skipped_engine == 3  # stored boxes cannot answer "which one is the same"


def test_identity_state_survives_export_and_refuses_garbage() -> None:
    stage = _stage()
    for w in range(3):
        stage.linker("q").vote(("cam0", 0), ("cam1", 3), agree=True, window=f"w{w}")
    gid = stage.global_id("q", "cam1", 3)
    other = _stage()
    other.import_state(stage.export_state())
    assert other.global_id("q", "cam1", 3) == gid == other.global_id("q", "cam0", 0)
    assert other.global_id("q", "cam2", 9) not in {gid}  # new tracks get fresh ids after the hand-over
    with pytest.raises(ValueError, match="identity state is unreadable"):
        other.import_state(b'{"format": "streamvg.identitystate/v1"}')
    with pytest.raises(ValueError, match="identity state is unreadable"):
        other.import_state(b"\x00 not json")
