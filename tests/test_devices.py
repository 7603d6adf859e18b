"""Local capture devices through OpenCV. No `/dev/video*` exists on CI machines, so the
capture path runs on OpenCV's own decoder reading a real encoded file through the same
`cv2.VideoCapture` calls (read, POS_MSEC, BGR frames) a webcam goes through; a missing
device is tested as it is."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamvg.errors import SourceError, SourceNotFoundError
from streamvg.sources import DeviceSource, SourceStatus, is_live, open_source
from streamvg.testing.servers import wait_until


def test_device_frames_are_rgb_with_media_times(live_clip: Any) -> None:
    path = Path(live_clip.cameras["cam0"])
    with open_source(path, camera="ref") as ref:
        expected = {round(f.pts, 3): f.image for f in ref}
    statuses: list[SourceStatus] = []
    src = DeviceSource(str(path), camera="desk", on_status=statuses.append, max_reconnects=0, queue_size=200).start()
    frames = []
    with pytest.raises(SourceError, match=r"^Camera desk \(.*cam0.mp4\) was lost and did not come back after 0 reconnect"):
        for f in src:  # the "device" ends at the file's end: lost, and no reconnect asked
            frames.append(f)
    src.close()
    assert src.info.backend == "opencv" and (src.info.width, src.info.height) == (320, 192)
    assert len(frames) >= 10 and all(f.camera == "desk" and f.wall_time is not None for f in frames)
    pts = [f.pts for f in frames]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    for f in frames[:5]:  # OpenCV's BGR turned into RGB: the same pixels PyAV decodes
        ref_img = expected[round(f.pts, 3)]
        assert f.image.shape == ref_img.shape and f.image.dtype == np.uint8
        assert np.abs(f.image.astype(int) - ref_img.astype(int)).mean() < 3.0
    assert [s.state for s in statuses][:2] == ["connecting", "up"] and statuses[-1].state == "ended"


def test_missing_device_is_one_sentence_and_close_is_prompt() -> None:
    assert is_live("/dev/video97") and is_live(97)
    with pytest.raises(SourceNotFoundError, match=r"^Capture device /dev/video97 does not exist; check that the camera is plugged in"):
        open_source("/dev/video97")
    # A device index that opens nothing: one sentence once the reader gives up...
    statuses: list[SourceStatus] = []
    src = open_source(97, reconnect=False, on_status=statuses.append)
    with pytest.raises(SourceError, match=r"capture device 97 could not be opened; check that it is connected"):
        next(iter(src))
    src.close()
    assert statuses[-1].state == "ended"
    # ...or, reconnecting (the default), reported down, retried with backoff, closed at once.
    statuses.clear()
    src = open_source(97, backoff_initial_s=30, on_status=statuses.append)
    # The reader sets its state, then reports it: wait for the report itself.
    wait_until(lambda: any(s.state == "down" for s in statuses), timeout=10, what="device reported down")
    assert "could not be opened" in next(s for s in statuses if s.state == "down").detail
    t0 = time.monotonic()
    src.close()
    assert time.monotonic() - t0 < 2.0


def test_device_options_are_checked() -> None:
    with pytest.raises(ValueError, match=r"unknown device option\(s\) \['exposure'\]"):
        DeviceSource(0, cv_options={"exposure": 1})
