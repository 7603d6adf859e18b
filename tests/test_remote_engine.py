"""The `openai` engine against a real HTTP server process speaking the OpenAI protocol.

`streamvg.testing.openai_server` runs as a subprocess on a free port; it answers in the
box convention asked, measuring the coloured object in the very JPEG it received, so the
tests check that boxes come back on the right original-frame pixels whatever resize the
engine did. Timeouts, 5xx retries, refused keys and concurrency are exercised over real
sockets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamvg.config import EngineConfig
from streamvg.errors import ConfigError, GroundingError
from streamvg.grounding import create_engine
from streamvg.grounding.prompts import build_messages, render_chat
from streamvg.grounding.remote import OpenAIEngine, resolve_convention, smart_resize
from streamvg.testing.openai_server import OpenAIStubProcess as StubServer
from streamvg.testing.servers import free_port, wait_until
from streamvg.types import Frame, Query, Window

MODEL = "Qwen2.5-VL-7B-Instruct"
RED, BLUE = "FF0000", "0000FF"


def _qwen25(color: str, n: int) -> str:
    items = ", ".join(
        f'{{"bbox_2d": [{{box:{k}:{color}}}], "label": "thing", "image": {k + 1}}}' for k in range(n)
    )
    return f"```json\n[{items}]\n```"


def _qwen2(color: str, n: int) -> str:
    return " ".join(
        f"Image {k + 1}: <|object_ref_start|>thing<|object_ref_end|><|box_start|>{{pairs1000:{k}:{color}}}<|box_end|>"
        for k in range(n)
    )


ANSWERS: dict[str, Any] = {
    "answers": [
        {"match": "red square", "text": _qwen25(RED, 3)},
        {"match": "blue bar", "text": _qwen25(BLUE, 3)},
        {"match": "gibberish", "text": "I am not sure what you mean."},
        {"match": "think", "text": "<think>the red square is on the left</think><answer>[]</answer>"},
    ],
    "default": "[]",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StubServer]:
    srv = StubServer(tmp_path_factory.mktemp("openai"), ANSWERS, model=MODEL)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        srv: StubServer = request.getfixturevalue("server")
        srv.control(reset=True, delay_s=0.0, fail_next=0, fail_status=503, api_key="")


def _frame(i: int, size: tuple[int, int], boxes: dict[str, tuple[int, int, int, int]]) -> Frame:
    w, h = size
    img = np.full((h, w, 3), 60, np.uint8)
    for color, (x1, y1, x2, y2) in boxes.items():
        img[y1:y2, x1:x2] = [int(color[j : j + 2], 16) for j in (0, 2, 4)]
    return Frame("cam", i, i * 0.5, img)


# Frames of three sizes in one window: 1280x720 (shrunk), 176x144 (enlarged to min_pixels)
# and 640x480; red and blue objects at known pixels.
SIZES = [(1280, 720), (176, 144), (640, 480)]
RED_BOXES = [(100, 200, 300, 420), (20, 30, 90, 100), (400, 50, 620, 200)]
BLUE_BOXES = [(900, 500, 1200, 700), (120, 100, 170, 140), (10, 300, 200, 470)]


def _window(offset: int = 0) -> Window:
    frames = tuple(
        _frame(offset + k, SIZES[k], {RED: RED_BOXES[k], BLUE: BLUE_BOXES[k]}) for k in range(3)
    )
    return Window(frames)


def _engine(server: StubServer, **kw: Any) -> OpenAIEngine:
    kw.setdefault("model", MODEL)
    kw.setdefault("min_pixels", 112 * 112)
    kw.setdefault("max_pixels", 448 * 448)
    kw.setdefault("timeout_s", 10.0)
    return OpenAIEngine(server.base_url, **kw)


def _assert_on_pixels(engine: OpenAIEngine, det_xyxy: np.ndarray, image_index: np.ndarray,
                      truth: list[tuple[int, int, int, int]], *, relative: bool = False) -> None:
    assert image_index.tolist() == [0, 1, 2]
    for k in range(3):
        fw, fh = SIZES[k]
        iw, ih = engine.input_size(SIZES[k])
        # one model-input pixel (or one 0-1000 step), plus a pixel of JPEG/resampling blur
        tol_x = (fw / 1000 if relative else 0) + 1.5 * fw / iw + 1
        tol_y = (fh / 1000 if relative else 0) + 1.5 * fh / ih + 1
        got, want = det_xyxy[k], np.array(truth[k], np.float64)
        assert abs(got[0] - want[0]) <= tol_x and abs(got[2] - want[2]) <= tol_x, (k, got, want)
        assert abs(got[1] - want[1]) <= tol_y and abs(got[3] - want[3]) <= tol_y, (k, got, want)


def test_smart_resize_matches_transformers() -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    for h, w in [(720, 1280), (144, 176), (480, 640), (1080, 1920), (37, 999), (28, 28), (2000, 30), (333, 4000)]:
        for lo, hi in [(56 * 56, 448 * 448), (112 * 112, 448 * 448), (3136, 12845056), (256 * 28 * 28, 1280 * 28 * 28)]:
            assert smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf_smart_resize(h, w, min_pixels=lo, max_pixels=hi)


def test_boxes_land_on_original_pixels_qwen25(server: StubServer) -> None:
    with _engine(server) as engine:
        assert engine.convention == "qwen2_5_vl"  # from the model id
        red, blue = engine.ground_many([(_window(), Query("r", "the red square")), (_window(), Query("b", "the blue bar"))])
    assert red.parse_ok and blue.parse_ok
    _assert_on_pixels(engine, red.detections.xyxy, red.detections.image_index, RED_BOXES)
    _assert_on_pixels(engine, blue.detections.xyxy, blue.detections.image_index, BLUE_BOXES)
    sent = server.stats()["requests"]
    assert len(sent) == 2
    for req in sent:
        sizes = [tuple(s) for s in req["image_sizes"]]
        assert sizes == [engine.input_size(s) for s in SIZES]
        for w, h in sizes:
            assert w % 28 == 0 and h % 28 == 0 and 112 * 112 <= w * h <= 448 * 448
        assert req["model"] == MODEL


def test_sent_images_pass_the_servers_own_resize_unchanged(server: StubServer) -> None:
    """What vLLM's Qwen2-VL processor (default 3136..12845056 pixels) makes of the images
    the engine sends: the same size, so the input size the parser uses is exact."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    with _engine(server) as engine:
        for size in [*SIZES, (1920, 1080), (352, 288)]:
            w, h = engine.input_size(size)
            out = processor(images=[np.zeros((h, w, 3), np.uint8)], return_tensors="np")
            _, gh, gw = out["image_grid_thw"][0].tolist()
            assert (gw * 14, gh * 14) == (w, h)


def test_boxes_land_on_original_pixels_qwen2(tmp_path: Path) -> None:
    answers = {"answers": [{"match": "red", "text": _qwen2(RED, 3)}], "default": "None"}
    srv = StubServer(tmp_path, answers, model="Qwen2-VL-7B-Instruct")
    try:
        with OpenAIEngine(srv.base_url, min_pixels=112 * 112, max_pixels=448 * 448) as engine:
            assert engine.model == "Qwen2-VL-7B-Instruct"  # asked from GET /models
            assert engine.convention == "qwen2_vl"
            g = engine.ground([_window()], Query("r", "the red square"))[0]
        assert g.parse_ok, g.raw_text
        _assert_on_pixels(engine, g.detections.xyxy, g.detections.image_index, RED_BOXES, relative=True)
        assert "<|box_start|>" in srv.stats()["requests"][0]["prompt"]  # the qwen2_vl answer format was asked
    finally:
        srv.stop()


def test_prompt_is_the_hf_engines_prompt(server: StubServer) -> None:
    """Rendered by a server's chat template (no vision ids), the request equals the prompt
    the transformers engine renders (with "Picture k:" vision ids)."""
    with _engine(server) as engine:
        for mode in ("direct", "reason"):
            query = Query("r", "the red square", mode=mode)  # type: ignore[arg-type]
            body, _ = engine._body(_window(), query)
            server_side = render_chat(body["messages"], add_vision_id=False)
            hf_side = render_chat(build_messages(query.text, n_images=3, convention="qwen2_5_vl", mode=mode))
            assert server_side == hf_side
            images = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
            assert len(images) == 3 and all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in images)


def test_5xx_is_retried(server: StubServer) -> None:
    server.control(fail_next=2, fail_status=503)
    with _engine(server, retries=3) as engine:
        g = engine.ground([_window()], Query("r", "the red square"))[0]
    assert g.parse_ok and len(g.detections) == 3
    st = server.stats()
    assert st["failures_served"] == 2 and st["count"] == 3


def test_429_is_retried(server: StubServer) -> None:
    server.control(fail_next=1, fail_status=429)
    with _engine(server, retries=1) as engine:
        g = engine.ground([_window()], Query("r", "the red square"))[0]
    assert len(g.detections) == 3 and server.stats()["count"] == 2


def test_retries_are_bounded(server: StubServer, caplog: pytest.LogCaptureFixture) -> None:
    server.control(fail_next=100, fail_status=502)
    with _engine(server, retries=2) as engine, pytest.raises(GroundingError) as err, caplog.at_level(logging.WARNING):
        engine.ground([_window()], Query("r", "the red square"))
    msg = str(err.value)
    assert "HTTP 502" in msg and f"127.0.0.1:{server.port}" in msg and "3 attempts" in msg
    assert server.stats()["count"] == 3
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


def test_timeout_then_retry_succeeds(server: StubServer) -> None:
    server.control(delay_s=2.0, delay_next=1)
    with _engine(server, timeout_s=0.5, retries=1) as engine:
        g = engine.ground([_window()], Query("r", "the red square"))[0]
    assert len(g.detections) == 3
    assert server.stats()["count"] == 2


def test_timeout_gives_one_sentence(server: StubServer) -> None:
    server.control(delay_s=2.0)
    with _engine(server, timeout_s=0.4, retries=0) as engine, pytest.raises(GroundingError) as err:
        engine.ground([_window()], Query("r", "the red square"))
    assert "did not answer within 0.4 s" in str(err.value) and "engine.timeout_s" in str(err.value)


def test_unreachable_server_names_the_masked_url(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here
    url = f"http://user:s3cr3t-pw@127.0.0.1:{port}/v1"
    with (
        caplog.at_level(logging.DEBUG),
        pytest.raises(GroundingError) as err,
        OpenAIEngine(url, model=MODEL, retries=1, api_key="sk-never-shown") as engine,
    ):
        engine.ground([_window()], Query("r", "the red square"))
    msg = str(err.value)
    assert "unreachable" in msg and f"http://user:***@127.0.0.1:{port}/v1" in msg and "engine.base_url" in msg
    assert msg.count(".") <= 4 and "\n" not in msg
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("s3cr3t-pw", "sk-never-shown"):
        assert secret not in msg and secret not in logged


def test_api_key_is_sent_and_refusal_is_clear(server: StubServer) -> None:
    server.control(api_key="sk-right")
    with _engine(server, api_key="sk-right") as engine:
        assert len(engine.ground([_window()], Query("r", "the red square"))[0].detections) == 3
    assert server.stats()["requests"][-1]["authorized"] is True
    with _engine(server, api_key="sk-wrong", retries=3) as engine, pytest.raises(GroundingError) as err:
        engine.ground([_window()], Query("r", "the red square"))
    assert "HTTP 401" in str(err.value) and "engine.api_key" in str(err.value) and "sk-wrong" not in str(err.value)
    assert server.stats()["count"] == 2  # a refused key is not retried


def test_unknown_model_is_not_retried(server: StubServer) -> None:
    with _engine(server, model="Qwen2.5-VL-other", retries=3) as engine, pytest.raises(GroundingError) as err:
        engine.ground([_window()], Query("r", "the red square"))
    assert "HTTP 404" in str(err.value) and "engine.model" in str(err.value)
    assert server.stats()["count"] == 1


def test_concurrency_limit(server: StubServer) -> None:
    # requests abandoned by the timeout tests may still be sleeping in the server
    wait_until(lambda: server.stats()["in_flight"] == 0, timeout=15, what="the server to finish old requests")
    server.control(reset=True, delay_s=0.3)
    requests = [(_window(10 * i), Query("r", "the red square")) for i in range(8)]
    with _engine(server, concurrency=4) as engine:
        out = engine.ground_many(requests)
    peak = server.stats()["peak_in_flight"]
    assert 2 <= peak <= 4
    assert [g.window_id for g in out] == [w.id for w, _ in requests]
    server.control(reset=True)
    with _engine(server, concurrency=1) as engine:
        engine.ground_many(requests[:3])
    assert server.stats()["peak_in_flight"] == 1


def test_mixed_queries_keep_order_and_unparseable_is_flagged(server: StubServer) -> None:
    w1, w2 = _window(0), _window(100)
    reqs = [(w1, Query("b", "the blue bar")), (w2, Query("x", "gibberish")), (w2, Query("r", "the red square")),
            (w1, Query("t", "think about it", mode="reason"))]
    with _engine(server) as engine:
        out = engine.ground_many(reqs)
        assert engine.stats.windows == 4 and engine.stats.unparseable == 1 and engine.stats.batches == 1
    assert [(g.window_id, g.query_id) for g in out] == [(w.id, q.id) for w, q in reqs]
    _assert_on_pixels(engine, out[0].detections.xyxy, out[0].detections.image_index, BLUE_BOXES)
    assert not out[1].parse_ok and len(out[1].detections) == 0 and out[1].raw_text == "I am not sure what you mean."
    _assert_on_pixels(engine, out[2].detections.xyxy, out[2].detections.image_index, RED_BOXES)
    assert out[3].parse_ok and len(out[3].detections) == 0 and out[3].reasoning == "the red square is on the left"
    assert set(out[0].timings) == {"prepare", "vision", "generate", "parse", "total"}


def test_server_restart_between_requests(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A kept-alive connection to a server that went away and came back is replaced at
    once, without spending a retry."""
    first = StubServer(tmp_path, ANSWERS, model=MODEL)
    with _engine(first, retries=0) as engine:
        assert len(engine.ground([_window()], Query("r", "the red square"))[0].detections) == 3
        first.stop()
        second = StubServer(tmp_path, ANSWERS, model=MODEL, port=first.port)
        try:
            with caplog.at_level(logging.WARNING):
                assert len(engine.ground([_window()], Query("r", "the red square"))[0].detections) == 3
            assert second.stats()["count"] == 1
            assert not [r for r in caplog.records if "retry" in r.getMessage()]
        finally:
            second.stop()


def test_create_engine_from_config(server: StubServer) -> None:
    cfg = EngineConfig(kind="openai", base_url=server.base_url, model=MODEL, timeout_s=5, retries=1, concurrency=2,
                       min_pixels=112 * 112, max_pixels=448 * 448)
    engine = create_engine(cfg)
    try:
        assert isinstance(engine, OpenAIEngine) and engine.concurrency == 2 and engine.name == "openai"
        assert len(engine.ground([_window()], Query("r", "the red square"))[0].detections) == 3
    finally:
        engine.close()
    with pytest.raises(GroundingError, match="closed"):
        engine.ground([_window()], Query("r", "the red square"))


def test_resolve_convention(tmp_path: Path) -> None:
    model_dir = tmp_path / "gem-vg-7b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert resolve_convention("auto", str(model_dir)) == "qwen2_vl"
    assert resolve_convention("auto", "Qwen/Qwen2.5-VL-7B-Instruct") == "qwen2_5_vl"
    assert resolve_convention("qwen2_vl", "Qwen/Qwen2.5-VL-7B-Instruct") == "qwen2_vl"
    with pytest.raises(ConfigError, match=r"engine\.convention"):
        resolve_convention("auto", "gem-vg-7b")


def test_bad_base_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"engine\.base_url"):
        OpenAIEngine("ftp://host/v1", model=MODEL)
