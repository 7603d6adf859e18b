"""RTSP cameras: a real RTSP server process (GStreamer's, H.264 over RTP, basic auth) killed
and restarted under the reader; a wrong password gives one clear sentence; the password
never reaches a status or a log line."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamvg.sources import SourceStatus, open_source
from streamvg.testing.rtsp import RtspStreamServer, rtsp_server_available
from streamvg.testing.servers import wait_until
from streamvg.testing.synthetic import write_scene
from streamvg.types import Frame

SECRET = "s3cr3t-rtsp"

_missing = rtsp_server_available()
if _missing is not None:  # .ci/run installs it; elsewhere say exactly what is missing
    pytest.fail(_missing, pytrace=False)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Long enough to outlast the test: each client plays the file from its start.
    scene = write_scene(tmp_path_factory.mktemp("rtsp"), width=320, height=192, duration_s=40.0, seed=12)
    return Path(scene.cameras["cam0"])


@pytest.fixture
def server(clip: Path) -> Iterator[RtspStreamServer]:
    with RtspStreamServer(clip, user="viewer", password=SECRET) as srv:
        yield srv


class Consumer:
    """Iterates a source on its own thread, as the pipeline does."""

    def __init__(self, src: Any) -> None:
        self.frames: list[Frame] = []
        self.error: BaseException | None = None
        self.src = src
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for f in self.src:
                self.frames.append(f)
        except BaseException as exc:
            self.error = exc


def test_rtsp_camera_reconnects_after_the_server_restarts(
    server: RtspStreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="streamvg")
    statuses: list[SourceStatus] = []
    src = open_source(server.url, fps=5.0, camera="door", on_status=statuses.append,
                      backoff_initial_s=0.2, backoff_max_s=1.0)
    consumer = Consumer(src)
    try:
        wait_until(lambda: len(consumer.frames) >= 5, timeout=30, what="frames over RTSP")
        assert src.info.codec == "h264" and (src.info.width, src.info.height) == (320, 192)
        assert consumer.frames[0].image.shape == (192, 320, 3)
        server.kill()
        wait_until(lambda: src.state in ("down", "stalled"), timeout=30, what="the camera reported down")
        n, last_pts = len(consumer.frames), consumer.frames[-1].pts
        server.start()
        wait_until(lambda: len(consumer.frames) >= n + 5, timeout=30, what="frames after the restart")
    finally:
        t0 = time.monotonic()
        src.close()
        closed_in = time.monotonic() - t0
    assert closed_in < 2.0
    assert consumer.error is None
    states = [s.state for s in statuses]
    assert states[:2] == ["connecting", "up"] and states[-1] == "up"
    assert any(s in ("down", "stalled") for s in states)
    assert src.stats.reconnects == 1
    assert consumer.frames[n].pts > last_pts, "media time continues across the reconnect"
    pts = [f.pts for f in consumer.frames]
    assert pts == sorted(pts)
    assert all(SECRET not in s.uri and SECRET not in s.detail for s in statuses)
    assert SECRET not in caplog.text and "viewer:***@" in caplog.text


def test_wrong_password_is_one_clear_sentence(server: RtspStreamServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="streamvg")
    wrong = "not-the-password"
    statuses: list[SourceStatus] = []
    src = open_source(server.url_with("viewer", wrong), fps=5.0, camera="door", on_status=statuses.append)
    consumer = Consumer(src)
    try:
        wait_until(lambda: src.state == "down", timeout=30, what="the camera reported down")
    finally:
        src.close()
    assert not consumer.frames
    down = next(s for s in statuses if s.state == "down")
    assert down.detail.startswith(
        "the camera refused the username or password (401 Unauthorized); check the credentials in the URL"
    )
    assert wrong not in caplog.text and all(wrong not in s.detail and wrong not in s.uri for s in statuses)
