"""Pipeline file: round trip, environment overrides, and one-line errors naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamvg.config import PipelineConfig, load_pipeline, parse_pipeline
from streamvg.errors import ConfigError

GOOD = {
    "name": "lobby",
    "sources": [
        {"name": "door", "uri": "rtsp://viewer:hunter2@10.0.0.5:554/stream1", "options": {"rtsp_transport": "tcp"}},
        {"name": "hall", "uri": "/videos/hall.mp4"},
    ],
    "sampling": {"fps": 2.0, "window_size": 4, "stride": 2, "snap": "keyframe"},
    "queries": [{"id": "vest", "text": "the man in the yellow vest"}, {"id": "cup", "text": "a cup", "mode": "reason"}],
    "engine": {"kind": "gemvg", "model": "/models/gem-vg", "batch_size": 8},
    "tracker": {"max_lost_s": 4.0},
    "sinks": {"redis": {"url": "redis://:s3cret@127.0.0.1:6379/0", "maxlen": 5000}},
}


def _write(tmp_path: Path, data: object, name: str = "p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_round_trip(tmp_path: Path) -> None:
    cfg = load_pipeline(_write(tmp_path, GOOD))
    assert cfg.sources[1].name == "hall"
    assert cfg.sampling.snap == "keyframe" and cfg.engine.batch_size == 8
    again = load_pipeline(_write(tmp_path, cfg.model_dump(mode="json"), "again.yaml"))
    assert again == cfg


def test_defaults_are_sensible() -> None:
    cfg = parse_pipeline({"sources": [{"name": "a", "uri": "a.mp4"}]})
    assert cfg.name == "default"
    assert cfg.sampling.fps == 1.0 and cfg.sampling.window_size == 4 and cfg.sampling.stride == 2
    assert cfg.engine.kind == "gemvg" and cfg.sinks.redis is None


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["sources"][1].update(uri=""), "sources[1].uri: "),
        (lambda d: d["sources"][0].update(name="bad name!"), "sources[0].name: 'bad name!' is not a valid camera name"),
        (lambda d: d["sampling"].update(fps="fast"), "sampling.fps: Input should be a valid number"),
        (lambda d: d["sampling"].update(stride=9), "sampling: stride (9) is larger than window_size (4)"),
        (lambda d: d["engine"].update(kind="magic"), "engine.kind: Input should be"),
        (lambda d: d["queries"][1].update(mode="think"), "queries[1].mode: Input should be 'direct' or 'reason'"),
        (lambda d: d["sinks"]["redis"].pop("url"), "sinks.redis.url: Field required"),
        (lambda d: d.update(tracker={"max_lost": 3}), "tracker.max_lost: unknown field"),
        (lambda d: d["queries"].append({"id": "cup", "text": "again"}), "queries: 'cup' appears twice"),
    ],
)
def test_wrong_fields_name_the_field(tmp_path: Path, mutate, expected: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    msg = str(info.value)
    assert expected in msg
    assert msg.startswith(str(path))
    assert "Traceback" not in msg and "hunter2" not in msg


def test_malformed_yaml_points_at_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: x\nsources:\n  - name: a\n   uri: b\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_pipeline(path)


def test_missing_file_and_wrong_top_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_pipeline(_write(tmp_path, "- a\n- b\n"))


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMVG_ENGINE__MODEL", "/other/model")
    monkeypatch.setenv("STREAMVG_SINKS__REDIS__URL", "redis://envhost:6380/1")
    cfg = load_pipeline(_write(tmp_path, GOOD))
    assert cfg.engine.model == "/other/model"
    assert cfg.engine.batch_size == 8  # the rest of the section still comes from the file
    assert cfg.sinks.redis is not None and cfg.sinks.redis.url == "redis://envhost:6380/1"
    assert cfg.sinks.redis.maxlen == 5000


def test_dollar_variables_expand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads(json.dumps(GOOD))
    data["sources"][0]["uri"] = "rtsp://viewer:${CAM_PW}@cam/1"
    data["engine"]["model"] = "${MODEL_DIR:-/models/default}"
    monkeypatch.setenv("CAM_PW", "pw123")
    cfg = load_pipeline(_write(tmp_path, data))
    assert cfg.sources[0].uri == "rtsp://viewer:pw123@cam/1"
    assert cfg.engine.model == "/models/default"
    monkeypatch.delenv("CAM_PW")
    with pytest.raises(ConfigError, match=r"sources\[0\]\.uri: environment variable CAM_PW is not set"):
        load_pipeline(_write(tmp_path, data))


def test_masked_hides_secrets() -> None:
    cfg = PipelineConfig(**GOOD)  # type: ignore[arg-type]
    text = json.dumps(cfg.masked())
    assert "hunter2" not in text and "s3cret" not in text
    assert "rtsp://viewer:***@10.0.0.5:554/stream1" in text
    assert "redis://:***@127.0.0.1:6379/0" in text


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamvg", *args], capture_output=True, text=True, timeout=120)


def test_cli_config_check(tmp_path: Path) -> None:
    good = _write(tmp_path, GOOD)
    r = _cli("config", "check", str(good), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["sources"][0]["uri"] == "rtsp://viewer:***@10.0.0.5:554/stream1"
    assert "hunter2" not in r.stdout + r.stderr

    bad = json.loads(json.dumps(GOOD))
    bad["sources"][1]["uri"] = 5
    r = _cli("config", "check", str(_write(tmp_path, bad, "bad.yaml")))
    assert r.returncode == 2
    assert "sources[1].uri: Input should be a valid string" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_version_json() -> None:
    r = _cli("version", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["streamvg"]
