"""The pipeline survives a failing grounding engine: failed windows are skipped and counted,
a run of files stops with one sentence after too many failures in a row (keeping what was
found), and grounding resumes when a model server comes back.

The engine is the real remote (OpenAI-compatible) engine against a real HTTP server
process (`streamvg.testing.openai_server`), steered to refuse requests or killed.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from streamvg.config import (
    EngineConfig,
    PipelineConfig,
    QueryConfig,
    RedisSinkConfig,
    SamplingConfig,
    SinksConfig,
    SourceConfig,
)
from streamvg.pipeline import GroundingFailures, Pipeline
from streamvg.scaleout import GroundWorker, WindowPublisher, work_key
from streamvg.sources import open_source
from streamvg.testing.live import LiveStreamServer
from streamvg.testing.openai_server import OpenAIStubProcess
from streamvg.testing.servers import wait_until
from streamvg.testing.synthetic import write_scene
from streamvg.windows import windows

MODEL = "Qwen2.5-VL-7B-Instruct"  # the name tells the remote engine the box convention

# One box in the first image of every window (Qwen2.5-VL convention: model-input pixels).
ANSWERS: dict[str, Any] = {"answers": [], "default": '```json\n[{"bbox_2d": [20, 20, 80, 80], "label": "thing"}]\n```'}


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    scene = write_scene(tmp_path_factory.mktemp("fail") / "v", width=320, height=192, duration_s=12.0, seed=5)
    return Path(scene.cameras["cam0"])


@pytest.fixture()
def server(tmp_path: Path) -> Any:
    srv = OpenAIStubProcess(tmp_path, ANSWERS, model=MODEL)
    yield srv
    srv.stop()


def _config(video: Path, server: Any, **engine: Any) -> PipelineConfig:
    return PipelineConfig(
        name="fail",
        sources=[SourceConfig(name="cam0", uri=str(video))],
        sampling=SamplingConfig(fps=2.0, window_size=2, stride=2),
        queries=[QueryConfig(id="q", text="the thing")],
        engine=EngineConfig(kind="openai", model=MODEL, base_url=server.base_url, batch_size=1,
                            retries=0, timeout_s=5.0, **engine),
    )


WINDOWS = 12  # 12 s at 2 fps = 24 frames, windows of 2 with stride 2


def test_failed_windows_are_skipped_and_counted(video: Path, server: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="streamvg.pipeline")
    server.control(fail_next=3, fail_status=400)
    pipe = Pipeline(_config(video, server), sinks=[], collect_segments=True, control=False)
    summary = pipe.run()
    assert summary.error is None
    assert summary.windows_failed == 3
    assert summary.windows_grounded == WINDOWS - 3
    assert summary.cameras["cam0"].windows_failed == 3
    assert summary.segments, "windows after the failures were grounded and tracked"
    failing = [r.getMessage() for r in caplog.records if "grounding failed" in r.getMessage()]
    assert len(failing) == 1, failing  # one line per burst, not one per window
    assert any("recovered after 3" in r.getMessage() for r in caplog.records)


def test_files_stop_after_repeated_failures_with_one_sentence(video: Path, server: Any) -> None:
    server.control(fail_next=100, fail_status=400)
    pipe = Pipeline(_config(video, server, max_consecutive_failures=4), sinks=[], collect_segments=True, control=False)
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    summary = pipe.summary()
    assert summary.windows_failed == 4 and summary.windows_grounded == 0
    assert summary.error is not None
    assert summary.error.startswith("grounding failed for 4 windows in a row, so the run stopped; last error: ")
    assert "HTTP 400" in summary.error and "\n" not in summary.error


def test_search_cli_keeps_segments_found_before_the_engine_gave_up(video: Path, server: Any) -> None:
    """The engine dies mid-search: exit 1, one error sentence, the segments so far printed."""
    server.control(delay_s=0.3)  # slow enough for the test to turn failures on mid-run
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamvg", "search", str(video), "-q", "the thing", "--fps", "2", "--window", "2",
         "--stride", "2", "--batch-size", "1", "--engine", "openai", "--model", MODEL,
         "--base-url", server.base_url, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: server.stats()["count"] >= 4, timeout=60, what="four windows grounded")
        server.control(fail_next=1000, fail_status=400, delay_s=0.0)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    result = json.loads(out)
    assert result["segments"], "segments found before the failures are kept"
    assert result["error"].startswith("grounding failed for 5 windows in a row")
    assert result["windows_failed"] == 5
    assert "Traceback" not in err
    assert " ".join(err.split()).count("grounding failed for 5 windows in a row") == 1, err  # said once


def test_live_grounding_resumes_when_the_model_server_comes_back(video: Path, tmp_path: Path) -> None:
    """A live camera (real ffmpeg process) and a model server killed mid-run and restarted on
    its port: the run never stops (live default: no failure limit), the windows while it
    is down are counted as failed, and windows after the restart are grounded."""
    first = OpenAIStubProcess(tmp_path, ANSWERS, model=MODEL)
    second = None
    with LiveStreamServer(video, loop=True) as camera:
        cfg = _config(video, first)
        cfg.sources = [SourceConfig(name="cam0", uri=camera.url)]
        cfg.sampling = SamplingConfig(fps=4.0, window_size=2, stride=2)  # two windows a second
        pipe = Pipeline(cfg, sinks=[], control=False)
        assert pipe.failures.limit is None
        pipe.start()
        try:
            wait_until(lambda: pipe.windows_grounded >= 2, timeout=60, what="two windows grounded")
            first.stop()
            wait_until(lambda: pipe.failures.total >= 2, timeout=60, what="two windows failed while the server is down")
            second = OpenAIStubProcess(tmp_path, ANSWERS, model=MODEL, port=first.port)
            resumed_from = pipe.windows_grounded
            wait_until(lambda: pipe.windows_grounded >= resumed_from + 2, timeout=60, what="grounding resumed")
            assert not pipe.wait(0), "the pipeline is still running"
        finally:
            pipe.stop()
            if second is not None:
                second.stop()
    summary = pipe.summary()
    assert summary.error is None
    assert summary.windows_failed >= 2
    assert summary.cameras["cam0"].windows_failed == summary.windows_failed


def test_failure_budget_defaults_follow_the_sources(video: Path) -> None:
    def cfg(uri: str, limit: int | None = None) -> PipelineConfig:
        return PipelineConfig(name="x", sources=[SourceConfig(name="c", uri=uri)],
                              engine=EngineConfig(kind="replay", replay_path="x.jsonl", max_consecutive_failures=limit))

    assert Pipeline(cfg(str(video)), sinks=[]).failures.limit == 5
    assert Pipeline(cfg("rtsp://cam.local/stream"), sinks=[]).failures.limit is None
    assert Pipeline(cfg(str(video), 0), sinks=[]).failures.limit is None
    assert Pipeline(cfg("rtsp://cam.local/stream", 7), sinks=[]).failures.limit == 7


def test_failure_log_is_rate_limited_and_masks_secrets(caplog: pytest.LogCaptureFixture) -> None:
    f = GroundingFailures(limit=None, log_every_s=3600)
    for _ in range(50):
        assert not f.failed(2, ConnectionError("redis://user:hunter2@host:6379 refused"))
    assert f.total == 100 and f.consecutive == 100
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "hunter2" not in lines[0]
    f.succeeded()
    assert f.consecutive == 0
    limited = GroundingFailures(limit=3)
    assert not limited.failed(2, RuntimeError("x"))
    assert limited.failed(1, RuntimeError("x"))



def test_ground_worker_skips_and_acknowledges_failed_windows(
    video: Path, server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scale-out: a ground worker whose engine refuses some windows acknowledges and counts
    them (never retried, never stuck pending) and keeps grounding the rest. A saved tracker
    state it cannot read (corrupt, another version's) is said in a warning and ignored."""
    url = "redis://127.0.0.1:6379/0"
    name = f"failtest-{uuid.uuid4().hex[:8]}"
    cfg = _config(video, server)
    cfg.name = name
    cfg.sinks = SinksConfig(redis=RedisSinkConfig(url=url, spool_dir=str(video.parent / "spool")))
    with open_source(video, fps=2.0, camera="cam0") as src:
        wins = list(windows(src, size=2, stride=2))
    publisher = WindowPublisher(url, name)
    publisher.put(wins)
    client = redis.Redis.from_url(url)
    client.set(f"streamvg:{name}:trackstate:cam0", b"\x80\x04not a tracker state")
    server.control(fail_next=3, fail_status=400)
    worker = GroundWorker(cfg, sinks=[], lease_s=2.0)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: worker.windows_grounded + worker.failures.total >= len(wins), timeout=60,
                   what="every window grounded or skipped")
        assert worker.failures.total == 3 and worker.windows_grounded == len(wins) - 3
        assert int(client.get(f"streamvg:{name}:windows_failed") or 0) == 3
        # acknowledged = deleted from the work stream by the worker's fenced commit
        wait_until(lambda: client.xlen(work_key(name, "cam0")) == 0, timeout=10, what="every window acknowledged")
        assert "the saved tracker state of camera 'cam0' is unreadable" in caplog.text
    finally:
        stop.set()
        thread.join(10)
        worker.close()
        publisher.close()
        for key in client.scan_iter(match=f"streamvg:{name}:*"):
            client.delete(key)
        client.close()
