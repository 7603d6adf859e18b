"""Video files: sampling by container PTS, exact or snapped to keyframes.

How a file is read:

1. **Index scan.** The file's packets are demuxed once without decoding (cheap: no pixel
   work) to learn every frame's PTS and which frames are keyframes. Sample times are then
   matched against real PTS, never `index / nominal_fps`, so variable-frame-rate files and
   B-frames (decode order ≠ presentation order) come out right.
2. **Plan.** For each target time `t0 + k / fps`, `snap="exact"` wants the first frame at or
   after it; `snap="keyframe"` wants the keyframe nearest to it if one lies within
   `tolerance_s` (default half the sampling period), else the cheapest frame within the
   tolerance: the earliest one, which needs the fewest frames decoded since its keyframe.
   Each frame is handed out at most once, in presentation order.
3. **Decode only what is needed** (PyAV backend). For a wanted frame in a later GOP the
   reader seeks straight to that GOP's keyframe; inside a GOP it decodes forward, telling
   the decoder to skip non-reference frames (`skip_frame="NONREF"`) before the wanted one,
   since nothing later depends on them. Keyframe wants decode with `skip_frame="NONKEY"`.
   Only handed-out frames are converted to RGB.

4. **Broken timestamps.** When the packet scan finds timestamps a seek-and-decode reader
   cannot trust (`timestamps_suspect`: decode times running backwards at a restart, or
   `pts` out of display order), the file is decoded once and indexed by FFmpeg's
   best-effort timestamps, with media time carried across restarts (`best_effort_index`);
   such a file is then read from its start, without seeking.

Frames above `max_pixels` (default 3840×2160) are downscaled on decode (`lowres` for
MJPEG, else inside the RGB conversion), so a huge frame never costs a full-size RGB copy.

The decord backend (`backend="decord"`) reads the same plan through `VideoReader.get_batch`
in small batches; it cannot skip non-reference frames, so it is slower here and is used
only when asked for (see the README's measured ratios). Either way memory holds one
batch of frames, not the video.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamvg.errors import SourceError, SourceNotFoundError, UnsupportedSourceError
from streamvg.sources.base import (
    DEFAULT_MAX_PIXELS,
    Snap,
    Source,
    StatusCallback,
    fit_within,
    lowres_for,
)
from streamvg.types import Frame

__all__ = ["FileIndex", "FileSource", "best_effort_index", "plan_samples", "scan_file", "timestamps_suspect"]

log = logging.getLogger("streamvg.sources.files")

Backend = Literal["auto", "pyav", "decord"]


@dataclass
class FileIndex:
    """Every frame's PTS of a file's first video stream, from a demux-only scan.

    Attributes:
        time_base: Seconds per PTS tick.
        pts: Frame PTS in ticks, sorted (presentation order); frame index = position.
        key_pts: Keyframe PTS in ticks, sorted.
        expected_frames: Frame count the container header promises (0 when unknown).
        complete: False when the scan stopped early (a truncated or damaged file).
        timed: False for streams without timestamps (raw `.h264` elementary streams): then,
            and only then, frame times are `index / nominal fps`.
        sequential: For files whose container timestamps cannot be seeked by (see
            `best_effort_index`): position `i` of `pts` is the decoder's output frame
            `sequential[i]`; such files are decoded from the start, never seeked. None for
            ordinary files.
        output_pts: With `sequential`: the container `pts` of every output frame (None where
            a frame has none), to check that a decode lines up with the scan.
    """

    time_base: Fraction
    pts: list[int]
    key_pts: list[int]
    expected_frames: int
    complete: bool
    timed: bool = True
    sequential: list[int] | None = None
    output_pts: list[int | None] | None = None

    def seconds(self, ticks: int) -> float:
        return float(ticks * self.time_base)

    def ticks(self, seconds: float) -> int:
        """The first tick at or after `seconds` (tolerating float rounding)."""
        return math.ceil(seconds / self.time_base - 1e-6)

    def key_for(self, ticks: int) -> int:
        """Position in `key_pts` of the last keyframe at or before `ticks` (0 if none)."""
        return max(0, bisect.bisect_right(self.key_pts, ticks) - 1)


def _translate_open_error(path: str, exc: BaseException) -> SourceError:
    import av

    if isinstance(exc, FileNotFoundError):
        return SourceNotFoundError(f"Video file {path} does not exist; check the path.", source=path)
    if isinstance(exc, IsADirectoryError):
        return UnsupportedSourceError(f"{path} is a directory, not a video file; give a video file path.", source=path)
    if isinstance(exc, PermissionError):
        return SourceError(f"Video file {path} cannot be read (permission denied); check its permissions.", source=path)
    reason = str(getattr(exc, "strerror", None) or exc) if isinstance(exc, av.FFmpegError) else str(exc)
    if _mp4_index_missing(path):
        return UnsupportedSourceError(
            f"{path} is a truncated MP4 (its index is missing): the recording or copy stopped before "
            "the 'moov' index, which this file keeps at its end, was written; re-export it from the "
            "original, or record with -movflags faststart (index first) or "
            "-movflags frag_keyframe+empty_moov (fragmented, readable when cut).",
            source=path,
        )
    hint = "moov atom" in reason.lower() or "end of file" in reason.lower()
    return UnsupportedSourceError(
        f"{path} is not a video file StreamVG can read ({reason.strip() or type(exc).__name__}); "
        + ("the file may be truncated before its index was written; " if hint else "")
        + "give an MP4, MKV, MOV, AVI, WebM or MPEG-TS video.",
        source=path,
    )


def _mp4_index_missing(path: str) -> bool:
    """True for an ISO-BMFF file (MP4/MOV: `ftyp`, or QuickTime boxes, first) without a `moov` box.

    Walks the top-level boxes by their size fields only (a few reads, whatever the file's
    size). A box running past the end of the file, or media data with no index, means the
    file was cut before the index at its end was written.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            pos, seen = 0, list[bytes]()
            while pos + 8 <= size and len(seen) < 4096:
                f.seek(pos)
                head = f.read(16)
                n, kind = int.from_bytes(head[:4], "big"), head[4:8]
                if n == 1 and len(head) >= 16:
                    n = int.from_bytes(head[8:16], "big")
                elif n == 0:
                    n = size - pos  # "to the end of the file"
                if not seen and kind not in (b"ftyp", b"wide", b"free", b"skip", b"mdat"):
                    return False
                seen.append(kind)
                if kind == b"moov":
                    return False
                if n < 8 or pos + n > size:
                    break  # cut inside this box
                pos += n
            return bool(seen) and (b"mdat" in seen or pos < size)
    except OSError:
        return False


def _open(path: str) -> Any:
    """Open `path` with PyAV and return `(container, video_stream)`, errors translated."""
    import av

    if not os.path.exists(path):
        raise SourceNotFoundError(f"Video file {path} does not exist; check the path.", source=path)
    if os.path.isdir(path):
        raise UnsupportedSourceError(f"{path} is a directory, not a video file; give a video file path.", source=path)
    try:
        container = av.open(path, "r")
    except (av.FFmpegError, OSError) as exc:
        raise _translate_open_error(path, exc) from exc
    if not container.streams.video:
        container.close()
        raise UnsupportedSourceError(
            f"{path} has no video stream (only audio or data); give a file with video.", source=path
        )
    return container, container.streams.video[0]


def scan_file(path: str) -> tuple[FileIndex, dict[str, Any]]:
    """Demux `path` once (no decoding) and return its `FileIndex` and stream facts.

    Raises:
        SourceNotFoundError: The file does not exist.
        UnsupportedSourceError: It is not a readable video (or has no video frames).
    """
    import av

    container, stream = _open(path)
    try:
        tb = stream.time_base or Fraction(1, 90000)
        pts: list[int] = []
        keys: list[int] = []
        decode_order: list[tuple[int | None, int | None]] = []  # (pts, dts) of each packet
        untimed: list[bool] = []  # keyframe flag of packets without any timestamp
        complete = True
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                decode_order.append((packet.pts, packet.dts))
                p = packet.pts if packet.pts is not None else packet.dts
                if p is None:
                    untimed.append(bool(packet.is_keyframe))
                    continue
                pts.append(int(p))
                if packet.is_keyframe:
                    keys.append(int(p))
        except av.FFmpegError as exc:
            complete = False
            log.debug("scan of %s stopped: %s", path, exc)
        rate = stream.average_rate or stream.guessed_rate
        timed = True
        if not pts and untimed:
            # No timestamps at all: the only clock left is the nominal frame rate.
            log.info("%s has no timestamps; frame times are frame index / nominal fps", path)
            tb = 1 / Fraction(rate or 25).limit_denominator(1001)
            pts = list(range(len(untimed)))
            keys = [i for i, k in enumerate(untimed) if k]
            timed = False
        expected = int(stream.frames or 0)
        if expected and len(pts) < expected:
            complete = False
        if not pts:
            raise UnsupportedSourceError(
                f"{path} contains no readable video frames; the file is empty or damaged, re-create or re-download it.",
                source=path,
            )
        pts.sort()
        keys.sort()
        if not keys or keys[0] > pts[0]:
            keys.insert(0, pts[0])  # decoding must start somewhere
        index = FileIndex(tb, pts, keys, expected, complete, timed)
        cc = stream.codec_context
        duration_s: float | None = None
        if stream.duration:
            duration_s = float(stream.duration * tb)
        elif container.duration:
            duration_s = container.duration / 1_000_000
        width, height = int(cc.width), int(cc.height)
        depth = int(getattr(cc, "reorder_depth", 0) or 0)
        if timed and timestamps_suspect(decode_order, depth):
            index = best_effort_index(path, expected, complete)
            # The header's duration spans one clip of a restarted file; a cut file's is longer.
            duration_s = max(duration_s or 0.0, index.seconds(index.pts[-1] - index.pts[0]) + _frame_s(index))
        key_gaps = np.diff(np.asarray(index.key_pts, dtype=np.float64)) * float(tb)
        facts = {
            "codec": cc.name,
            "width": width,
            "height": height,
            "fps": float(rate) if rate else None,
            "duration_s": duration_s,
            "keyframe_interval_s": float(np.median(key_gaps)) if key_gaps.size else None,
            "frames": len(index.pts),
            "timestamps": "frame_index" if not timed else "best_effort" if index.sequential is not None else "container",
        }
        return index, facts
    finally:
        container.close()


def timestamps_suspect(decode_order: list[tuple[int | None, int | None]], depth: int) -> bool:
    """True when a file's container timestamps may not be what FFmpeg shows (demux facts only).

    Any of: decode timestamps that run backwards (a restart: concatenated clips, a wrap);
    `pts` that a decoder reordering at most `depth` frames cannot output in increasing order
    (or twice the same); or regular `dts` with irregular sorted `pts` (`pts` jumping around a
    steady clock). A false alarm only costs one decoding pass (`best_effort_index` then finds
    the container's own `pts`); a miss keeps the container's `pts`.
    """
    import heapq

    last_dts: int | None = None
    heap: list[int] = []
    last_out: int | None = None
    for p, d in decode_order:
        if d is not None:
            if last_dts is not None and d < last_dts:
                return True
            last_dts = d
        if p is None:
            continue
        heapq.heappush(heap, p)
        if len(heap) > depth:
            out = heapq.heappop(heap)
            if last_out is not None and out <= last_out:
                return True
            last_out = out
    dts = np.asarray([d for _, d in decode_order if d is not None], dtype=np.float64)
    pts = np.sort(np.asarray([p for p, _ in decode_order if p is not None], dtype=np.float64))
    if dts.size >= 8 and pts.size >= 8:
        dg, pg = np.diff(dts), np.diff(pts)
        steady = dg.min() > 0 and dg.max() <= 1.1 * dg.min()
        # Irregular: many gaps far from the usual one (a cut file or one dropped frame
        # leaves a single long gap, which is no sign of broken pts).
        odd = np.abs(pg - np.median(pg)) > 0.25 * np.median(dg)
        if steady and odd.sum() >= max(3, 0.1 * pg.size):
            return True
    return False


def _frame_s(index: FileIndex) -> float:
    """Typical frame duration in seconds (median gap of the time line; 0 for one frame)."""
    if len(index.pts) < 2:
        return 0.0
    return float(np.median(np.diff(np.asarray(index.pts, dtype=np.float64)))) * float(index.time_base)


def _guess_correct_pts(frames: list[tuple[int | None, int | None]]) -> list[int | None]:
    """FFmpeg's best-effort timestamp of each output frame (`guess_correct_pts`, decode.c).

    `frames` are `(pts, pkt_dts)` in the decoder's output order. FFmpeg counts, over the
    frames so far, how often `pts` and how often `dts` failed to increase, and takes `pts`
    unless it failed more often (or is missing): what `ffprobe`'s
    `best_effort_timestamp_time` shows and what `ffmpeg` itself times frames by.
    """
    out: list[int | None] = []
    faulty_pts = faulty_dts = 0
    last_pts: int | None = None
    last_dts: int | None = None
    for p, d in frames:
        if d is not None:
            faulty_dts += last_dts is not None and d <= last_dts
            last_dts = d
        elif p is not None:
            last_dts = p
        if p is not None:
            faulty_pts += last_pts is not None and p <= last_pts
            last_pts = p
        elif d is not None:
            last_pts = d
        out.append(p if (faulty_pts <= faulty_dts or d is None) and p is not None else d)
    return out


def best_effort_index(path: str, expected_frames: int = 0, complete: bool = True) -> FileIndex:
    """Decode `path` once (no pixel conversion) and index it by FFmpeg's best-effort times.

    For files whose container `pts` are out of display order (they jump back and forth
    while the decode clock is steady) each frame gets FFmpeg's best-effort timestamp, as
    `ffprobe` shows it. Where the timestamps restart (concatenated clips), media time carries
    on: each restarted stretch is placed one frame after the stretch before it, and one
    warning says so (with any change of frame size). A frame whose time does not come before
    every later frame's is left off the time line (the first frames, while FFmpeg's guess
    still trusts the broken `pts`), so times strictly increase.

    Trade-off: this costs one full decode when the file is opened, and the file is then read
    from its start without seeking (its timestamps cannot be seeked by).
    """
    import av

    container, stream = _open(path)
    decode_order: list[tuple[int | None, int | None]] = []
    frames: list[tuple[int | None, int | None, bool, int, int]] = []  # pts, pkt_dts, key, w, h
    try:
        tb = stream.time_base or Fraction(1, 90000)
        stream.thread_type = "AUTO"
        cc = stream.codec_context
        # Timestamps and output order do not depend on the picture: skip what only refines it.
        cc.options = {"skip_loop_filter": "all", "lowres": str(lowres_for(cc.name, cc.width, cc.height, 1))}
        try:
            for packet in container.demux(stream):
                if packet.size:
                    decode_order.append((packet.pts, packet.dts))
                for f in packet.decode():
                    frames.append((f.pts, f.dts, bool(f.key_frame), f.width, f.height))
        except av.FFmpegError as exc:
            complete = False
            log.debug("best-effort scan of %s stopped: %s", path, exc)
    finally:
        container.close()
    if not frames:
        raise UnsupportedSourceError(
            f"{path} contains no decodable video frames; the file is damaged, re-create or re-download it.",
            source=path,
        )
    best = _guess_correct_pts([(p, d) for p, d, *_ in frames])
    media = _carry_restarts(path, tb, decode_order, frames, best)
    # Keep frame n only if its time is before every later frame's (suffix minimum).
    keep: list[int] = []
    low: int | None = None
    for n in range(len(media) - 1, -1, -1):
        m = media[n]
        if m is not None and (low is None or m < low):
            keep.append(n)
            low = m
    keep.reverse()
    changed = sum(1 for (p, *_), b in zip(frames, best, strict=True) if b is not None and b != p)
    if changed or len(keep) < len(frames):
        log.info(
            "Video file %s: the container's timestamps are out of display order (%d of %d frames); "
            "following FFmpeg's best-effort timestamps%s", path, changed, len(frames),
            f", {len(frames) - len(keep)} frame(s) out of time order left out" if len(keep) < len(frames) else "",
        )
    pts = [int(media[n]) for n in keep]  # type: ignore[arg-type]
    keys = [pts[i] for i, n in enumerate(keep) if frames[n][2]]
    if not keys or keys[0] > pts[0]:
        keys.insert(0, pts[0])
    if expected_frames and len(frames) < expected_frames:
        complete = False
    return FileIndex(tb, pts, keys, expected_frames, complete, True, keep, [p for p, *_ in frames])


def _carry_restarts(
    path: str,
    tb: Fraction,
    decode_order: list[tuple[int | None, int | None]],
    frames: list[tuple[int | None, int | None, bool, int, int]],
    best: list[int | None],
) -> list[int | None]:
    """Media ticks of each output frame: `best`, shifted so each timestamp restart continues.

    Restarts are where the decode timestamps run backwards (in decode order). Each output
    frame belongs to the stretch whose packets carry its `pts` (the decoder still outputs the
    last frames of a clip after it was fed the next one's first packets).
    """
    from collections import Counter

    stretches: list[Counter[int]] = [Counter()]
    last: int | None = None
    for p, d in decode_order:
        t = d if d is not None else p
        if t is not None and last is not None and t < last:
            stretches.append(Counter())
        if t is not None:
            last = t
        if p is not None:
            stretches[-1][p] += 1
    if len(stretches) == 1:
        return list(best)
    owner: list[int] = []
    s = 0
    for p, *_ in frames:
        if p is not None and not stretches[s][p]:
            ahead = next((k for k in range(s + 1, len(stretches)) if stretches[k][p]), None)
            s = ahead if ahead is not None else s
        if p is not None and stretches[s][p]:
            stretches[s][p] -= 1
        owner.append(s)
    media: list[int | None] = []
    offset, prev_end, prev_step, cur = 0, None, 1, 0
    firsts: list[float] = []
    for n, b in enumerate(best):
        if owner[n] != cur:
            seg = [b2 for k in range(n, len(best)) if owner[k] == owner[n] and (b2 := best[k]) is not None]
            done = sorted(m for m in media if m is not None)
            if done:
                prev_end = done[-1]
                gaps = [y - x for x, y in itertools.pairwise(done[-64:]) if y > x]
                prev_step = int(np.median(gaps)) if gaps else 1
            if seg and prev_end is not None:
                offset = prev_end + prev_step - min(seg)
                firsts.append(float((prev_end + prev_step) * tb))
            cur = owner[n]
        media.append(None if b is None else b + offset)
    sizes: list[tuple[int, int]] = []
    for *_, w, h in frames:
        if not sizes or sizes[-1] != (w, h):
            sizes.append((w, h))
    size_note = (
        " and the frame size changes (" + " → ".join(f"{w}×{h}" for w, h in sizes) + ")" if len(sizes) > 1 else ""
    )
    log.warning(
        "Video file %s: its timestamps restart %d time(s) (concatenated clips?)%s; media time "
        "continues across each restart (at %s s), so every part is sampled once, in file order.",
        path, len(stretches) - 1, size_note, ", ".join(f"{t:.2f}" for t in firsts),
    )
    return media


ThreadType = Literal["AUTO", "FRAME", "SLICE", "NONE"]

# Decoding runs (between two seeks) that span at least this many frames, or hand out at
# least this many, use frame threads (see `choose_thread_type`).
LONG_DECODE_RUN = 64
DENSE_WANTS_PER_RUN = 4


@dataclass(frozen=True)
class _Want:
    ticks: int
    keyframe: bool  # decode with skip_frame=NONKEY (it is a keyframe)


def plan_samples(
    index: FileIndex, fps: float | None, snap: Snap, tolerance_s: float | None
) -> list[_Want]:
    """The frames to hand out, in presentation order, each at most once."""
    if fps is None:
        return [_Want(p, False) for p in index.pts]
    period = 1.0 / fps
    tol = period / 2 if tolerance_s is None else tolerance_s
    t0 = index.seconds(index.pts[0])
    t_last = index.seconds(index.pts[-1])
    n = math.floor((t_last - t0) / period + 1e-9) + 1
    chosen: dict[int, bool] = {}
    key_s = [index.seconds(k) for k in index.key_pts]
    for k in range(n):
        target = t0 + k * period
        if snap == "keyframe":
            j = bisect.bisect_left(key_s, target)
            best = None
            for c in (j - 1, j):
                if 0 <= c < len(key_s) and abs(key_s[c] - target) <= tol + 1e-9 and (
                    best is None or abs(key_s[c] - target) < abs(key_s[best] - target)
                ):
                    best = c
            if best is not None and index.key_pts[best] not in chosen:
                chosen[index.key_pts[best]] = True
                continue
            # No keyframe near: the earliest frame within tolerance is the cheapest to
            # decode (fewest frames since the previous keyframe).
            pos = bisect.bisect_left(index.pts, index.ticks(target - tol))
            while pos < len(index.pts) and index.pts[pos] in chosen:
                pos += 1
            if pos < len(index.pts) and index.seconds(index.pts[pos]) <= target + tol + 1e-9:
                chosen[index.pts[pos]] = False
            continue
        pos = bisect.bisect_left(index.pts, index.ticks(target))
        if pos < len(index.pts) and index.pts[pos] not in chosen:
            chosen[index.pts[pos]] = False
    return [_Want(t, chosen[t]) for t in sorted(chosen)]


def choose_thread_type(index: FileIndex, wants: list[_Want]) -> ThreadType:
    """FFmpeg threading for this plan: frame threads for long decoding runs, else slices.

    Frame threads decode several frames at once but hold back about one frame per thread,
    and every seek drains and refills them; slice threads split one frame and add no delay.
    Sparse sampling (a few frames per GOP) seeks every GOP and decodes a few reference
    frames each time: there slice threads measured x1.2 faster on sliced x264 output and
    within 10% on single-slice files. Dense sampling (many frames per GOP) or long GOPs
    gained up to x1.5 from frame threads (benchmarks/sampling.py, the shared clips).
    """
    if not wants:
        return "AUTO"
    last_in_gop: dict[int, int] = {}  # keyframe position -> last wanted tick in its GOP
    for w in wants:
        last_in_gop[index.key_for(w.ticks)] = w.ticks
    spanned = 0
    for kpos, last in last_in_gop.items():
        start = index.key_pts[kpos] if index.key_pts else index.pts[0]
        spanned += bisect.bisect_right(index.pts, last) - bisect.bisect_left(index.pts, start)
    runs = len(last_in_gop)
    dense = len(wants) / runs >= DENSE_WANTS_PER_RUN
    return "AUTO" if dense or spanned / runs >= LONG_DECODE_RUN else "SLICE"


class FileSource(Source):
    """Frames sampled from a video file by PTS (see the module docstring).

    Args:
        path: The video file.
        fps: Frames per second to sample (None = every frame).
        snap: "exact" (frame at or just after each sample time) or "keyframe" (nearest
            keyframe within `tolerance_s`, else the earliest frame within it; decodes far
            less, at the price of sample times off by up to `tolerance_s`).
        tolerance_s: Keyframe snap tolerance in seconds (default half the sampling period).
        camera: Camera name put on frames (default: the file's stem).
        on_status: Receives "ended" when the file is finished.
        backend: "pyav" (seek + skip_frame; the fastest measured, see
            benchmarks/sampling.py), "decord" (`VideoReader.get_batch`; falls back to PyAV
            when decord cannot open the file) or "auto" (= "pyav").
        threads: Decoder threads (0 = FFmpeg's choice).
        thread_type: FFmpeg threading: "AUTO" (frame and slice threads), "FRAME", "SLICE"
            or "NONE"; None picks by the plan (see `choose_thread_type`).
        batch_size: Frames per decord batch (memory holds one batch).
        max_pixels: Frames with more pixels are downscaled on decode to at most this many,
            aspect kept (None = never; default 3840×2160). MJPEG decodes straight at 1/2 to
            1/8 size (FFmpeg `lowres`), decord at the final size; others resize before the
            RGB conversion, so no full-size RGB copy is ever made.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fps: float | None = None,
        snap: Snap = "exact",
        tolerance_s: float | None = None,
        camera: str | None = None,
        on_status: StatusCallback | None = None,
        backend: Backend = "auto",
        threads: int = 0,
        thread_type: ThreadType | None = None,
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        p = str(path)
        super().__init__(p, camera or Path(p).stem, on_status)
        if fps is not None and not fps > 0:
            raise ValueError(f"fps must be positive or None, got {fps}")
        if snap not in ("exact", "keyframe"):
            raise ValueError(f"snap must be 'exact' or 'keyframe', got {snap!r}")
        if tolerance_s is not None and tolerance_s < 0:
            raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s}")
        if backend not in ("auto", "pyav", "decord"):
            raise ValueError(f"backend must be 'auto', 'pyav' or 'decord', got {backend!r}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}")
        self.path = p
        self.max_pixels = max_pixels
        self.fps, self.snap, self.tolerance_s = fps, snap, tolerance_s
        self.threads, self.batch_size = threads, max(1, batch_size)
        self.index, facts = scan_file(p)
        self._wants = plan_samples(self.index, fps, snap, tolerance_s)
        self.thread_type: ThreadType = thread_type or choose_thread_type(self.index, self._wants)
        self.info.__dict__.update(facts)
        self.backend: str = "pyav"
        self._decord: Any = None
        if backend == "decord" and self.index.sequential is not None:
            log.info("%s is read with PyAV: decord cannot follow its best-effort timestamps", p)
        elif backend == "decord" and self.index.timed:
            self._decord = self._open_decord()
            if self._decord is not None:
                self.backend = "decord"
        self.info.backend = self.backend
        self._container: Any = None
        self._iter: Iterator[Frame] | None = None
        self._closed = False
        self._lock = threading.RLock()
        self.last_pts: float | None = None

    # --- public ------------------------------------------------------------------------

    @property
    def planned(self) -> list[float]:
        """PTS (seconds) of the frames this source will hand out, in order."""
        return [self.index.seconds(w.ticks) for w in self._wants]

    def __next__(self) -> Frame:
        with self._lock:  # close() from another thread waits for this frame, never tears it
            if self._closed:
                self._release()
                raise StopIteration
            if self._iter is None:
                if self._decord is not None:
                    self._iter = self._iter_decord()
                elif self.index.sequential is not None:
                    self._iter = self._iter_sequential()
                elif self.index.timed:
                    self._iter = self._iter_pyav()
                else:
                    self._iter = self._iter_untimed()
            try:
                frame = next(self._iter)
            except StopIteration:
                self._finish()
                raise
            self.stats.frames_in += 1
            self.last_pts = frame.pts
            return frame

    def close(self) -> None:
        """Stop and release the decoder. Safe from any thread: when another thread is
        decoding a frame right now, that thread releases everything on its next call."""
        self._closed = True
        if self._lock.acquire(timeout=1.0):
            try:
                self._release()
            finally:
                self._lock.release()

    def _release(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None
        if self._container is not None:
            self._container.close()
            self._container = None
        self._decord = None

    # --- internals ---------------------------------------------------------------------

    def _finish(self) -> None:
        detail = ""
        if not self.index.complete:
            got = self.index.seconds(self.index.pts[-1]) if self.index.pts else 0.0
            total = f" of {self.info.duration_s:.2f} s" if self.info.duration_s else ""
            frames = f"{len(self.index.pts)} of {self.index.expected_frames} frames" if self.index.expected_frames else f"{len(self.index.pts)} frames"
            detail = (
                f"Video file {self.path} ends early: decoded up to {got:.2f} s{total} "
                f"({frames}); the file is probably truncated, re-copy or re-record it."
            )
            log.warning(detail)
        self._status.emit("ended", detail)
        self._closed = True
        self._release()

    def _guard_decoder(self, stream: Any) -> None:
        """Make a too-big picture decode small from the start where the codec can (lowres)."""
        cc = stream.codec_context
        level = lowres_for(cc.name, int(cc.width), int(cc.height), self.max_pixels)
        if level:
            cc.options = {**dict(cc.options or {}), "lowres": str(level)}
            log.info("%s: %dx%d frames are decoded at 1/%d size (max_pixels=%d)",
                     self.path, cc.width, cc.height, 1 << level, self.max_pixels)

    def _rgb(self, f: Any) -> np.ndarray:
        """`f` as RGB, downscaled (area filter) to fit `max_pixels` in the same conversion."""
        w, h = fit_within(int(f.width), int(f.height), self.max_pixels)
        if (w, h) == (f.width, f.height):
            return np.asarray(f.to_ndarray(format="rgb24"))
        return np.asarray(f.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray())

    def _iter_sequential(self) -> Iterator[Frame]:
        """Files without seekable timestamps (see `best_effort_index`): decode from the start.

        The n-th frame out of the decoder is the scan's n-th frame; the container `pts` of
        each frame is checked against the scan's, so a frame the decoder drops this time
        (damaged data) does not shift every later time.
        """
        import av

        index = self.index
        if index.sequential is None or index.output_pts is None:  # pragma: no cover - caller checks
            raise RuntimeError("_iter_sequential needs an index from best_effort_index")
        position = {t: i for i, t in enumerate(index.pts)}
        wanted = {index.sequential[position[w.ticks]]: w.ticks for w in self._wants}
        raw = index.output_pts
        last = max(wanted, default=-1)
        container, stream = _open(self.path)
        self._container = container
        stream.thread_type = "AUTO"  # as in the scan: the same output frames, in the same order
        if self.threads:
            stream.codec_context.thread_count = self.threads
        self._guard_decoder(stream)
        n = 0
        try:
            try:
                for f in container.decode(stream):
                    self.stats.frames_decoded += 1
                    if f.pts is not None and n < len(raw) and raw[n] != f.pts:
                        n = next((m for m in range(n + 1, min(n + 64, len(raw))) if raw[m] == f.pts), n)
                    ticks = wanted.get(n)
                    if ticks is not None:
                        yield Frame(self.camera, n, index.seconds(ticks), self._rgb(f), None)
                    n += 1
                    if n > last:
                        return
            except av.FFmpegError as exc:
                log.debug("decode error in %s after %d frames: %s", self.path, n, exc)
        finally:
            container.close()
            self._container = None

    def _frame_index(self, ticks: int) -> int:
        return bisect.bisect_left(self.index.pts, ticks)

    def _open_decord(self) -> Any:
        try:
            import decord

            w, h = fit_within(self.info.width, self.info.height, self.max_pixels)
            size = {} if (w, h) == (self.info.width, self.info.height) else {"width": w, "height": h}
            return decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=self.threads, **size)
        except Exception as exc:  # decord raises its own DECORDError / RuntimeError
            log.info("decord cannot open %s (%s); reading it with PyAV", self.path, exc)
            return None

    def _iter_decord(self) -> Iterator[Frame]:
        vr = self._decord
        n = len(vr)
        if n == len(self.index.pts):
            positions = [self._frame_index(w.ticks) for w in self._wants]
        else:  # decord's own frame list differs: match by its timestamps
            starts = vr.get_frame_timestamp(list(range(n)))[:, 0]
            positions = [int(np.searchsorted(starts, self.index.seconds(w.ticks) - 1e-6)) for w in self._wants]
        for i in range(0, len(positions), self.batch_size):
            chunk = [min(p, n - 1) for p in positions[i : i + self.batch_size]]
            images = vr.get_batch(chunk).asnumpy()
            self.stats.frames_decoded += len(chunk)
            for j in range(len(chunk)):
                ticks = self._wants[i + j].ticks
                yield Frame(self.camera, self._frame_index(ticks), self.index.seconds(ticks),
                            np.ascontiguousarray(images[j]), None)

    def _iter_untimed(self) -> Iterator[Frame]:
        """Streams without timestamps: decode in order; the n-th frame is at n / fps."""
        import av

        container, stream = _open(self.path)
        self._container = container
        stream.thread_type = self.thread_type
        self._guard_decoder(stream)
        wanted = {w.ticks for w in self._wants}
        try:
            n = 0
            try:
                for f in container.decode(stream):
                    self.stats.frames_decoded += 1
                    if n in wanted:
                        yield Frame(self.camera, n, self.index.seconds(n), self._rgb(f), None)
                    n += 1
            except av.FFmpegError as exc:
                log.debug("decode error in %s after %d frames: %s", self.path, n, exc)
        finally:
            container.close()
            self._container = None

    def _seek(self, container: Any, stream: Any, kpos: int) -> Iterator[Any]:
        """Seek to keyframe `kpos` and return the packet iterator from a keyframe at or before it.

        Seeking is by PTS, but some demuxers land elsewhere: MPEG-TS seeks by decode time
        and lands on whatever packet is there, often inside the GOP before. So the packets
        up to the first keyframe after the landing point are dropped (they cannot be
        decoded without what came before them), and when that keyframe is later than the
        wanted one (or there is none), earlier keyframes are tried, down to the start.
        """
        key = self.index.key_pts[kpos]
        for k in range(kpos, -1, -1):
            container.seek(self.index.key_pts[k], stream=stream, backward=True)
            packets = container.demux(stream)
            for n, p in enumerate(packets):
                if p.is_keyframe and p.pts is not None:
                    if p.pts <= key:
                        return itertools.chain([p], packets)
                    break
                if n > 4096:  # no keyframe near: do not read the whole file here
                    break
            # Landed after the wanted keyframe (or in its GOP, with no keyframe after): earlier.
        container.seek(0)  # from the start (also files whose first frame is no keyframe)
        return iter(container.demux(stream))

    def _iter_pyav(self) -> Iterator[Frame]:
        import av

        container, stream = _open(self.path)
        self._container = container
        stream.thread_type = self.thread_type
        if self.threads:
            stream.codec_context.thread_count = self.threads
        self._guard_decoder(stream)
        cc = stream.codec_context
        index = self.index
        wants = self._wants
        kposes = [index.key_for(w.ticks) for w in wants]
        pending: deque[Any] = deque()  # decoded frames not handed out yet (presentation order)
        packets: Iterator[Any] | None = None  # None: the decoder must be re-positioned (seek)
        fed_key = -1  # position in key_pts of the last keyframe fed to the decoder

        def decode(packet: Any) -> None:
            try:
                out = cc.decode(packet)
            except av.FFmpegError as exc:
                log.debug("decode error in %s at pts %s: %s", self.path, getattr(packet, "pts", None), exc)
                return
            self.stats.frames_decoded += len(out)
            pending.extend(f for f in out if f.pts is not None)

        try:
            for i, want in enumerate(wants):
                kpos = kposes[i]
                while pending and pending[0].pts < want.ticks:
                    pending.popleft()
                if not pending and (packets is None or kpos > fed_key):
                    packets = self._seek(container, stream, kpos)
                    fed_key = -1
                # Drain the decoder right after the wanted packet when the next want lies in
                # another GOP: frames held back for B-frame reordering and frame threads come
                # out at once instead of after decoding packets nobody wants.
                last_in_gop = i + 1 == len(wants) or kposes[i + 1] != kpos or wants[i + 1].keyframe
                while not pending and packets is not None:
                    try:
                        packet = next(packets)
                    except (StopIteration, av.FFmpegError) as exc:
                        if not isinstance(exc, StopIteration):
                            log.debug("demux error in %s: %s", self.path, exc)
                        decode(None)
                        packets = None
                        break
                    if not packet.size:
                        decode(None)
                        packets = None
                        break
                    pts = packet.pts
                    if packet.is_keyframe and pts is not None:
                        fed_key = max(fed_key, index.key_for(int(pts)))
                    if want.keyframe and last_in_gop:
                        cc.skip_frame = "NONKEY"
                    elif pts is not None and pts < want.ticks:
                        cc.skip_frame = "NONREF"  # nothing later needs a non-reference frame
                    else:
                        cc.skip_frame = "DEFAULT"
                    decode(packet)
                    if last_in_gop and pts == want.ticks:
                        decode(None)
                        packets = None  # drained: the next want seeks
                    while pending and pending[0].pts < want.ticks:
                        pending.popleft()
                while pending and pending[0].pts < want.ticks:  # frames the final drain released
                    pending.popleft()
                if not pending:
                    if packets is None and i + 1 < len(wants) and not self.index.complete:
                        return  # the file ends before this frame (truncated)
                    log.debug("frame at pts %s of %s could not be decoded", want.ticks, self.path)
                    continue
                f = pending.popleft()
                ticks = int(f.pts)
                yield Frame(self.camera, self._frame_index(ticks), index.seconds(ticks), self._rgb(f), None)
        finally:
            container.close()
            self._container = None
