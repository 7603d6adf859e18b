"""Stopping while the model generates: between tokens, never an abort.

A tiny random-weight Qwen2-VL whose generation config suppresses its end tokens (a real
`generate` feature), so every answer runs to `max_new_tokens` and a window takes far
longer than any test waits: a stop always lands while the model is generating. Before
the fix, a monitor stopped there aborted in torch ("terminate called without an active
exception", exit 134).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from streamvg.testing.servers import wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def endless_model(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    folder = tmp_path_factory.mktemp("endless") / "model"
    shutil.copytree(tiny_models["qwen2_vl"], folder)
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["suppress_tokens"] = gen["eos_token_id"]  # never ends by itself: runs to max_new_tokens
    gen_path.write_text(json.dumps(gen))
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from streamvg.testing.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("clip"), width=224, height=160, duration_s=4.0, seed=2).cameras["cam0"]


def _config(model: Path, clip: Path, events: Path) -> dict[str, Any]:
    return {
        "name": "shutdown-test",
        "sources": [{"name": "cam0", "uri": str(clip)}],
        "sampling": {"fps": 1.0, "window_size": 2, "stride": 2},
        "queries": [{"id": "q", "text": "the thing"}],
        "engine": {"kind": "gemvg", "model": str(model), "device": "cpu", "batch_size": 1, "max_new_tokens": 3000,
                   "max_pixels": 112 * 112, "min_pixels": 56 * 56},
        "sinks": {"jsonl": {"path": str(events)}},
    }


def _decoding(thread: threading.Thread) -> bool:
    """The engine thread is inside generate's token loop (past the prompt's prefill)."""
    frame = sys._current_frames().get(thread.ident or -1)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return "generate" in names and "_prefill" not in names and "_run_batch" in names


def test_stop_ends_a_running_generate_between_tokens(endless_model: Path, clip: Path, tmp_path: Path) -> None:
    from streamvg.config import parse_pipeline
    from streamvg.pipeline import Pipeline

    cfg = parse_pipeline(_config(endless_model, clip, tmp_path / "events.jsonl"), env=False)
    pipe = Pipeline(cfg, control=False)
    pipe.start()
    engine_thread = pipe._engine_thread
    try:
        wait_until(lambda: _decoding(engine_thread), timeout=120, what="the model generating tokens")
        t0 = time.monotonic()
        pipe.stop(timeout=30.0)
        stop_s = time.monotonic() - t0
    finally:
        pipe.stop()
    assert not engine_thread.is_alive(), "generate stopped at a token, so the engine thread ended"
    assert stop_s < 5.0, f"stop took {stop_s:.1f} s: generate did not stop between tokens"
    summary = pipe.summary()
    assert summary.windows_grounded == 0 and summary.windows_failed == 0, "a cut answer is neither grounded nor failed"
    assert summary.unparseable_answers == 0


def _start_monitor(model: Path, clip: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump(_config(model, clip, tmp_path / "events.jsonl")))
    env = {**os.environ, "STREAMVG_LOG_LEVEL": "DEBUG", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "streamvg", "monitor", str(pipeline), "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []

    def _read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=_read, daemon=True).start()
    return proc, lines


def test_monitor_stopped_while_generating_exits_cleanly(endless_model: Path, clip: Path, tmp_path: Path) -> None:
    """SIGINT (exit 130) and the end of --duration-s (exit 0), each while the model generates;
    both monitors run at once to halve the test's time."""
    runs = {how: _start_monitor(endless_model, clip, tmp_path / how, *(("--duration-s", "3") if how == "duration" else ()))
            for how in ("sigint", "duration")}
    exit_s: dict[str, float] = {}
    t_signal = 0.0
    try:
        def generating(how: str) -> bool:
            proc, lines = runs[how]
            return any("grounding 1 request(s)" in line for line in lines) or proc.poll() is not None

        wait_until(lambda: generating("sigint"), timeout=120, what="the SIGINT monitor grounding its first window")
        proc, lines = runs["sigint"]
        assert proc.poll() is None, "".join(lines)[-3000:]
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGINT)
        wait_until(lambda: proc.poll() is not None, timeout=60, what="the monitor to exit after SIGINT")
        exit_s["sigint"] = time.monotonic() - t_signal
        wait_until(lambda: generating("duration"), timeout=120, what="the --duration-s monitor grounding its first window")
        t_generating = time.monotonic()
        outputs = {}
        for how, (proc, _lines) in runs.items():
            outputs[how], _ = proc.communicate(timeout=60)
            exit_s.setdefault(how, time.monotonic() - t_generating)
    finally:
        for proc, _lines in runs.values():
            proc.kill()
    for how, (proc, lines) in runs.items():
        stderr = "".join(lines)
        assert "terminate called" not in stderr and "Traceback" not in stderr, stderr[-3000:]
        result = json.loads(outputs[how])
        if how == "sigint":
            assert proc.returncode == 130, stderr[-3000:]
            assert exit_s[how] <= 5.0, f"exited {exit_s[how]:.1f} s after SIGINT"
            assert result["interrupted"] is True and result["exit_code"] == 130
        else:
            assert proc.returncode == 0, stderr[-3000:]
            assert exit_s[how] <= 3.0 + 5.0, f"exited {exit_s[how]:.1f} s after generating began, with --duration-s 3"
            assert result["interrupted"] is False and result["exit_code"] == 0
        assert result["shutdown_s"] <= 5.0
        assert result["windows_grounded"] == 0 and result["windows_failed"] == 0 and result["failures"] == []
