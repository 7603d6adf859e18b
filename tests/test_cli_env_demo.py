"""Environment overrides under the flags, progress off a terminal, the demo's hints.

`STREAMVG_<SECTION>__<FIELD>` variables are merged field by field: they win over a
command's defaults and the pipeline file, a flag given on the command line wins over
them. The demo's hint (`streamvg tail --pipeline demo --from-start --timeout 2`) prints
what it published and ends; `pipelines/demo.yaml` is what it ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamvg.cli import main
from streamvg.config import env_overrides, load_pipeline, parse_pipeline
from streamvg.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 4 s clip and replay answers for it (the camera is `cam0`)."""
    from streamvg.testing.synthetic import replay_records, write_scene

    root = tmp_path_factory.mktemp("env")
    sc = write_scene(root / "v", width=320, height=192, duration_s=4.0, seed=12)
    answers = root / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in replay_records(sc.ground_truth, query="the thing")))
    return sc.cameras["cam0"], answers


def _search_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    code = main(["search", *args, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("env", "flags", "same_as", "not_as"),
    [
        # env fps and the flag's window, both (the bug: the env's sampling section replaced the flags')
        ({"STREAMVG_SAMPLING__FPS": "2"}, ["--window", "6"], ["--fps", "2", "--window", "6"], ["--fps", "2", "--window", "4"]),
        # env over the defaults
        ({"STREAMVG_SAMPLING__WINDOW_SIZE": "6", "STREAMVG_SAMPLING__FPS": "2"}, [], ["--fps", "2", "--window", "6"],
         ["--fps", "2", "--window", "4"]),
        # a flag given over the env
        ({"STREAMVG_SAMPLING__WINDOW_SIZE": "6", "STREAMVG_SAMPLING__FPS": "2"}, ["--window", "4"],
         ["--fps", "2", "--window", "4"], ["--fps", "2", "--window", "6"]),
    ],
)
def test_search_env_is_merged_under_given_flags(
    clip: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str], flags: list[str], same_as: list[str], not_as: list[str],
) -> None:
    video, answers = clip
    base = [str(video), "-q", "the thing", "--engine", "replay", "--replay", str(answers)]
    expected = _search_json(capsys, *base, *same_as)["windows_grounded"]
    other = _search_json(capsys, *base, *not_as)["windows_grounded"]
    assert expected != other, "the clip tells the two configs apart"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _search_json(capsys, *base, *flags)["windows_grounded"] == expected


def test_engine_env_keeps_the_flags_of_its_section(clip: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: STREAMVG_ENGINE__BATCH_SIZE once dropped --engine replay ("engine.model is not set")."""
    video, answers = clip
    monkeypatch.setenv("STREAMVG_ENGINE__BATCH_SIZE", "2")
    result = _search_json(capsys, str(video), "-q", "the thing", "--engine", "replay", "--replay", str(answers))
    assert result["windows_grounded"] > 0 and result["failures"] == []


def test_search_honours_the_model_from_the_environment(
    clip: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("STREAMVG_ENGINE__MODEL", str(tmp_path / "no-model-here"))
    code = main(["search", str(clip[0]), "-q", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "no-model-here" in err and "--model is required" not in err, err


def test_env_overrides_name_the_variable_and_a_near_field() -> None:
    assert env_overrides({"STREAMVG_ENGINE__BATCH_SIZE": "2", "STREAMVG_LOG_LEVEL": "INFO", "STREAMVG_NAME": "x"}) == {
        "engine": {"batch_size": "2"}, "name": "x"}
    with pytest.raises(ConfigError, match=r"STREAMVG_ENGINE__BATCH_SIZ: unknown field 'batch_siz' \(did you mean 'batch_size'\?\)"):
        env_overrides({"STREAMVG_ENGINE__BATCH_SIZ": "2"})
    with pytest.raises(ConfigError, match=r"unknown field 'modle' \(did you mean 'model'\?\); valid fields: kind, model,"):
        parse_pipeline({"engine": {"modle": "x"}}, env=False)


def test_search_prints_progress_lines_when_stderr_is_not_a_terminal(clip: tuple[Path, Path]) -> None:
    video, answers = clip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STREAMVG_PROGRESS_INTERVAL_S": "0.3",
           "STREAMVG_ENGINE__REPLAY_LATENCY_S": "0.4"}  # a slow "model", set from the environment
    r = subprocess.run([sys.executable, "-m", "streamvg", "search", str(video), "-q", "the thing", "--engine", "replay",
                        "--replay", str(answers), "--fps", "2", "--window", "2", "--batch-size", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if " search: " in line and "windows grounded" in line]
    assert len(lines) >= 2, r.stderr
    counts = [int(line.split(" search: ")[1].split()[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] > counts[0], "the lines show the search advancing"


def test_demo_hint_prints_what_the_demo_published_and_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamvg.testing.servers import RedisServer

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with RedisServer() as srv:
        env["STREAMVG_REDIS_URL"] = srv.url
        demo = subprocess.run([sys.executable, "-m", "streamvg", "demo", "--json", "--duration-s", "4", "--redis-url", srv.url],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
        assert demo.returncode == 0, demo.stderr
        published = json.loads(demo.stdout)["events_published"]
        tail = subprocess.run([sys.executable, "-m", "streamvg", "tail", "--pipeline", "demo", "--from-start", "--timeout", "2",
                               "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert tail.returncode == 0, tail.stderr
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    assert len(events) == published > 0
    ran = load_pipeline(tmp_path / "streamvg-demo" / "pipeline.yaml")
    monkeypatch.setenv("STREAMVG_REDIS_URL", srv.url)
    shipped = load_pipeline(ROOT / "pipelines" / "demo.yaml")
    assert shipped.model_dump() == ran.model_dump(), "pipelines/demo.yaml is what `streamvg demo` runs"
    assert "streamvg-demo/" in (ROOT / ".gitignore").read_text().splitlines()


def test_engine_export_and_ground_read_the_model_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "no-such-model"
    monkeypatch.setenv("STREAMVG_ENGINE__MODEL", str(missing))
    code = main(["engine", "export", "--out", str(tmp_path / "eng")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "Traceback" not in err
    # A flag given wins over the variable.
    code = main(["engine", "export", "--out", str(tmp_path / "eng"), "--model", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert code == 2 and "other" in err and str(missing) not in err
    picture = tmp_path / "a.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(picture), np.zeros((32, 32, 3), np.uint8))
    code = main(["ground", str(picture), "-q", "the cup"])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err
