"""One self-contained static HTML report of a search: no server, no network, no script.

Per query, the segments as cards (the best frame with its box, video, times, score, track,
a link to its clip when clips were written) and, per video, a timeline with one row per
query showing when that query's tracks were present. Thumbnails are JPEG data URIs inside
the file, so the report can be mailed or opened from a phone's downloads. The layout is a
responsive grid: cards reflow to one column on a phone, long file names wrap, nothing is
wider than the screen.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streamvg.reports.clips import SegmentLike
from streamvg.reports.draw import draw_box, track_colour

__all__ = ["VideoInfo", "render_report", "thumbnail_data_uri", "videos_from_summary", "write_report"]

log = logging.getLogger(__name__)

#: Thumbnails are scaled to at most this width (pixels): sharp on a phone, a few tens of KB each.
THUMB_WIDTH = 480


@dataclass(frozen=True)
class VideoInfo:
    """A searched video: its camera name, what to show for it, its length (s) if known."""

    camera: str
    name: str
    duration_s: float | None = None


_CSS = """
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1f23;background:#f4f5f7}
header,main{max-width:1200px;margin:0 auto;padding:12px 16px}
header{padding-top:20px}
h1{font-size:1.4rem;margin:0 0 4px}
h2{font-size:1.15rem;margin:24px 0 8px}
h3{font-size:1rem;margin:16px 0 6px;overflow-wrap:anywhere}
.meta{color:#5b606a;font-size:.9rem;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,260px),1fr));gap:12px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);overflow:hidden;min-width:0}
.card img{display:block;width:100%;height:auto;background:#222}
.card .body{padding:8px 10px}
.card .title{font-weight:600;display:flex;gap:6px;align-items:center;flex-wrap:wrap}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;flex:none}
.card .video{overflow-wrap:anywhere;color:#5b606a;font-size:.85rem}
.card a{color:#0a58ca}
.none{color:#5b606a;font-style:italic}
.timeline{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:8px 10px;margin-bottom:12px}
.row{display:flex;align-items:center;gap:8px;margin:4px 0}
.row .label{flex:0 0 5.5em;font-size:.85rem;overflow-wrap:anywhere}
.track{position:relative;flex:1 1 auto;min-width:0;background:#e8eaee;border-radius:3px;overflow:hidden}
.bar{position:absolute;min-width:3px;border-radius:2px}
.axis{display:flex;justify-content:space-between;font-size:.75rem;color:#5b606a;margin-left:calc(5.5em + 8px)}
"""


def thumbnail_data_uri(image: NDArray[np.uint8], xyxy: Sequence[float], colour: tuple[int, int, int], label: str) -> str:
    """The frame (RGB) with its box drawn, scaled to `THUMB_WIDTH`, as a JPEG data URI."""
    import cv2

    img: NDArray[Any] = np.ascontiguousarray(image).copy()
    draw_box(img, xyxy, colour, label)
    h, w = img.shape[:2]
    if w > THUMB_WIDTH:
        img = cv2.resize(img, (THUMB_WIDTH, max(2, round(h * THUMB_WIDTH / w))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 82])
    if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
        raise ValueError("the thumbnail could not be encoded as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _thumbnail(seg: SegmentLike) -> str | None:
    colour = track_colour(seg.camera, seg.query_id, seg.track_id)
    frame = getattr(seg, "best_frame", None)
    if frame is not None:
        return thumbnail_data_uri(frame, seg.best_xyxy, colour, f"#{seg.track_id}")
    if seg.thumbnail and Path(seg.thumbnail).is_file():  # a JPEG written by --thumbnails
        return "data:image/jpeg;base64," + base64.b64encode(Path(seg.thumbnail).read_bytes()).decode("ascii")
    return None


_LANE_PX = 10  # height of one lane of a timeline row


def _lanes(spans: Sequence[tuple[float, float]]) -> list[int]:
    """A lane per span so that spans sharing a lane never overlap (greedy, by start).

    Example:
        >>> _lanes([(0, 5), (1, 2), (3, 4), (6, 7)])
        [0, 1, 1, 0]
    """
    ends: list[float] = []
    out = [0] * len(spans)
    for i in sorted(range(len(spans)), key=lambda k: spans[k][0]):
        a, b = spans[i]
        lane = next((j for j, end in enumerate(ends) if end < a), len(ends))
        if lane == len(ends):
            ends.append(b)
        else:
            ends[lane] = b
        out[i] = lane
    return out


def _fmt_t(t: float) -> str:
    if t < 60:
        return f"{t:.2f}s"
    m, s = divmod(t, 60.0)
    return f"{int(m)}:{s:05.2f}"


def _css_colour(c: tuple[int, int, int]) -> str:
    # Dark outline colours for bars on a light page: the palette's white would vanish.
    r, g, b = c
    if r + g + b > 600:
        r, g, b = 90, 90, 90
    return f"rgb({r},{g},{b})"


def render_report(
    segments: Sequence[SegmentLike],
    *,
    videos: Sequence[VideoInfo],
    queries: Sequence[tuple[str, str]],
    clips: Sequence[str | os.PathLike[str] | None] | None = None,
    base_dir: str | os.PathLike[str] = ".",
    title: str = "StreamVG search",
    subtitle: str = "",
) -> str:
    """The report as one HTML string.

    Args:
        segments: The search's segments.
        videos: Every searched video, in order (each gets a timeline, found or not).
        queries: `(query_id, text)` of every query, in order (each gets a section).
        clips: A clip path per segment (same order; None where none was written).
        base_dir: Folder the report is written into (clip links are relative to it).
        title, subtitle: Page heading and the line below it.
    """
    e = html.escape
    clip_of: dict[int, str] = {}
    if clips is not None:
        for i, c in enumerate(clips):
            if c is not None:
                clip_of[i] = Path(os.path.relpath(Path(c).resolve(), Path(base_dir).resolve())).as_posix()
    names = {v.camera: v.name for v in videos}
    parts: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name=viewport content="width=device-width,initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1><div class=meta>{e(subtitle)}</div></header><main>",
    ]
    # Timelines: one block per video, one row per query.
    parts.append("<h2>Timelines</h2>")
    for v in videos:
        mine = [s for s in segments if s.camera == v.camera]
        length = v.duration_s or max([s.end_s for s in mine], default=0.0) or 1.0
        parts.append(f"<section class=timeline data-video='{e(v.camera)}'><h3>{e(v.name)}</h3>")
        for qid, text in queries:
            rows = [s for s in mine if s.query_id == qid]
            lanes = _lanes([(s.start_s, s.end_s) for s in rows])
            height = max(1, max(lanes, default=0) + 1) * _LANE_PX + 4
            parts.append(
                f"<div class=row><span class=label title='{e(text)}'>{e(qid)}</span>"
                f"<div class=track style='height:{height}px'>"
            )
            for s, lane in zip(rows, lanes, strict=True):
                left = 100.0 * max(0.0, min(s.start_s, length)) / length
                width = 100.0 * max(0.0, min(s.end_s, length) - max(0.0, s.start_s)) / length
                col = _css_colour(track_colour(s.camera, s.query_id, s.track_id))
                tip = f"{qid} track {s.track_id}: {_fmt_t(s.start_s)}–{_fmt_t(s.end_s)}"
                parts.append(
                    f"<span class=bar title='{e(tip)}' style='left:{left:.3f}%;width:{width:.3f}%;"
                    f"top:{2 + lane * _LANE_PX}px;height:{_LANE_PX - 2}px;background:{col}'></span>"
                )
            parts.append("</div></div>")
        parts.append(f"<div class=axis><span>0s</span><span>{e(_fmt_t(length))}</span></div></section>")
    # Cards per query.
    for qid, text in queries:
        idx = [i for i, s in enumerate(segments) if s.query_id == qid]
        parts.append(f"<section class=query data-query='{e(qid)}'><h2>{e(qid)}: “{e(text)}” · {len(idx)} segment(s)</h2>")
        if not idx:
            parts.append("<p class=none>Not found in any video.</p></section>")
            continue
        parts.append("<div class=cards>")
        for i in idx:
            s = segments[i]
            col = _css_colour(track_colour(s.camera, s.query_id, s.track_id))
            thumb = _thumbnail(s)
            img = (
                f"<img src='{thumb}' alt='best frame of track {s.track_id}'>"
                if thumb else "<div class=body><span class=none>no picture</span></div>"
            )
            clip = f" · <a href='{e(clip_of[i])}'>clip</a>" if i in clip_of else ""
            box = ", ".join(f"{v:.0f}" for v in s.best_xyxy)
            parts.append(
                f"<article class=card data-segment='{i}'>{img}<div class=body>"
                f"<div class=title><span class=swatch style='background:{col}'></span>track {s.track_id}{clip}</div>"
                f"<div class=video>{e(names.get(s.camera, Path(s.video).name))}</div>"
                f"<div>{_fmt_t(s.start_s)} – {_fmt_t(s.end_s)} ({s.end_s - s.start_s:.1f}s)</div>"
                f"<div class=meta>best at {_fmt_t(s.best_t)} · score {s.best_score:.2f} · box {e(box)}</div>"
                "</div></article>"
            )
        parts.append("</div></section>")
    parts.append("</main></body></html>")
    return "".join(parts)


def write_report(
    path: str | os.PathLike[str],
    segments: Sequence[SegmentLike],
    *,
    videos: Sequence[VideoInfo],
    queries: Sequence[tuple[str, str]],
    clips: Sequence[str | os.PathLike[str] | None] | None = None,
    title: str = "StreamVG search",
    subtitle: str | None = None,
) -> Path:
    """Write the report (see `render_report`) to `path`; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if subtitle is None:
        when = datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M")
        subtitle = f"{len(segments)} segment(s) in {len(videos)} video(s) · {when}"
    out.write_text(
        render_report(segments, videos=videos, queries=queries, clips=clips, base_dir=out.parent,
                      title=title, subtitle=subtitle),
        encoding="utf-8",
    )
    return out


def videos_from_summary(cameras: Mapping[str, object], files: Mapping[str, str]) -> list[VideoInfo]:
    """`VideoInfo`s from a run's camera states (`RunSummary.cameras`) and camera → file."""
    out = []
    for cam, f in files.items():
        state = cameras.get(cam)
        out.append(VideoInfo(cam, Path(f).name, getattr(state, "duration_s", None)))
    return out
