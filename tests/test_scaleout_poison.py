"""Poison work and state: a real ground worker process, real JPEGs, real Redis.

Every kind of bad work entry (not JSON, a missing or undecodable frame, a frame declaring
16k × 16k pixels, an entry above the byte limit, another camera's window) and bad saved
state (not an archive, a zip bomb, a wrong-shaped array, a time far in the future) is
dead-lettered with its reason; the worker and every camera go on (a camera whose state
was bad restarts its tracks clean)."""

from __future__ import annotations

import io
import json
import signal
import zipfile
from pathlib import Path

import cv2
import numpy as np
import redis
import yaml
from _fleet import spawn, stream_events, summary

from streamvg.config import PipelineConfig
from streamvg.grounding import Grounding
from streamvg.pipeline import TrackingStage
from streamvg.scaleout import encode_window, end_marker
from streamvg.testing.servers import RedisServer, wait_until
from streamvg.types import Detections, Frame, Query, Window

CAMS = ["good", "work", "junk", "bomb", "shape", "future"]
PTS = [round(0.2 * k, 3) for k in range(6)]


def _frame(cam: str, k: int) -> Frame:
    img = np.full((48, 64, 3), 40, np.uint8)
    img[10 + k : 30 + k, 20:40] = (200, 40, 40)
    return Frame(cam, k, PTS[k], img)


def _windows(cam: str) -> list[Window]:
    return [Window((_frame(cam, k), _frame(cam, k + 1))) for k in range(0, len(PTS) - 1, 2)]


def _box(k: int) -> list[float]:
    return [20.0, 10.0 + k, 40.0, 30.0 + k]


def _state(cfg: PipelineConfig, cam: str, pts: float) -> bytes:
    stage = TrackingStage(cfg, publish=lambda e: None, model_name=lambda: "m")
    q = Query("q", "the box")
    img = np.zeros((48, 64, 3), np.uint8)
    for i, t in enumerate((pts, pts + 0.2)):
        w = Window((Frame(cam, i, t, img),))
        d = Detections(np.array([_box(0)], np.float32), np.array([0.9], np.float32), np.zeros(1, np.int64))
        stage.process(w, q, Grounding(w.id, "q", d, "", None, "m", {}), 1.0)
    return stage.export_camera(cam)


def _wrong_shape(state: bytes) -> bytes:
    with np.load(io.BytesIO(state), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.endswith(".mean"))
    arrays[key] = np.zeros((3, 5))  # (n, 8) expected
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _zip_bomb(inflated: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("header.npy", b"\0" * inflated)
    return buf.getvalue()


def _huge_jpeg() -> bytes:
    _ok, buf = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))
    data = bytearray(buf.tobytes())
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = (16384).to_bytes(2, "big") * 2  # declares 16384 x 16384
    return bytes(data)


def test_poison_is_dead_lettered_and_everything_goes_on(tmp_path: Path) -> None:
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"camera": c, "pts": t, "query": None, "boxes": [{"xyxy": _box(k), "score": 0.9}]}) + "\n"
                               for c in CAMS for k, t in enumerate(PTS)))
    with RedisServer() as srv:
        raw_cfg = {
            "name": "poison", "sources": [{"name": c, "uri": f"{c}.mp4"} for c in CAMS],
            "queries": [{"id": "q", "text": "the box"}],
            "engine": {"kind": "replay", "replay_path": str(answers), "batch_size": 8},
            "sinks": {"redis": {"url": srv.url, "spool_dir": str(tmp_path / "spool")}},
            "scaleout": {"lease_s": 2.0, "max_window_bytes": 64 * 1024, "max_state_bytes": 1024 * 1024},
        }
        cfg = PipelineConfig(**raw_cfg)
        path = tmp_path / "p.yaml"
        path.write_text(yaml.safe_dump(raw_cfg))
        client = redis.Redis.from_url(srv.url)
        future = _state(cfg, "future", 1e9)
        states = {"junk": b"PK\x03\x04 not really a zip", "bomb": _zip_bomb(64 * 1024 * 1024),
                  "shape": _wrong_shape(_state(cfg, "shape", 0.0)), "future": future}
        for cam, data in states.items():
            client.set(f"streamvg:poison:trackstate:{cam}", data)
        good = encode_window(_windows("work")[0])
        poison = [
            {**good, "meta": b"{not json"},
            {k: v for k, v in good.items() if k != "f1"},
            {**good, "f0": b"\xff\xd8\xff\xe0 truncated"},
            {**good, "f0": _huge_jpeg()},
            {**good, "f2": b"x" * (80 * 1024)},
            encode_window(_windows("good")[0]),  # another camera's window on this stream
        ]
        for p in poison:
            client.xadd("streamvg:poison:work:work", p)  # type: ignore[arg-type]
        for cam in CAMS:
            for w in _windows(cam):
                client.xadd(f"streamvg:poison:work:{cam}", encode_window(w))  # type: ignore[arg-type]
            client.xadd(f"streamvg:poison:work:{cam}", end_marker())  # type: ignore[arg-type]
            client.sadd("streamvg:poison:cameras", cam)
        worker = spawn(path, "ground", log=tmp_path / "g.log")
        try:
            wait_until(lambda: sum(int(client.xlen(f"streamvg:poison:work:{c}")) for c in CAMS) == 0, timeout=60,
                       what="every entry handled")
            assert worker.poll() is None
            worker.send_signal(signal.SIGTERM)
            out, _ = worker.communicate(timeout=30)
            assert worker.returncode == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
        dead = [{k.decode(): v.decode(errors="replace") for k, v in f.items()} for _i, f in client.xrange("streamvg:poison:dead")]
        events = stream_events(client, "poison")
    log = (tmp_path / "g.log").read_text()
    assert "Traceback" not in log
    work_errors = [d["error"] for d in dead if d["source"] == "scaleout.ground:work"]
    state_errors = {d["error"].split("'")[1]: d["error"] for d in dead if d["source"] == "scaleout.ground:state"}
    assert len(work_errors) == len(poison), work_errors
    for needle in ("not JSON", "field f1 is missing", "not a decodable JPEG", "16384x16384", "max_window_bytes",
                   "camera 'good' on camera 'work'"):
        assert any(needle in e for e in work_errors), (needle, work_errors)
    assert set(state_errors) == set(states), state_errors
    assert "max_state_bytes" in state_errors["bomb"] and "time would go back" in state_errors["future"]
    assert "shape" in state_errors["shape"]
    assert summary(out)["dead_letters"] == len(dead)
    for cam in CAMS:  # every camera went on: each frame grounded once, its tracks from a clean start
        frames = sorted(e.frame_index for e in events if e.kind == "grounding" and e.camera == cam)
        assert frames == list(range(len(PTS))), (cam, frames)
        starts = [e.track_id for e in events if e.kind == "track_start" and e.camera == cam]
        ends = [e.track_id for e in events if e.kind == "track_end" and e.camera == cam]
        assert starts == [0] and ends == [0], (cam, starts, ends)
