"""`streamvg probe URI`: what a source holds and which frames StreamVG would sample from it."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Annotated, Any

import typer

from streamvg.sources import SourceStatus, is_live, open_source

__all__ = ["LIVE_TIMEOUT_S", "probe", "register"]

# A live camera that has sent nothing for this long is not going to answer a probe:
# long enough for a slow RTSP handshake and one reconnect, short enough to wait for.
LIVE_TIMEOUT_S = 20.0


def probe(
    uri: Annotated[str, typer.Argument(help="Video file, stream URL (rtsp://, http://, …) or device.")],
    fps: Annotated[float | None, typer.Option("--fps", min=0.001, help="Sample this many frames per second (default: every frame).")] = None,
    snap: Annotated[str, typer.Option("--snap", help="'exact' or 'keyframe' (files: nearest keyframe within --tolerance).")] = "exact",
    tolerance_s: Annotated[float | None, typer.Option("--tolerance", min=0.0, help="Keyframe snap tolerance in seconds (default: half the sampling period).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=0, help="Stop after this many frames (default: all for files, 25 for live sources).")] = None,
    timeout_s: Annotated[float | None, typer.Option("--timeout", min=0.1, help=f"Live sources: give up (exit 1, with the last status) after this many seconds without a frame (default {LIVE_TIMEOUT_S:.0f}).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the stream info as one JSON line too.")] = False,
) -> None:
    """Print a video's or camera's stream info and the frames a sampler would take.

    The info (codec, size, fps, duration, keyframe interval) comes first, then one JSON
    line per sampled frame, `{"index": int, "pts": float}`, to check sampling.

    Live sources print status changes to stderr and stop after --limit frames (Ctrl-C stops early).
    """
    from streamvg.cli.outcome import EXIT_FAILURES, EXIT_INTERRUPTED
    from streamvg.errors import ConfigError

    if snap not in ("exact", "keyframe"):
        raise ConfigError(f"--snap must be 'exact' or 'keyframe', got {snap!r}", field="--snap")
    live = is_live(uri)
    if limit is None and live:
        limit = 25
    if timeout_s is None and live:
        timeout_s = LIVE_TIMEOUT_S
    last_status: list[SourceStatus] = []

    def on_status(s: SourceStatus) -> None:
        last_status[:] = [s]
        if live:
            typer.echo(f"# {s.camera} {s.state}{': ' + s.detail if s.detail else ''}", err=True)

    src = open_source(uri, fps=fps, snap=snap, tolerance_s=tolerance_s, on_status=on_status)  # type: ignore[arg-type]
    interrupted = threading.Event()
    timed_out = threading.Event()
    done = threading.Event()
    last_frame = [time.monotonic()]
    old = signal.getsignal(signal.SIGINT)

    def on_sigint(*_: object) -> None:
        interrupted.set()
        src.close()

    def watchdog() -> None:
        assert timeout_s is not None
        while not done.wait(0.2):
            if time.monotonic() - last_frame[0] >= timeout_s:
                timed_out.set()
                src.close()
                return

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    if timeout_s is not None:
        threading.Thread(target=watchdog, name="probe-timeout", daemon=True).start()
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
            last_frame[0] = time.monotonic()
            if not info_printed:
                print_info()
                info_printed = True
            typer.echo(json.dumps({"index": frame.index, "pts": round(frame.pts, 6)}))
            if (limit is not None and n >= limit) or interrupted.is_set() or timed_out.is_set():
                break
    finally:
        done.set()
        src.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, old)
    if interrupted.is_set():
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if timed_out.is_set():
        status = last_status[0] if last_status else None
        last = f"{status.state}: {status.detail}" if status and status.detail else (status.state if status else "no status yet")
        typer.echo(f"error: {src.uri}: no frame within {timeout_s:g} s (last status {last}); check the address, the "
                   "credentials and that the camera streams, or raise --timeout", err=True)
        raise typer.Exit(EXIT_FAILURES)


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)
