"""Ctrl-C during `streamvg search` stops cleanly and keeps what was found.

A real `streamvg search` process grounds a generated video through the remote engine
against a real, deliberately slow model-server process; SIGINT arrives mid-run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamvg.testing.openai_server import OpenAIStubProcess
from streamvg.testing.servers import wait_until
from streamvg.testing.synthetic import write_scene

MODEL = "Qwen2.5-VL-7B-Instruct"
ANSWERS: dict[str, Any] = {"answers": [], "default": '[{"bbox_2d": [20, 20, 80, 80], "label": "thing", "image": 1}]'}


@pytest.mark.parametrize("json_out", [True, False])
def test_ctrl_c_keeps_the_segments_found_so_far(tmp_path: Path, json_out: bool) -> None:
    video = write_scene(tmp_path / "v", width=320, height=192, duration_s=30.0, seed=9).cameras["cam0"]
    server = OpenAIStubProcess(tmp_path, ANSWERS, model=MODEL)
    server.control(delay_s=0.25)  # 30 windows would take 7 s or more: the interrupt lands mid-run
    out = tmp_path / "segments.jsonl"
    cmd = [sys.executable, "-m", "streamvg", "search", str(video), "-q", "the thing", "--fps", "2", "--window", "2",
           "--stride", "2", "--batch-size", "1", "--engine", "openai", "--model", MODEL, "--base-url", server.base_url,
           "--out", str(out)] + (["--json"] if json_out else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: server.stats()["count"] >= 4, timeout=60, what="four windows grounded")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "interrupted" in stderr
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert saved and saved[0]["query"] == "the thing", "segments found before Ctrl-C are written"
    assert saved[0]["end_s"] < 29.0, "the run stopped early"
    if json_out:
        result = json.loads(stdout)
        assert result["interrupted"] is True
        assert result["segments"] == saved
    else:
        assert "segment(s) in 1 video(s)" in stdout
