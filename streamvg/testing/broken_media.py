"""Broken real-world media, made on purpose: the files that break naive samplers.

Each writer builds one kind of damage seen in the wild, from a real encoded clip or from
PyAV's encoders, so tests read real containers with real decoders:

* `write_jittered_pts` — an MP4 whose container `pts` jump back and forth (±`jitter_s`)
  while the decode timestamps stay regular: FFmpeg's best-effort timestamps follow `dts`.
* `write_concatenated_ts` — MPEG-TS clips concatenated byte by byte (`cat a.ts b.ts`):
  timestamps restart at every clip, and the frame size may change between clips.
* `write_truncated_mp4` — an MP4 with its index (`moov`) at the end, cut before the index.
* `write_huge_mjpeg` — an MJPEG video of huge frames (16000×16000 costs 3 GB decoded to
  RGB at full size) whose file is small: the JPEGs are written by hand, flat grey.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> p = write_huge_mjpeg(os.path.join(d, "big.mkv"), 4096, 4096, frames=2)
    >>> os.path.getsize(p) < 1_000_000
    True
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = ["write_concatenated_ts", "write_huge_mjpeg", "write_jittered_pts", "write_truncated_mp4", "write_ts_clip"]


def write_jittered_pts(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    jitter_s: float = 0.1,
    pattern: Sequence[int] = (1, -1, 0, 1, -1),
) -> Path:
    """Remux `src`'s video into an MP4 whose packet `pts` are off by `pattern[i] * jitter_s`.

    The decode timestamps (`dts`) are kept, so they stay regular; every `pts` is moved later by
    `2 * jitter_s` first so that `pts >= dts` still holds (muxers refuse less). The picture
    order inside the H.264 stream is untouched, so in display order the `pts` jump back and
    forth while FFmpeg's best-effort timestamps (then the `dts`) are regular.
    """
    import av

    dst = Path(dst)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vs = inp.streams.video[0]
        os_ = out.add_stream_from_template(vs)
        j = round(jitter_s / (vs.time_base or Fraction(1, 90000)))
        i = 0
        for packet in inp.demux(vs):
            if packet.dts is None or not packet.size:
                continue
            packet.stream = os_
            packet.pts = int(packet.pts if packet.pts is not None else packet.dts) + 2 * j + int(pattern[i % len(pattern)]) * j
            i += 1
            out.mux(packet)
    return dst


def write_ts_clip(
    path: str | os.PathLike[str], width: int, height: int, duration_s: float, *, fps: int = 25, seed: int = 0
) -> Path:
    """One H.264 MPEG-TS clip of a moving random texture (GOP 1 s, B-frames)."""
    import av

    path = Path(path)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    base = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
    with av.open(str(path), "w", format="mpegts") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"preset": "ultrafast", "g": str(fps), "bf": "2"}
        for k in range(round(duration_s * fps)):
            img = np.roll(base, 4 * k, axis=1)  # a moving texture: real motion for the encoder
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = k
            frame.time_base = Fraction(1, fps)
            for packet in st.encode(frame):
                out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)
    return path


def write_concatenated_ts(
    dst: str | os.PathLike[str],
    clips: Sequence[tuple[int, int, float]] = ((320, 240, 2.0), (640, 480, 2.0)),
    *,
    fps: int = 25,
) -> Path:
    """Encode one H.264 MPEG-TS per `(width, height, duration_s)` and concatenate the bytes.

    Every clip starts at the MPEG-TS muxer's own start time, so the timestamps of the result
    restart at each clip boundary (and the frame size changes where the clips differ).
    """
    dst = Path(dst)
    with open(dst, "wb") as f:
        for n, (w, h, d) in enumerate(clips):
            part = dst.with_name(f"{dst.stem}.part{n}.ts")
            write_ts_clip(part, w, h, d, fps=fps, seed=n)
            f.write(part.read_bytes())
            part.unlink()
    return dst


def write_truncated_mp4(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, keep: float = 0.6
) -> Path:
    """Remux `src`'s video into an MP4 with its index at the end, then cut the file.

    Without `-movflags faststart` the `moov` box (the index of every sample) is written last,
    when recording stops; a crash or a copy that stops early leaves `mdat` alone. The cut
    keeps `keep` of the bytes, so the index is gone.
    """
    import av

    dst = Path(dst)
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        vs = inp.streams.video[0]
        os_ = out.add_stream_from_template(vs)
        for packet in inp.demux(vs):
            if packet.dts is None or not packet.size:
                continue
            packet.stream = os_
            out.mux(packet)
    data = dst.read_bytes()
    if data.rfind(b"moov") < data.find(b"mdat"):
        raise RuntimeError(f"{dst}: the muxer put the index first; cannot make a moov-at-end file")
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def _flat_jpeg(width: int, height: int) -> bytes:
    """A baseline greyscale JPEG of flat mid-grey, without ever holding its pixels.

    Each 8×8 block is "DC difference 0, end of block"; with one-symbol Huffman tables (code
    `0`) that is two zero bits, so the entropy-coded data is `blocks / 4` zero bytes.
    """
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")

    def seg(marker: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload

    dqt = seg(0xDB, b"\x00" + bytes([1] * 64))
    sof = seg(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    one_code = bytes([1] + [0] * 15)  # one code of length 1
    dht = seg(0xC4, b"\x00" + one_code + b"\x00" + b"\x10" + one_code + b"\x00")
    sos = seg(0xDA, b"\x01\x01\x00\x00\x3f\x00")
    blocks = (width // 8) * (height // 8)
    data = bytes((blocks + 3) // 4)
    return b"\xff\xd8" + dqt + sof + dht + sos + data + b"\xff\xd9"


def write_huge_mjpeg(
    dst: str | os.PathLike[str], width: int = 16000, height: int = 16000, *, frames: int = 2, fps: int = 1
) -> Path:
    """An MJPEG video (Matroska) of `frames` flat grey `width`×`height` JPEGs.

    The file is small (about `width * height / 256` bytes a frame) while each decoded frame is
    `width * height` bytes of grey and three times that in RGB.
    """
    import av

    dst = Path(dst)
    jpeg = _flat_jpeg(width, height)
    with av.open(str(dst), "w", format="matroska") as out:
        st = out.add_stream("mjpeg", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuvj420p"
        st.time_base = Fraction(1, 1000)
        for k in range(frames):
            packet = av.Packet(jpeg)
            packet.stream = st
            packet.pts = packet.dts = k * 1000 // fps
            packet.time_base = st.time_base
            packet.is_keyframe = True
            out.mux(packet)
    return dst
