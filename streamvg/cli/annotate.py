"""`streamvg annotate`: a run's events drawn on its video."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def annotate(
    video: Annotated[Path, typer.Argument(help="The video file the events were made from.", show_default=False)],
    events: Annotated[Path, typer.Option("--events", "-e", help="Events JSONL (a JSONL sink file or `streamvg tail --json` output).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Annotated MP4 to write (H.264).")] = Path("annotated.mp4"),
    camera: Annotated[str | None, typer.Option(help="Whose events to draw (default: the only camera, or the one named after VIDEO).")] = None,
    query: Annotated[list[str] | None, typer.Option("--query", "-q", help="Only this query id; repeat for several.")] = None,
    max_gap_s: Annotated[float, typer.Option(help="Longest gap (s) between a track's boxes that is bridged by interpolation.")] = 2.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
) -> None:
    """Draw a run's events on its video: boxes, track ids and query, a colour per track.

    Boxes are exact on the frames the pipeline grounded and interpolated in between, so the
    output plays at the video's own rate.

    Example: streamvg annotate lobby.mp4 --events events.jsonl --out lobby-annotated.mp4
    """
    from streamvg.reports import annotate_video

    res = annotate_video(video, events, out, camera=camera, queries=query or None, max_gap_s=max_gap_s)
    if json_out:
        typer.echo(json.dumps({"out": str(res.path), "camera": res.camera, "frames": res.frames,
                               "tracks": res.tracks, "boxes_drawn": res.boxes_drawn}))
    else:
        typer.echo(f"{res.path}: {res.frames} frames, {res.tracks} track(s) of camera {res.camera}, {res.boxes_drawn} boxes drawn")
    if res.tracks == 0:
        typer.echo(f"warning: {events} has no track events of camera {res.camera}; the video was copied without boxes", err=True)


def register(app: typer.Typer) -> None:
    app.command("annotate")(annotate)
