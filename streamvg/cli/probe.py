"""`streamvg probe URI`: what a source holds and which frames StreamVG would sample from it."""

from __future__ import annotations

import json
import signal
import threading
from typing import Annotated, Any

import typer

from streamvg.sources import SourceStatus, is_live, open_source

__all__ = ["probe", "register"]


def probe(
    uri: Annotated[str, typer.Argument(help="Video file, stream URL (rtsp://, http://, …) or device.")],
    fps: Annotated[float | None, typer.Option("--fps", min=0.001, help="Sample this many frames per second (default: every frame).")] = None,
    snap: Annotated[str, typer.Option("--snap", help="'exact' or 'keyframe' (files: nearest keyframe within --tolerance).")] = "exact",
    tolerance_s: Annotated[float | None, typer.Option("--tolerance", min=0.0, help="Keyframe snap tolerance in seconds (default: half the sampling period).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="Stop after this many frames (default: all for files, 25 for live sources).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the stream info as one JSON line too.")] = False,
) -> None:
    """Print a video's or camera's stream info and the frames a sampler would take.

    The info (codec, size, fps, duration, keyframe interval) comes first, then one JSON
    line per sampled frame, `{"index": int, "pts": float}`, to check sampling.

    Live sources print status changes to stderr and stop after --limit frames (Ctrl-C stops early).
    """
    from streamvg.errors import ConfigError

    if snap not in ("exact", "keyframe"):
        raise ConfigError(f"--snap must be 'exact' or 'keyframe', got {snap!r}", field="--snap")
    live = is_live(uri)
    if limit is None and live:
        limit = 25

    def on_status(s: SourceStatus) -> None:
        if live:
            typer.echo(f"# {s.camera} {s.state}{': ' + s.detail if s.detail else ''}", err=True)

    src = open_source(uri, fps=fps, snap=snap, tolerance_s=tolerance_s, on_status=on_status)  # type: ignore[arg-type]
    stop = threading.Event()
    old = signal.getsignal(signal.SIGINT)
    def on_sigint(*_: object) -> None:
        stop.set()
        src.close()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    try:
        info_printed = False

        def print_info() -> None:
            info: dict[str, Any] = {"uri": src.uri, **src.info.as_dict()}
            if json_out:
                typer.echo(json.dumps(info))
            else:
                for k, v in info.items():
                    typer.echo(f"# {k}: {v if v is not None else 'unknown'}")

        if not live:
            print_info()
            info_printed = True
        if limit == 0:
            return
        for n, frame in enumerate(src, start=1):
            if not info_printed:
                print_info()
                info_printed = True
            typer.echo(json.dumps({"index": frame.index, "pts": round(frame.pts, 6)}))
            if (limit is not None and n >= limit) or stop.is_set():
                break
    finally:
        src.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, old)


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)
