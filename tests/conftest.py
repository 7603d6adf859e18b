"""Shared pytest fixtures (several test files add theirs here)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Qwen2.5-VL and Qwen2-VL model folders, built once per test session.

    Keys are the families ('qwen2_5_vl', 'qwen2_vl'); each folder is what `save_pretrained`
    writes (weights, tokenizer with chat template, image processor), loaded by tests through
    `GemVGEngine` exactly as a user's model is.
    """
    from streamvg.testing.tiny_model import build

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build(root / family, family) for family in ("qwen2_5_vl", "qwen2_vl")}  # type: ignore[arg-type]


# --- synthetic videos (sources, windows, synthetic tests) ------------------------------


@pytest.fixture(scope="session")
def scene_cfr(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One camera, 640x360, 25 fps constant frame rate, 6 s, GOP 2 s, 2 B-frames."""
    from streamvg.testing.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene_cfr"), duration_s=6.0, bframes=2, seed=3)


@pytest.fixture(scope="session")
def scene_vfr(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One camera, variable frame rate (intervals 0.5-3 periods), 3 B-frames, GOP 2 s."""
    from streamvg.testing.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene_vfr"), duration_s=6.0, vfr=True, bframes=3, seed=4)


@pytest.fixture(scope="session")
def scene_multi(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Three cameras viewing one world (offsets, zoom), 320x192, 4 s."""
    from streamvg.testing.synthetic import write_scene

    return write_scene(tmp_path_factory.mktemp("scene_multi"), cameras=3, width=320, height=192, duration_s=4.0, seed=5)


@pytest.fixture(scope="session")
def live_clip(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Two small clips to serve as live streams: 320x192, 25 fps, keyframe every 0.4 s,
    no B-frames (a client joining mid-stream decodes within half a second)."""
    from streamvg.testing.synthetic import write_scene

    return write_scene(
        tmp_path_factory.mktemp("live_clip"), cameras=2, width=320, height=192, fps=25.0,
        duration_s=4.0, gop=10, bframes=0, seed=6,
    )
