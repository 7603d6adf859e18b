"""MOTChallenge export: one `gt.txt`-format file per video and query.

Each line is `frame,id,x,y,w,h,score,-1,-1,-1` (the MOTChallenge results format, which
motmetrics' `io.loadtxt(fmt="mot15-2D")` and TrackEval read): `frame` is the source
frame number counted from 1 as MOTChallenge does (StreamVG's `frame_index + 1`), `id` the
track id plus 1 (MOTChallenge ids start at 1, StreamVG's at 0), `x, y` the box's
top-left corner and `w, h` its size in pixels. Only the frames the pipeline grounded
appear (sampled at `--fps`); score a tracker against ground truth at those frames.
Files are named `{camera}_{query_id}.txt`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from streamvg.reports.clips import SegmentLike

__all__ = ["mot_lines", "write_mot"]


def mot_lines(segments: Iterable[SegmentLike]) -> list[str]:
    """The MOTChallenge lines of some segments, sorted by frame, then id.

    Example:
        >>> from types import SimpleNamespace as S
        >>> mot_lines([S(track_id=0, boxes=[(0.2, 4, [10, 20, 50, 60], 0.9)])])
        ['5,1,10.00,20.00,40.00,40.00,0.9000,-1,-1,-1']
    """
    rows: list[tuple[int, int, str]] = []
    for seg in segments:
        for _t, frame_index, (x1, y1, x2, y2), score in seg.boxes:
            frame, tid = int(frame_index) + 1, int(seg.track_id) + 1
            rows.append((frame, tid, f"{frame},{tid},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},{score:.4f},-1,-1,-1"))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [r[2] for r in rows]


def write_mot(
    segments: Sequence[SegmentLike], out_dir: str | os.PathLike[str],
    sequences: Iterable[tuple[str, str]] = (),
) -> list[Path]:
    """Write `{camera}_{query_id}.txt` per (camera, query) into `out_dir`.

    Args:
        segments: Search segments with their per-frame `boxes`.
        out_dir: Folder (created).
        sequences: (camera, query_id) pairs to write even when nothing was found there
            (an empty file says "searched, found nothing", a missing one "not searched").

    Returns:
        The files written, sorted.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[SegmentLike]] = defaultdict(list)
    for key in sequences:
        groups[key] = groups.get(key, [])
    for seg in segments:
        groups[(seg.camera, seg.query_id)].append(seg)
    paths = []
    for (camera, query_id), segs in sorted(groups.items()):
        path = folder / f"{camera}_{query_id}.txt"
        lines = mot_lines(segs)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths.append(path)
    return paths
