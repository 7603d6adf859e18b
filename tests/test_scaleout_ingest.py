"""The ingest side's limits and buffer, with a real redis-server on a free port.

- Frames larger than the engine's `max_pixels` are downsized before they go on Redis;
  their original size travels along and boxes come back in original frame pixels.
- While Redis is away, live cameras keep their freshest windows (stale ones counted) and
  file cameras wait; when Redis comes up, everything kept is handed over in order.
"""

from __future__ import annotations

import threading

import numpy as np
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from streamvg.config import ScaleoutConfig
from streamvg.grounding import Grounding
from streamvg.scaleout import PoisonEntry, WindowPublisher, decode_entry, encode_window, jpeg_size
from streamvg.scaleout.ground import _restore_sizes
from streamvg.testing.servers import RedisServer, free_port, wait_until
from streamvg.types import Detections, Frame, Window


def _window(cam: str, k: int, w: int = 64, h: int = 48) -> Window:
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (200, 40, 40)
    return Window((Frame(cam, k, k * 0.5, img),))


@settings(max_examples=15, deadline=None)
@given(w=st.integers(16, 2000), h=st.integers(16, 1200), max_pixels=st.integers(32 * 32, 448 * 448))
def test_frames_are_downsized_and_boxes_map_back(w: int, h: int, max_pixels: int) -> None:
    win = _window("c", 0, w, h)
    fields = encode_window(win, max_pixels=max_pixels)
    sent_w, sent_h = jpeg_size(fields["f0"])
    if w * h <= max_pixels:
        assert (sent_w, sent_h) == (w, h)  # small enough: sent whole
    else:
        assert sent_w * sent_h <= max_pixels
        assert abs(sent_w / w - sent_h / h) <= 1 / sent_w + 1 / sent_h  # one scale for both sides (aspect kept)
    item = decode_entry(fields, camera="c", max_pixels=max_pixels)
    assert item.original_sizes == ((w, h),)
    # an engine answering the top-left quarter of what it was sent…
    d = Detections(np.array([[0, 0, sent_w / 2, sent_h / 2]], np.float32), np.array([0.9], np.float32), np.zeros(1, np.int64))
    assert item.window is not None
    win2, g = _restore_sizes(item, Grounding(item.window.id, "q", d, "", None, "m", {}))
    # …is the top-left quarter of the original frame, and events report the original size
    assert np.allclose(g.detections.xyxy[0], [0, 0, w / 2, h / 2], atol=1e-3 * max(w, h))
    assert win2.frames[0].size == (w, h)


def test_buffer_keeps_freshest_live_windows_and_files_wait_for_redis() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    pub = WindowPublisher(url, "buf", settings=ScaleoutConfig(buffer_windows=4), live_cameras=["live"])
    try:
        pub.put([_window("live", k) for k in range(10)])  # Redis is not there: never raises
        assert pub.dropped == 6
        done = threading.Event()

        def files() -> None:
            pub.put([_window("file", k) for k in range(7)])  # more than the buffer holds: waits
            done.set()

        threading.Thread(target=files, daemon=True).start()
        wait_until(lambda: pub.pending() == 8, timeout=10, what="the file camera filling its buffer")
        assert not done.wait(0.5)  # still waiting for Redis (a bounded check, not a timing race)
        with RedisServer(port=port):
            client = redis.Redis.from_url(url)
            assert done.wait(30) and pub.drain(timeout=30)
            live = [int(f[b"meta"].split(b'"index": ')[1].split(b",")[0]) for _i, f in client.xrange("streamvg:buf:work:live")]
            files_ = [decode_entry(f).window.frames[0].index for _i, f in client.xrange("streamvg:buf:work:file")]  # type: ignore[union-attr]
            assert live == [6, 7, 8, 9] and files_ == list(range(7))
            assert pub.published == 11 and pub.outage.outages == 1 and pub.outage.down_since is None
    finally:
        pub.close()


_GOOD = encode_window(Window((Frame("c", 0, 0.0, np.full((24, 32, 3), 90, np.uint8)), Frame("c", 1, 0.2, np.zeros((24, 32, 3), np.uint8)))))


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(sorted(_GOOD)), pos=st.integers(0, 10_000), junk=st.binary(min_size=0, max_size=12),
       cut=st.booleans())
def test_a_corrupted_entry_decodes_or_is_poison(field: str, pos: int, junk: bytes, cut: bool) -> None:
    """Any corruption of a work entry's bytes (overwritten, truncated) either still decodes or
    raises `PoisonEntry` with a reason: never another exception, never a huge allocation."""
    data = _GOOD[field]
    pos %= max(1, len(data))
    bad = data[:pos] + junk if cut else data[:pos] + junk + data[pos + len(junk):]
    try:
        item = decode_entry({**_GOOD, field: bad}, camera="c", max_bytes=1 << 20, max_pixels=64 * 64)
    except PoisonEntry as exc:
        assert str(exc)
    else:
        assert item.window is not None and all(f.image.size <= 64 * 64 * 3 for f in item.window.frames)


def test_metrics_bind_the_configured_address() -> None:
    from streamvg.pipeline import PipelineMetrics

    m = PipelineMetrics(free_port(), address="127.0.0.1")
    try:
        assert m._server[0].server_address[0] == "127.0.0.1"
    finally:
        m.close()
