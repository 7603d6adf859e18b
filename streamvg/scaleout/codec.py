"""Windows on the work streams: encoding (ingest) and checked decoding (ground workers).

A work entry is a window as stream fields: `meta` (JSON: window id, missing cameras, each
frame's camera, index, pts, wall time and original size) and one JPEG per frame (`f0`,
`f1`, …). An end marker (`end`) says the camera's source ended.

Decoding trusts nothing: whoever can write to Redis can put anything on a work stream, so
the entry's total size is checked first, then the JSON, then each JPEG's declared width ×
height (read from its header) before a pixel is inflated. Anything wrong raises
`PoisonEntry` with one sentence, which the worker dead-letters.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from streamvg.types import Frame, Window

__all__ = ["PoisonEntry", "WorkItem", "decode_entry", "decode_window", "encode_window", "end_marker", "jpeg_size"]

MAX_FRAMES = 64  # windows hold at most 32 frames (sampling.window_size); cameras × frames in multi-camera
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class PoisonEntry(ValueError):
    """A work entry or saved state that cannot be used: the message says why."""


@dataclass(frozen=True)
class WorkItem:
    """One decoded work entry: a window (`window`, frames as sent) with each frame's size in
    the source (`original_sizes`, (w, h)), or an end marker (`window` is None)."""

    window: Window | None
    original_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def is_end(self) -> bool:
        return self.window is None


def end_marker() -> dict[str, bytes]:
    """The entry that tells ground workers a camera's source ended (its tracks end)."""
    return {"end": b"1"}


def _shrink(image: np.ndarray, max_pixels: int | None) -> np.ndarray:
    h, w = image.shape[:2]
    if not max_pixels or w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / float(w * h))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    return cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)


def encode_window(window: Window, *, jpeg_quality: int = 90, max_pixels: int | None = None) -> dict[str, bytes]:
    """A window as stream fields: `meta` (JSON) and one JPEG per frame (`f0`, `f1`, …).

    Args:
        window: The window to send.
        jpeg_quality: JPEG quality, 10-100 (higher: larger entries, fewer artefacts).
        max_pixels: Frames larger than this (width × height) are downsized to it first,
            keeping their aspect; the model resizes its input to at most
            `engine.max_pixels` anyway, so sending more only costs Redis memory and the
            worker's decode time. Each frame's original size travels in `meta`, and the
            worker maps boxes back to original frame pixels.
    """
    meta = {
        "id": window.id,
        "missing": list(window.missing),
        "frames": [
            {"camera": f.camera, "index": f.index, "pts": f.pts, "wall_time": f.wall_time, "size": list(f.size)}
            for f in window.frames
        ],
    }
    fields: dict[str, bytes] = {"meta": json.dumps(meta).encode()}
    for k, f in enumerate(window.frames):
        img = cv2.cvtColor(_shrink(f.image, max_pixels), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise ValueError(f"could not JPEG-encode frame {f.index} of camera {f.camera}")
        fields[f"f{k}"] = buf.tobytes()
    return fields


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) declared by a JPEG's frame header, read without decoding.

    Raises:
        PoisonEntry: `data` is not a baseline/progressive JPEG with a frame header.
    """
    if data[:2] != b"\xff\xd8":
        raise PoisonEntry("is not a JPEG (no start-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seglen = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF:
            if i + 9 > n:
                break
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            return w, h
        if seglen < 2:
            break
        i += 2 + seglen
    raise PoisonEntry("is not a decodable JPEG (no frame header)")


def _text(fields: Mapping[Any, bytes]) -> dict[str, bytes]:
    return {(k.decode(errors="replace") if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PoisonEntry(f"{what} must be a finite number, got {v!r}")
    return float(v)


def decode_entry(
    fields: Mapping[Any, bytes],
    *,
    camera: str | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
) -> WorkItem:
    """A work entry back as a `WorkItem`, checked before anything is inflated.

    Args:
        fields: The stream entry's fields.
        camera: The camera whose work stream held it (its first frame must be this camera's).
        max_bytes: Largest total size of the fields, in bytes.
        max_pixels: Largest declared width × height of one frame.

    Raises:
        PoisonEntry: the entry is too large, its `meta` is not the expected JSON, a frame
            is missing, is not a JPEG, declares too many pixels or does not decode.
    """
    get = _text(fields)
    if "end" in get and "meta" not in get:
        return WorkItem(None)
    size = sum(len(v) for v in get.values())
    if max_bytes is not None and size > max_bytes:
        raise PoisonEntry(f"is {size} bytes, above scaleout.max_window_bytes ({max_bytes})")
    if "meta" not in get:
        raise PoisonEntry(f"has no 'meta' field (fields: {sorted(get)[:8]})")
    try:
        meta = json.loads(get["meta"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise PoisonEntry(f"has a 'meta' field that is not JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise PoisonEntry("has a 'meta' that is not an object with a non-empty 'frames' list")
    if len(meta["frames"]) > MAX_FRAMES:
        raise PoisonEntry(f"declares {len(meta['frames'])} frames, more than {MAX_FRAMES}")
    wid, missing = meta.get("id"), meta.get("missing", [])
    if not isinstance(wid, str) or not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        raise PoisonEntry("has a 'meta' whose 'id' is not a string or whose 'missing' is not a list of names")
    frames: list[Frame] = []
    originals: list[tuple[int, int]] = []
    for k, fm in enumerate(meta["frames"]):
        if not isinstance(fm, dict) or not isinstance(fm.get("camera"), str) or isinstance(fm.get("index"), bool) \
                or not isinstance(fm.get("index"), int):
            raise PoisonEntry(f"has frame {k} without a camera name and an integer index")
        pts = _number(fm.get("pts"), f"frame {k} pts")
        wall = fm.get("wall_time")
        wall_time = None if wall is None else _number(wall, f"frame {k} wall_time")
        buf = get.get(f"f{k}")
        if buf is None:
            raise PoisonEntry(f"has no JPEG for frame {k} (field f{k} is missing)")
        w, h = jpeg_size(buf)
        if w <= 0 or h <= 0:
            raise PoisonEntry(f"frame {k} declares an empty {w}x{h} picture")
        if max_pixels is not None and w * h > max_pixels:
            raise PoisonEntry(f"frame {k} declares {w}x{h} pixels, above scaleout.max_frame_pixels ({max_pixels})")
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise PoisonEntry(f"frame {k} is not a decodable JPEG")
        rgb = np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), dtype=np.uint8)
        frames.append(Frame(fm["camera"], int(fm["index"]), pts, rgb, wall_time))
        osize = fm.get("size")
        if isinstance(osize, list) and len(osize) == 2 and all(isinstance(v, int) and 0 < v < 1 << 20 for v in osize):
            originals.append((int(osize[0]), int(osize[1])))
        else:
            originals.append((rgb.shape[1], rgb.shape[0]))
    if camera is not None and frames[0].camera != camera:
        raise PoisonEntry(f"is a window of camera {frames[0].camera!r} on camera {camera!r}'s work stream")
    return WorkItem(Window(tuple(frames), id=wid, missing=tuple(missing)), tuple(originals))


def decode_window(fields: Mapping[Any, bytes]) -> Window:
    """The inverse of `encode_window` (frames come back as RGB arrays, as sent)."""
    item = decode_entry(fields)
    if item.window is None:
        raise PoisonEntry("is an end marker, not a window")
    return item.window


def describe_entry(fields: Mapping[Any, bytes], limit: int = 4096) -> str:
    """A short JSON description of a work entry for the dead-letter stream (field sizes and
    the start of `meta`, never the pictures)."""
    get = _text(fields)
    meta = get.get("meta", b"")[:limit].decode(errors="replace")
    return json.dumps({"fields": {k: len(v) for k, v in sorted(get.items())}, "meta": meta})
