"""Every command's exit code and `--json` failures on the failure cases users hit.

Real `python -m streamvg` processes on real files: generated H.264 clips, files that are
not videos, a replay file that is binary, a port another socket listens on, a TCP camera
nobody serves, a real OpenAI-compatible server process answering nonsense. Codes
(README, `streamvg.cli.outcome`): 0 done, 1 finished with failures, 2 bad usage or input,
130 Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamvg.testing.servers import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def streamvg(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "streamvg", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd)


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One short clip and the replay answers for it (every object, as a perfect model)."""
    from streamvg.testing.synthetic import replay_records, write_scene

    root = tmp_path_factory.mktemp("exit_codes")
    sc = write_scene(root / "videos", width=320, height=192, duration_s=4.0, seed=11)
    answers = root / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(sc.ground_truth, query="the thing")))
    return {"video": sc.cameras["cam0"], "answers": answers, "root": root}


def _not_videos(folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"broken{i}.mp4"
        p.write_bytes(os.urandom(4096))
        paths.append(p)
    return paths


# --- search ------------------------------------------------------------------------------


def test_search_over_unreadable_videos_exits_1_and_lists_each(scene: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    broken = _not_videos(folder)
    good = folder / "good.mp4"
    good.write_bytes(scene["video"].read_bytes())
    answers = tmp_path / "a.jsonl"  # the good clip's answers, under its camera name here
    answers.write_text(scene["answers"].read_text().replace('"camera": "cam0"', '"camera": "good"'))
    r = streamvg("search", str(folder), "-q", "the thing", "--engine", "replay", "--replay", str(answers), "--json")
    no_traceback(r)
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    assert result["exit_code"] == 1
    unreadable = {f["input"]: f for f in result["failures"] if f["kind"] == "unreadable"}
    assert set(unreadable) == {str(p) for p in broken}
    assert all(f["error"] and f["camera"] for f in unreadable.values())
    assert result["segments"] and {s["camera"] for s in result["segments"]} == {"good"}, "the readable video is still searched"
    for p in broken:
        assert p.name in r.stderr


def test_search_whose_every_answer_is_unparseable_exits_1(scene: dict[str, Path], tmp_path: Path) -> None:
    from streamvg.testing.openai_server import OpenAIStubProcess

    server = OpenAIStubProcess(tmp_path, {"answers": [], "default": "the cat sat on the mat"}, model="stub")
    try:
        # search has no --convention flag: the environment sets the field (merged with the flags)
        r = streamvg("search", str(scene["video"]), "-q", "the thing", "--engine", "openai", "--model", "stub",
                     "--base-url", server.base_url, "--json", env={"STREAMVG_ENGINE__CONVENTION": "qwen2_5_vl"})
    finally:
        server.stop()
    no_traceback(r)
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    (failure,) = [f for f in result["failures"] if f["kind"] == "unparseable"]
    assert failure["count"] == failure["of"] == result["unparseable_answers"] > 0
    assert failure["input"] == str(scene["video"]) and "no readable boxes" in failure["error"]


def test_search_bad_inputs_are_one_sentence_before_any_work(scene: dict[str, Path], tmp_path: Path) -> None:
    binary = tmp_path / "answers.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    a_file = tmp_path / "thumbs"
    a_file.write_text("not a folder")
    events = tmp_path / "events.jsonl"
    base = ["search", str(scene["video"]), "-q", "the thing", "--engine", "replay", "--events", str(events)]
    cases = {
        "--replay binary": ([*base, "--replay", str(binary)], "not a text file"),
        "--thumbnails file": ([*base, "--replay", str(scene["answers"]), "--thumbnails", str(a_file)], "is a file, not a folder"),
        "--out unwritable": ([*base, "--replay", str(scene["answers"]), "--out", str(a_file / "segments.jsonl")], "cannot be written"),
        "--out folder": ([*base, "--replay", str(scene["answers"]), "--out", str(tmp_path)], "is a folder"),
        "missing path": (["search", str(tmp_path / "nope.mp4"), "-q", "x", "--engine", "replay", "--replay", str(scene["answers"])],
                         "no such file or folder"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "streamvg", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert cases[name][1] in err, (name, err)
    assert not events.exists(), "nothing ran: the checks come before the search"


# --- monitor -----------------------------------------------------------------------------


def _pipeline(tmp_path: Path, sources: list[dict[str, Any]], answers: Path, **extra: Any) -> Path:
    p = tmp_path / "p.yaml"
    data = {"name": f"exit-{os.getpid()}-{tmp_path.name}", "sources": sources,
            "sampling": {"fps": 2, "window_size": 2, "stride": 2}, "queries": [{"id": "q", "text": "the thing"}],
            "engine": {"kind": "replay", "replay_path": str(answers)},
            "sinks": {"jsonl": {"path": str(tmp_path / "events.jsonl")}}, **extra}
    p.write_text(yaml.safe_dump(data))
    return p


def test_monitor_every_camera_failed_exits_1_with_the_reason(scene: dict[str, Path], tmp_path: Path) -> None:
    broken = _not_videos(tmp_path / "v")
    p = _pipeline(tmp_path, [{"name": f"c{i}", "uri": str(b)} for i, b in enumerate(broken)], scene["answers"])
    r = streamvg("monitor", str(p), "--json", "--duration-s", "30")
    no_traceback(r)
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    assert result["error"] and "every camera failed" in result["error"]
    assert {f["camera"] for f in result["failures"] if f["kind"] == "unreadable"} == {"c0", "c1"}


def test_monitor_pipeline_naming_a_missing_video_exits_2_before_starting(scene: dict[str, Path], tmp_path: Path) -> None:
    p = _pipeline(tmp_path, [{"name": "ok", "uri": str(scene["video"])}, {"name": "gone", "uri": str(tmp_path / "gone.mp4")}],
                  scene["answers"])
    r = streamvg("monitor", str(p), "--json")
    no_traceback(r)
    assert r.returncode == 2 and "sources[1] (gone)" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "events.jsonl").exists(), "checked before any camera started"


def test_monitor_metrics_port_in_use_exits_2(scene: dict[str, Path], tmp_path: Path) -> None:
    p = _pipeline(tmp_path, [{"name": "ok", "uri": str(scene["video"])}], scene["answers"])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = streamvg("monitor", str(p), "--metrics-port", str(port))
    no_traceback(r)
    assert r.returncode == 2 and f"--metrics-port {port} is already in use" in r.stderr, r.stderr


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_monitor_signals(scene: dict[str, Path], tmp_path: Path, sig: int, code: int) -> None:
    """SIGTERM is a clean stop (0), Ctrl-C an interruption (130); a camera nobody serves."""
    p = _pipeline(tmp_path, [{"name": "dead", "uri": f"tcp://127.0.0.1:{free_port()}"}], scene["answers"])
    proc = subprocess.Popen([sys.executable, "-m", "streamvg", "monitor", str(p), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("dead" in line and "down" in line for line in lines) or proc.poll() is not None,
                   timeout=60, what="the monitor reporting its camera down")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    reader.join(5)
    err = "".join(lines)
    assert "Traceback" not in err
    assert proc.returncode == code, err
    assert json.loads(out)["exit_code"] == code


# --- ground, probe -----------------------------------------------------------------------


def test_ground_model_failing_inside_generate_exits_1(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    import cv2
    import numpy as np

    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2_vl"], model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen["forced_eos_token_id"] = 10**7  # a token outside the vocabulary: generate raises IndexError
    (model / "generation_config.json").write_text(json.dumps(gen))
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    r = streamvg("ground", str(image), "-q", "the thing", "--model", str(model), "--device", "cpu", "--max-new-tokens", "4")
    no_traceback(r)
    assert r.returncode == 1, r.stderr
    assert "failed while answering (IndexError" in r.stderr


def test_ground_hub_id_offline_is_one_sentence_in_seconds(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), 128, np.uint8))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    t0 = time.monotonic()
    r = streamvg("ground", str(image), "-q", "x", "--model", "nobody/no-such-model", env=env)
    elapsed = time.monotonic() - t0
    no_traceback(r)
    assert r.returncode == 2 and "hf download nobody/no-such-model" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "huggingface-cli" not in r.stderr
    assert elapsed < 40, "no minute of retries (process start included)"


def test_probe_dead_camera_times_out_with_the_last_status_and_ctrl_c_is_130() -> None:
    uri = f"rtsp://viewer:secret@127.0.0.1:{free_port()}/stream"
    r = streamvg("probe", uri, "--timeout", "1.5")
    no_traceback(r)
    assert r.returncode == 1, r.stderr
    assert "no frame within 1.5 s (last status down" in r.stderr and "secret" not in r.stderr
    proc = subprocess.Popen([sys.executable, "-m", "streamvg", "probe", uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(" down" in line for line in lines), timeout=60, what="probe reporting the camera down")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    reader.join(5)
    assert proc.returncode == 130, "".join(lines)
    assert "Traceback" not in "".join(lines)
