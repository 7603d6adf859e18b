"""One short H.264 MP4 per search segment, the track's box and id drawn on every frame.

A clip runs from `pad_s` before the segment's first sighting to `pad_s` after its last
(clamped to the video), at the source's full frame rate: the box is exact on the frames
the pipeline grounded and interpolated in between (`BoxTrack`). Names sort by video and
then time: `{camera}_{start:09.3f}s_{query_id}_track{track_id}.mp4`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from streamvg.errors import SourceError
from streamvg.reports.draw import BoxTrack, draw_box, track_colour, with_caption
from streamvg.reports.video import VideoWriter, read_frames

__all__ = ["SegmentLike", "clip_name", "write_clip", "write_clips"]

log = logging.getLogger(__name__)


class SegmentLike(Protocol):
    """What reports read of a search segment (`streamvg.pipeline.Segment` has it all)."""

    camera: str
    video: str
    query_id: str
    query: str
    track_id: int
    start_s: float
    end_s: float
    best_t: float
    best_xyxy: list[float]
    best_score: float
    thumbnail: str | None
    boxes: list[tuple[float, int, list[float], float]]


def clip_name(seg: SegmentLike) -> str:
    """File name of a segment's clip; sorts by camera, then start time.

    Example:
        >>> from types import SimpleNamespace as S
        >>> clip_name(S(camera="lobby", start_s=12.4, query_id="q1", track_id=3))
        'lobby_00012.400s_q1_track3.mp4'
    """
    return f"{seg.camera}_{max(0.0, seg.start_s):09.3f}s_{seg.query_id}_track{seg.track_id}.mp4"


def _track(seg: SegmentLike, max_gap_s: float) -> BoxTrack:
    if seg.boxes:
        return BoxTrack([b[0] for b in seg.boxes], [b[2] for b in seg.boxes], max_gap_s=max_gap_s)
    return BoxTrack([seg.best_t], [seg.best_xyxy], max_gap_s=max_gap_s)


def write_clip(
    seg: SegmentLike, path: str | os.PathLike[str], *, pad_s: float = 1.0, max_gap_s: float = 2.0, crf: int = 23,
) -> Path:
    """Write one segment's clip to `path`.

    Args:
        seg: The segment (its `video` must be a readable file).
        path: Output MP4.
        pad_s: Seconds of video kept before and after the segment (context).
        max_gap_s: Longest gap between the track's sampled boxes that is bridged by
            interpolation; across a longer gap no box is drawn.
        crf: x264 quality.

    Returns:
        `path`. The clip's first frame is at time 0. Below the picture (same pixel
        coordinates as the source) a caption strip shows the video and its own time.

    Raises:
        SourceError: the video cannot be read (moved, deleted, not a file).
    """
    track = _track(seg, max_gap_s)
    t0, t1 = max(0.0, min(seg.start_s, track.start) - pad_s), max(seg.end_s, track.end) + pad_s
    colour = track_colour(seg.camera, seg.query_id, seg.track_id)
    label = f"#{seg.track_id} {seg.query_id}"
    writer: VideoWriter | None = None
    first: float | None = None
    out = Path(path)
    try:
        for _index, t, frame in read_frames(seg.video, t0, t1):
            box = track.box_at(t)
            if box is not None:
                draw_box(frame, box, colour, label)
            img = with_caption(frame, f"{Path(seg.video).name} t={t:.2f}s")
            if writer is None:
                writer = VideoWriter(out, img.shape[1], img.shape[0], crf=crf)
                first = t
            assert first is not None
            writer.write(img, t - first)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise SourceError(
            f"{seg.video} has no frames between {t0:.2f}s and {t1:.2f}s; was the file changed since the search?",
            source=seg.video,
        )
    return out


def write_clips(
    segments: Sequence[SegmentLike], out_dir: str | os.PathLike[str], *, pad_s: float = 1.0,
    max_gap_s: float = 2.0, crf: int = 23,
) -> list[Path | None]:
    """Write a clip per segment into `out_dir`; one entry per segment (None: not written).

    A video that cannot be read costs its own clips only: the reason is logged once per
    video, in one sentence, and the other clips are still written.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[Path | None] = []
    failed: dict[str, str] = {}
    for seg in segments:
        if seg.video in failed:
            out.append(None)
            continue
        try:
            out.append(write_clip(seg, folder / clip_name(seg), pad_s=pad_s, max_gap_s=max_gap_s, crf=crf))
        except SourceError as exc:
            failed[seg.video] = str(exc)
            log.warning("no clips for %s: %s", seg.video, exc)
            out.append(None)
    return out
