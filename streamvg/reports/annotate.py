"""Draw a run's events on its video: boxes, track ids and query, a colour per track.

Input is what a run published, one JSON event per line: a JSONL sink file, or the output
of `streamvg tail --json`. Lines are read leniently (only `kind`, `camera`, `query_id`,
`query`, `t`, `track_id`, `boxes` and `detail` are used; fields added by newer versions are
ignored), so an older `annotate` still draws a newer run. Track boxes come from
`track_start` / `track_update` events (not the `lost` ones: those boxes are predictions);
between two of a track's sampled frames the box is interpolated, so the annotated video
plays at the source's full rate.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamvg.errors import ConfigError
from streamvg.reports.draw import BoxTrack, draw_box, track_colour
from streamvg.reports.video import VideoWriter, read_frames

__all__ = ["AnnotateResult", "TrackBoxes", "annotate_video", "read_events", "track_boxes"]


@dataclass
class TrackBoxes:
    """One track's sampled boxes from events: key, query text, times and boxes."""

    camera: str
    query_id: str
    query: str
    track_id: int
    times: list[float] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class AnnotateResult:
    """What `annotate_video` wrote: frames, boxes drawn, the camera whose events it used."""

    path: Path
    camera: str
    frames: int
    boxes_drawn: int
    tracks: int


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of an events file (JSONL sink or `streamvg tail --json` output).

    Blank lines and non-event lines of `tail` (anything not starting with `{`) are skipped.

    Raises:
        ConfigError: the file is missing, or a line starting with `{` is not JSON.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such events file; give the JSONL file a run wrote (sinks.jsonl or tail --json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} cannot be read as text ({exc.__class__.__name__}); give a JSONL events file") from None
    out: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(text.splitlines()):
                break  # a run still writing (or killed) leaves a torn last line
            raise ConfigError(f"{p}:{n} is not a JSON event ({exc.msg}); give a JSONL events file") from None
        if isinstance(obj, dict):
            out.append(obj)
    return out


def track_boxes(events: Iterable[dict[str, Any]], camera: str | None = None) -> list[TrackBoxes]:
    """The tracks (per camera, query and track id) and their boxes in `events`."""
    tracks: dict[tuple[str, str, int], TrackBoxes] = {}
    for ev in events:
        if ev.get("kind") not in ("track_start", "track_update") or ev.get("detail") == "lost":
            continue
        cam, t, tid, boxes = ev.get("camera"), ev.get("t"), ev.get("track_id"), ev.get("boxes") or []
        if cam is None or t is None or tid is None or not boxes or (camera is not None and cam != camera):
            continue
        qid = str(ev.get("query_id") or "")
        key = (str(cam), qid, int(tid))
        tr = tracks.get(key)
        if tr is None:
            tr = tracks[key] = TrackBoxes(str(cam), qid, str(ev.get("query") or qid), int(tid))
        xyxy = boxes[0].get("xyxy") if isinstance(boxes[0], dict) else None
        if not isinstance(xyxy, list) or len(xyxy) != 4:
            continue
        tr.times.append(float(t))
        tr.boxes.append([float(v) for v in xyxy])
    return list(tracks.values())


def _camera_of_video(video: Path, cameras: Sequence[str]) -> str | None:
    # `streamvg search` names cameras after file stems (unsafe characters → "_").
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", video.stem)
    for c in cameras:
        if c in (video.stem, stem, video.name):
            return c
    return None


def annotate_video(
    video: str | os.PathLike[str],
    events: Sequence[dict[str, Any]] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    camera: str | None = None,
    queries: Sequence[str] | None = None,
    max_gap_s: float = 2.0,
    crf: int = 20,
) -> AnnotateResult:
    """Write `out`: `video` with the events' track boxes, ids and queries drawn.

    Args:
        video: The video file the events were made from.
        events: Event objects, or the path of an events file (`read_events`).
        out: Output MP4 (H.264); every source frame, at its own time.
        camera: Whose events to draw; default: the only camera in the events, or the one
            named after the video's file (as `streamvg search` names them).
        queries: Only these query ids (default: all).
        max_gap_s: Longest gap between a track's boxes bridged by interpolation.
        crf: x264 quality (lower keeps colours truer).

    Raises:
        ConfigError: no camera in the events matches the video (a video without any
            track is still written, with `tracks == 0` in the result).
        SourceError: the video cannot be read.
    """
    vpath = Path(video)
    evs = read_events(events) if isinstance(events, (str, os.PathLike)) else list(events)
    where = str(events) if isinstance(events, (str, os.PathLike)) else "the events"
    cams = sorted({str(e["camera"]) for e in evs if e.get("camera") is not None and e.get("kind") != "source_status"})
    if camera is None:
        if len(cams) == 1:
            camera = cams[0]
        else:
            camera = _camera_of_video(vpath, cams)
            if camera is None:
                listed = ", ".join(cams) if cams else "none"
                raise ConfigError(
                    f"{where} holds events of cameras {listed}; say which one {vpath.name} shows with --camera"
                )
    elif camera not in cams:
        raise ConfigError(f"{where} has no events of camera {camera!r} (it has: {', '.join(cams) or 'none'}); check --camera")
    tracks = [t for t in track_boxes(evs, camera) if queries is None or t.query_id in queries]
    drawn = [(BoxTrack(t.times, t.boxes, max_gap_s=max_gap_s), t) for t in tracks if t.times]
    n_frames = n_boxes = 0
    writer: VideoWriter | None = None
    outp = Path(out)
    try:
        for _index, ts, img in read_frames(vpath):
            if writer is None:
                writer = VideoWriter(outp, img.shape[1], img.shape[0], crf=crf)
            for bt, t in drawn:
                box = bt.box_at(ts)
                if box is None:
                    continue
                label = f"#{t.track_id} {t.query[:40]}"
                draw_box(img, box, track_colour(t.camera, t.query_id, t.track_id), label)
                n_boxes += 1
            writer.write(img, ts)
            n_frames += 1
    finally:
        if writer is not None:
            writer.close()
    return AnnotateResult(outp, camera, n_frames, n_boxes, len(drawn))
