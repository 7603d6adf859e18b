"""Live sources against real network streams: Debian's ffmpeg serving MPEG-TS over HTTP and
TCP in real time, killed, paused and restarted under the reader."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamvg.errors import SourceTimeoutError
from streamvg.sources import LiveSource, Source, SourceStatus, is_live, open_source
from streamvg.testing.live import LiveStreamServer, is_listening
from streamvg.testing.servers import free_port, wait_until
from streamvg.types import Frame

SECRET = "s3cr3t-pw"


class Consumer:
    """Iterates a source on its own thread, as the pipeline does, keeping what it got."""

    def __init__(self, src: Source, delay_s: float = 0.0) -> None:
        self.src, self.delay_s = src, delay_s
        self.frames: list[Frame] = []
        self.latency: list[float] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for f in self.src:
                assert f.wall_time is not None
                self.latency.append(time.time() - f.wall_time)
                self.frames.append(f)
                if self.delay_s:
                    time.sleep(self.delay_s)  # a slow consumer (the engine), not a test wait
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def servers(live_clip: Any) -> Iterator[tuple[LiveStreamServer, LiveStreamServer]]:
    a = LiveStreamServer(live_clip.cameras["cam0"], protocol="http")
    b = LiveStreamServer(live_clip.cameras["cam1"], protocol="tcp")
    try:
        yield a.start(), b.start()
    finally:
        a.kill()
        b.kill()


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://viewer:{SECRET}@")


def _timed_close(src: Source) -> float:
    t0 = time.monotonic()
    src.close()
    return time.monotonic() - t0


def test_reconnects_after_server_restart_while_other_camera_flows(
    servers: tuple[LiveStreamServer, LiveStreamServer], caplog: pytest.LogCaptureFixture
) -> None:
    srv_a, srv_b = servers
    statuses: list[SourceStatus] = []
    caplog.set_level(logging.DEBUG, logger="streamvg")
    url_a = _with_password(srv_a.url)
    assert is_live(url_a) and is_live(srv_b.url)
    a = open_source(url_a, fps=10.0, camera="a", on_status=statuses.append, backoff_initial_s=0.2, backoff_max_s=1.0)
    b = open_source(srv_b.url, fps=10.0, camera="b")
    ca, cb = Consumer(a), Consumer(b)
    try:
        wait_until(lambda: len(ca.frames) >= 5 and len(cb.frames) >= 5, timeout=20, what="frames from both cameras")
        assert a.info.codec == "h264" and (a.info.width, a.info.height) == (320, 192)
        srv_a.kill()
        wait_until(lambda: a.state == "down", timeout=15, what="camera a reported down")
        down_at = time.time()
        n_b = len(cb.frames)
        # Camera b keeps flowing while a is down (and a yields nothing new meanwhile: at most
        # frames captured before the server died, still queued for the consumer).
        wait_until(lambda: len(cb.frames) >= n_b + 10, timeout=15, what="camera b flowing while a is down")
        assert a.state == "down"
        assert all(f.wall_time is not None and f.wall_time < down_at for f in ca.frames)
        n_a = len(ca.frames)
        last_pts = ca.frames[-1].pts
        srv_a.start()
        wait_until(lambda: len(ca.frames) >= n_a + 5, timeout=20, what="camera a resumed")
    finally:
        close_a, close_b = _timed_close(a), _timed_close(b)
    assert close_a < 2.0 and close_b < 2.0
    states = [s.state for s in statuses]
    assert states[:2] == ["connecting", "up"] and "down" in states and states[-1] == "up"
    assert states.index("down") < len(states) - 1
    assert a.stats.reconnects == 1 and b.stats.reconnects == 0
    resumed = ca.frames[n_a:]
    assert resumed[0].pts > last_pts, "media time must continue across the reconnect"
    pts = [f.pts for f in ca.frames]
    assert pts == sorted(pts) and len(set(f.index for f in ca.frames)) == len(ca.frames)
    # 10 fps sampling of a 25 fps stream: consecutive frames ~0.1 s apart (never every frame).
    gaps = [q - p for p, q in itertools.pairwise(pts)]
    assert min(gaps) >= 0.07
    # The password never leaves the source: not in statuses, not in log lines.
    assert all(SECRET not in s.uri and SECRET not in s.detail for s in statuses)
    assert statuses[0].uri == srv_a.url.replace("http://", "http://viewer:***@")
    assert SECRET not in caplog.text and "viewer:***@" in caplog.text
    assert ca.error is None and cb.error is None


def test_slow_consumer_gets_fresh_frames(servers: tuple[LiveStreamServer, LiveStreamServer]) -> None:
    srv_a, _ = servers
    src = open_source(srv_a.url, camera="slow", queue_size=2)  # every frame: 25 per second
    consumer = Consumer(src, delay_s=0.25)  # handles 4 frames per second
    try:
        wait_until(lambda: len(consumer.frames) >= 14, timeout=30, what="14 frames at the slow consumer")
    finally:
        src.close()
    # An unbounded queue would be ~3 s behind by now; the freshest policy stays near live.
    assert max(consumer.latency[4:]) < 1.0, consumer.latency
    assert src.stats.frames_dropped > 20
    assert src.stats.frames_in == len(consumer.frames)
    # The decoder kept up with the stream: everything was decoded, most of it dropped.
    assert src.stats.frames_decoded >= src.stats.frames_in + src.stats.frames_dropped
    idx = [f.index for f in consumer.frames[4:]]
    assert min(b - a for a, b in itertools.pairwise(idx)) > 1, "frames were not skipped"


def test_stall_is_detected_and_recovered(servers: tuple[LiveStreamServer, LiveStreamServer]) -> None:
    srv_a, _ = servers
    statuses: list[SourceStatus] = []
    src = open_source(srv_a.url, fps=5.0, camera="p", stall_timeout_s=1.0, backoff_initial_s=0.2, on_status=statuses.append)
    consumer = Consumer(src)
    try:
        wait_until(lambda: len(consumer.frames) >= 3, timeout=20, what="first frames")
        assert srv_a.proc is not None
        os.kill(srv_a.proc.pid, signal.SIGSTOP)  # the connection stays open, no data flows
        try:
            wait_until(lambda: src.state in ("stalled", "down"), timeout=15, what="stall detected")
        finally:
            os.kill(srv_a.proc.pid, signal.SIGCONT)
        srv_a.restart()
        n = len(consumer.frames)
        wait_until(lambda: len(consumer.frames) >= n + 3, timeout=20, what="frames after the stall")
    finally:
        assert _timed_close(src) < 2.0
    stall = [s for s in statuses if s.state == "stalled"]
    assert stall and "no frame for 1 s" in stall[0].detail
    assert statuses[-1].state == "up"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections (kernel backlog) but never says a word."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def test_camera_that_never_answers(silent_server: int, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://admin:{SECRET}@127.0.0.1:{silent_server}/stream.ts"
    statuses: list[SourceStatus] = []
    src = open_source(url, camera="dead", open_timeout_s=0.5, reconnect=False, on_status=statuses.append)
    with pytest.raises(SourceTimeoutError) as ei:
        next(iter(src))
    msg = str(ei.value)
    assert "did not answer" in msg and "dead" in msg and SECRET not in msg and "admin:***@" in msg
    assert [s.state for s in statuses] == ["connecting", "ended"]
    assert SECRET not in caplog.text
    src.close()


def test_close_is_prompt_in_every_state(silent_server: int, servers: tuple[LiveStreamServer, LiveStreamServer]) -> None:
    # Connecting: FFmpeg is blocked waiting for an answer that never comes.
    connecting = open_source(f"http://127.0.0.1:{silent_server}/x.ts", open_timeout_s=30)
    wait_until(lambda: connecting.state == "connecting", timeout=5, what="connecting")
    time.sleep(0.3)  # let FFmpeg block inside its connect/read (the state under test)
    assert _timed_close(connecting) < 2.0
    # Down: nobody listens; the reader sits in its backoff.
    port = free_port()
    assert not is_listening(port)
    down = open_source(f"tcp://127.0.0.1:{port}", backoff_initial_s=30)
    wait_until(lambda: down.state == "down", timeout=10, what="down")
    assert _timed_close(down) < 2.0
    # Up: frames flowing, consumer blocked in next().
    up = open_source(servers[1].url, fps=5.0)
    consumer = Consumer(up)
    wait_until(lambda: len(consumer.frames) >= 2, timeout=20, what="frames")
    assert _timed_close(up) < 2.0
    consumer.thread.join(2.0)
    assert not consumer.thread.is_alive() and consumer.error is None, "iteration must end after close()"


def test_live_source_options_and_info(servers: tuple[LiveStreamServer, LiveStreamServer]) -> None:
    src = open_source(servers[1].url, fps=2.0, queue_size=1, av_options={"probesize": "500000"})
    try:
        assert isinstance(src, LiveSource) and src.queue_size == 1
        assert src.av_options["probesize"] == "500000"
        f = next(iter(src))
        assert f.image.shape == (192, 320, 3) and f.wall_time is not None and f.camera == "127.0.0.1_" + str(servers[1].port)
    finally:
        src.close()
    with pytest.raises(ValueError, match="queue_size"):
        open_source(servers[1].url, queue_size=0)


@pytest.mark.parametrize("protocol", ["udp", "hls"])
def test_udp_and_hls_streams_flow_stall_and_resume(live_clip: Any, protocol: str) -> None:
    """UDP (pushed MPEG-TS: a dead sender is only a silence) and HLS (a playlist served by a
    real web server process: a dead encoder is a playlist that stops growing). Both must be
    noticed as a stall, and frames must resume when the sender/encoder comes back."""
    statuses: list[SourceStatus] = []
    with LiveStreamServer(live_clip.cameras["cam0"], protocol=protocol) as srv:  # type: ignore[arg-type]
        src = open_source(srv.url, fps=5.0, camera=protocol, stall_timeout_s=2.0, backoff_initial_s=0.2,
                          backoff_max_s=1.0, on_status=statuses.append)
        consumer = Consumer(src)
        try:
            wait_until(lambda: len(consumer.frames) >= 5, timeout=30, what=f"frames over {protocol}")
            assert src.info.codec == "h264" and (src.info.width, src.info.height) == (320, 192)
            srv.kill()
            wait_until(lambda: src.state in ("stalled", "down"), timeout=30, what="the stall noticed")
            n, last_pts = len(consumer.frames), consumer.frames[-1].pts
            srv.start()
            wait_until(lambda: len(consumer.frames) >= n + 5, timeout=40, what="frames after the restart")
        finally:
            assert _timed_close(src) < 2.0
    assert consumer.error is None
    states = [s.state for s in statuses]
    assert states[:2] == ["connecting", "up"] and states[-1] == "up"
    assert consumer.frames[n].pts > last_pts, "media time continues across the outage"
    pts = [f.pts for f in consumer.frames]
    assert pts == sorted(pts)
