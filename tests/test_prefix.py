"""Shared visual prefix: several queries of a window in one batch answer exactly as each alone.

Tiny random Qwen2.5-VL and Qwen2-VL models saved and loaded like a user's model, frames of
real decoded video (carphone 176x144, cup 640x480: windows of mixed sizes). Hypothesis picks
the windows (1-4 frames, 1-2 per batch) and the queries (1-8); the batched, shared-prefix
answers must equal the per-query path (each request its own prompt and prefill) token for
token, and the prefill must count each window's prefix once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamvg.grounding.hf import GemVGEngine
from streamvg.types import Frame, Query, Window

MEDIA = Path(__file__).resolve().parent / "media"
FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
TEXTS = ["the man", "a red phone on the left", "the car window", "his face", "a tree outside",
         "the seat belt", "the sky.", "the hand holding the phone?"]


def _decode(name: str, n: int) -> list[Frame]:
    with av.open(str(MEDIA / name)) as c:
        return [Frame(camera=Path(name).stem, index=i, pts=float(f.time), image=f.to_ndarray(format="rgb24"))
                for i, f in zip(range(n), c.decode(video=0), strict=False)]


@pytest.fixture(scope="module")
def frames() -> list[Frame]:
    phone, cup = _decode("carphone.mp4", 4), _decode("cup.mp4", 2)
    return [phone[0], cup[0], phone[1], phone[2], cup[1], phone[3]]


@pytest.fixture(scope="module")
def engines(tiny_models: dict[str, Path]) -> dict[str, GemVGEngine]:
    return {f: GemVGEngine(tiny_models[f], device="cpu", max_pixels=112 * 112, max_new_tokens=6, batch_size=32,
                           generation_kwargs={"min_new_tokens": 6}) for f in FAMILIES}


def _prefix_len(engine: GemVGEngine, window: Window, query: Query) -> int:
    entries, _, _ = engine.visual_tokens(list(window.frames))
    row = engine._expand(engine._template_ids(query.text, len(window), query.mode), entries)
    vision_end = engine.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    return max(i for i, t in enumerate(row) if t == vision_end) + 1


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_shared_prefix_answers_equal_the_per_query_path_token_for_token(
    engines: dict[str, GemVGEngine], frames: list[Frame], family: str, data: Any
) -> None:
    engine = engines[family]
    n_windows = data.draw(st.integers(1, 2), label="windows")
    windows = []
    for _ in range(n_windows):
        size = data.draw(st.integers(1, 4), label="frames")
        start = data.draw(st.integers(0, len(frames) - size), label="start")
        windows.append(Window(tuple(frames[start : start + size])))
    n_q = data.draw(st.integers(1, 8), label="queries")
    queries = [Query(id=f"q{i}", text=TEXTS[i], mode="reason" if i == 7 else "direct") for i in range(n_q)]
    requests = [(w, q) for w in windows for q in queries]

    before = (engine.stats.prefill_tokens, engine.stats.shared_prefix_requests)
    batched = engine.ground_many(requests)
    shared_prefill = engine.stats.prefill_tokens - before[0]
    shared_rows = engine.stats.shared_prefix_requests - before[1]
    engine.share_prefix = False  # the per-query path: every request its own prompt and prefill
    try:
        alone = engine.ground_many(requests)
    finally:
        engine.share_prefix = True
    for (w, q), b, a in zip(requests, batched, alone, strict=True):
        assert b.raw_text == a.raw_text, f"{family}: window of {len(w)} frames, query {q.id}"
        assert b.detections.xyxy.tolist() == a.detections.xyxy.tolist() and b.parse_ok == a.parse_ok
        assert b.usage["generated_tokens"] == a.usage["generated_tokens"] > 0
    # Prefill: each distinct window's prefix once, every query's own suffix.
    distinct = {tuple(f.index for f in w.frames) + tuple(f.camera for f in w.frames): w for w in windows}
    saved = sum((n_q - 1) * _prefix_len(engine, w, queries[0]) for w in distinct.values())
    saved += sum(n_q * _prefix_len(engine, w, queries[0]) for w in windows[len(distinct):])  # a repeated window
    if len(requests) > len(distinct):
        assert shared_rows == len(requests) - len(distinct)
        assert shared_prefill == sum(a.usage["prefill_tokens"] for a in alone) - saved
    else:  # one request per window: nothing to share, the plain path ran
        assert shared_rows == 0 and shared_prefill == sum(a.usage["prefill_tokens"] for a in alone)
    assert sum(b.usage["prefill_tokens"] for b in batched) == shared_prefill


@pytest.mark.parametrize("family", FAMILIES)
def test_four_queries_on_a_four_frame_window_prefill_the_images_once(
    tiny_models: dict[str, Path], frames: list[Frame], family: str
) -> None:
    # Realistic visual geometry (448x448 inputs: 256 visual tokens per frame), so the images
    # are most of the prompt, as with a 7B model.
    engine = GemVGEngine(tiny_models[family], device="cpu", max_pixels=448 * 448, min_pixels=448 * 448,
                         max_new_tokens=4, generation_kwargs={"min_new_tokens": 4})
    w = Window(tuple(frames[2:6]))
    qs = [Query(id=f"q{i}", text=TEXTS[i]) for i in range(4)]
    engine.cache.clear()
    one = engine.ground_many([(w, qs[0])])[0]
    four = engine.ground_many([(w, q) for q in qs])
    p = _prefix_len(engine, w, qs[0])
    assert one.usage["images_encoded"] == 4 and four[0].usage["images_cached"] == 4  # cached since the first call
    total = sum(g.usage["prefill_tokens"] for g in four)
    assert total == one.usage["prefill_tokens"] + sum(g.usage["prefill_tokens"] for g in four[1:])
    assert all(g.usage["prefill_tokens"] < one.usage["prefill_tokens"] - p + 40 for g in four[1:])
    assert total < 1.5 * one.usage["prefill_tokens"], (total, one.usage)
    alone = [engine.ground_many([(w, q)])[0] for q in qs]
    assert [g.raw_text for g in four] == [g.raw_text for g in alone]
    assert engine.stats.shared_prefix_requests == 3


def test_remote_engine_sends_the_window_first_and_byte_identical_so_servers_reuse_it(
    frames: list[Frame], tmp_path: Path
) -> None:
    """The remote engine's requests for four queries of one window agree byte for byte up to
    the question: a prefix-caching server (the stub server counts the shared bytes as vLLM
    counts cached tokens) prefills the images once."""
    import json

    from streamvg.grounding.remote import OpenAIEngine
    from streamvg.testing.openai_server import OpenAIStubProcess

    w = Window(tuple(frames[2:6]))
    qs = [Query(id=f"q{i}", text=TEXTS[i]) for i in range(4)]
    srv = OpenAIStubProcess(tmp_path, {"answers": [], "default": "[]"}, model="Qwen2.5-VL-7B-Instruct")
    try:
        with OpenAIEngine(srv.base_url, model="Qwen2.5-VL-7B-Instruct", max_pixels=448 * 448, concurrency=1) as engine:
            bodies = [json.dumps(engine._body(w, q)[0]["messages"], separators=(",", ":")) for q in qs]
            out = engine.ground_many([(w, q) for q in qs])
    finally:
        srv.stop()
    question = bodies[0].index(TEXTS[0])
    assert all(b[:question] == bodies[0][:question] for b in bodies)  # system, images: identical bytes
    assert bodies[0][:question].count("\"type\":\"image_url\"") == 4 and "image_url" not in bodies[0][question:]
    first, rest = out[0].usage["prefill_tokens"], [g.usage["prefill_tokens"] for g in out[1:]]
    assert all(r < first / 10 for r in rest), (first, rest)  # the images were "cached" after the first query
    assert all(g.usage["generated_tokens"] > 0 for g in out)
