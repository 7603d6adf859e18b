"""`streamvg search`, `streamvg monitor`, `streamvg demo` and `streamvg query`: the jobs users run."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from streamvg.config import (
    EngineConfig,
    JsonlSinkConfig,
    PipelineConfig,
    QueryConfig,
    SamplingConfig,
    SinksConfig,
    SourceConfig,
    load_pipeline,
)
from streamvg.errors import ConfigError
from streamvg.pipeline import Pipeline, RunSummary, Segment, send_query_command
from streamvg.redaction import mask_url

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".ts", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp"}

err_console = Console(stderr=True)


def expand_videos(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for video files, in a stable order."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file())
            if not found:
                raise ConfigError(f"{p}: folder holds no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}); give files or another folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder; check the path")
    return out


def camera_names(files: list[Path]) -> list[str]:
    """A unique camera name per file, from its stem (a.mp4 → a, a second a.mp4 → a-2)."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for f in files:
        base = "".join(c if c.isalnum() or c in "_.-" else "_" for c in f.stem) or "video"
        if not base[0].isalnum():
            base = "v" + base
        n = seen.get(base, 0) + 1
        seen[base] = n
        names.append(base if n == 1 else f"{base}-{n}")
    return names


def _segments_table(segments: list[Segment], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for col in ("video", "query", "track", "start", "end", "best at", "score", "box (x1,y1,x2,y2)", "thumbnail"):
        table.add_column(col, overflow="fold")
    for s in segments:
        table.add_row(
            Path(s.video).name, s.query, str(s.track_id), f"{s.start_s:.2f}s", f"{s.end_s:.2f}s",
            f"{s.best_t:.2f}s", f"{s.best_score:.2f}", ",".join(f"{v:.0f}" for v in s.best_xyxy), s.thumbnail or "",
        )
    return table


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def search(
    paths: Annotated[list[Path], typer.Argument(help="Video files or folders of videos.", show_default=False)],
    query: Annotated[list[str], typer.Option("--query", "-q", help="What to look for; repeat for several queries.")],
    fps: Annotated[float, typer.Option(help="Frames sampled per second of video.")] = 1.0,
    window: Annotated[int, typer.Option(help="Frames per window (images per model prompt).")] = 4,
    stride: Annotated[int, typer.Option(help="Frames the window advances by (< window overlaps).")] = 2,
    snap: Annotated[str, typer.Option(help="'exact' frame times, or 'keyframe' (much faster decoding).")] = "exact",
    engine: Annotated[str, typer.Option(help="gemvg (transformers), gemvg-trt, replay (stored answers) or openai.")] = "gemvg",
    model: Annotated[str | None, typer.Option(help="Model directory or hub id (gemvg).")] = None,
    replay: Annotated[Path | None, typer.Option(help="Groundings JSONL for --engine replay.")] = None,
    base_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible endpoint for --engine openai (vLLM, SGLang, TensorRT-LLM), e.g. "
        "http://gpu-box:8000/v1; its API key, if any, from STREAMVG_ENGINE__API_KEY.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Windows grounded together.")] = 4,
    min_score: Annotated[float, typer.Option(help="Drop boxes scoring below this.")] = 0.0,
    out: Annotated[Path | None, typer.Option(help="Write the segments as JSON lines here.")] = None,
    thumbnails: Annotated[Path | None, typer.Option(help="Write one JPEG per segment, box drawn, into this folder.")] = None,
    events: Annotated[Path | None, typer.Option(help="Also write every event (groundings, tracks) as JSONL here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the segments as JSON on stdout (no table, no progress).")] = False,
    clips: Annotated[Path | None, typer.Option(help="Write one MP4 per segment (box and track id drawn, 1 s before/after) into this folder.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report (cards per segment, timelines per video) to this file.")] = None,
    mot: Annotated[Path | None, typer.Option(help="Write MOTChallenge files (frame,id,x,y,w,h,score,-1,-1,-1), one per video and query, into this folder.")] = None,
) -> None:
    """Search video files for what a query describes; print where it appears (segments).

    Each video is sampled at --fps, grouped into windows of --window frames, grounded by
    the engine, and the boxes are tracked; every track becomes a segment: start/end time,
    the best frame and box, and (with --thumbnails) a picture with the box drawn.
    Ctrl-C stops early and keeps what was found.

    Example: streamvg search videos/ -q "a person carrying a red bag" --model /models/gem-vg --thumbnails thumbs/
    """
    files = expand_videos(paths)
    names = camera_names(files)
    try:
        cfg = PipelineConfig(
            name="search",
            sources=[SourceConfig(name=n, uri=str(f)) for n, f in zip(names, files, strict=True)],
            sampling=SamplingConfig(fps=fps, window_size=window, stride=stride, snap=snap),  # type: ignore[arg-type]
            queries=[QueryConfig(id=f"q{i + 1}", text=t, min_score=min_score) for i, t in enumerate(query)],
            engine=EngineConfig(
                kind=engine, model=model, device=device, batch_size=batch_size,  # type: ignore[arg-type]
                replay_path=str(replay) if replay else None, base_url=base_url,
                api_key=os.environ.get("STREAMVG_ENGINE__API_KEY") or None,
            ),
            sinks=SinksConfig(jsonl=JsonlSinkConfig(path=str(events)) if events else None),
        )
    except Exception as exc:
        from pydantic import ValidationError

        from streamvg.config import format_validation_error

        if isinstance(exc, ValidationError):
            raise ConfigError(format_validation_error(exc, source="streamvg search").replace("\n", "; ")) from exc
        raise
    if engine in ("gemvg", "gemvg-trt") and not model:
        raise ConfigError("--model is required with --engine gemvg: give a model directory or hub id (or use --engine replay --replay FILE)")

    from streamvg.pipeline import default_sinks

    sinks = default_sinks(cfg) if events else []
    pipe = Pipeline(cfg, sinks=sinks, collect_segments=True, thumbnails_dir=thumbnails, control=False,
                    log_errors=False)  # the summary below reports them
    summary = _run_with_progress(pipe, names, files, show=not json_out)
    segments = summary.segments
    _write_results(summary, names, files, cfg, clips=clips, report=report, mot=mot, quiet=json_out)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as fh:
            for s in segments:
                fh.write(json.dumps(s.to_json()) + "\n")
    if json_out:
        typer.echo(json.dumps({"segments": [s.to_json() for s in segments], "interrupted": summary.interrupted,
                               "windows_grounded": summary.windows_grounded,
                               "windows_failed": summary.windows_failed,
                               "unparseable_answers": summary.unparseable_answers,
                               "error": summary.error}))
    else:
        console = Console()
        title = f"{len(segments)} segment(s) in {len(files)} video(s), {summary.windows_grounded} windows, {summary.elapsed_s:.1f}s"
        console.print(_segments_table(segments, title))
        if summary.windows_failed and not summary.error:
            err_console.print(f"[yellow]grounding failed for {summary.windows_failed} window(s); they were skipped[/]")
        if summary.unparseable_answers:
            err_console.print(f"[yellow]{summary.unparseable_answers} model answer(s) could not be parsed; those windows were skipped[/]")
        if out is not None:
            err_console.print(f"segments written to {out}")
    for cam in summary.cameras.values():
        if cam.state == "failed":
            err_console.print(f"[red]{Path(cam.uri).name}: {cam.detail}[/]")
    if summary.error:
        err_console.print(f"[red]error: {summary.error}[/]")
        err_console.print("[yellow]the segments above are what was found before the engine stopped[/]")
        raise typer.Exit(1)
    if summary.interrupted:
        err_console.print("[yellow]interrupted: the segments above are what was found so far[/]")
        raise typer.Exit(130)


def _write_results(
    summary: RunSummary, names: list[str], files: list[Path], cfg: PipelineConfig, *,
    clips: Path | None, report: Path | None, mot: Path | None, quiet: bool,
) -> None:
    """`search --clips / --report / --mot`: files people look at, written after the run
    (also after Ctrl-C or an engine failure: what was found is kept)."""
    if clips is None and report is None and mot is None:
        return
    from streamvg import reports

    segments = summary.segments
    clip_paths: list[Path | None] | None = None
    if clips is not None:
        clip_paths = reports.write_clips(segments, clips)
        if not quiet:
            err_console.print(f"{sum(p is not None for p in clip_paths)} clip(s) written to {clips}")
    if mot is not None:
        written = reports.write_mot(segments, mot, [(n, q.id) for n in names for q in cfg.queries])
        if not quiet:
            err_console.print(f"{len(written)} MOTChallenge file(s) written to {mot}")
    if report is not None:
        videos = reports.videos_from_summary(summary.cameras, {n: str(f) for n, f in zip(names, files, strict=True)})
        reports.write_report(report, segments, videos=videos, queries=[(q.id, q.text) for q in cfg.queries],
                             clips=clip_paths)
        if not quiet:
            err_console.print(f"report written to {report}")


def _run_with_progress(pipe: Pipeline, names: list[str], files: list[Path], *, show: bool) -> RunSummary:
    interrupted = False
    pipe.start()
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
        TextColumn("{task.fields[frames]} frames"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, disable=not show or (not err_console.is_terminal and not _force_progress()),
    )
    s = pipe.config.sampling
    tasks: dict[str, Any] = {}
    try:
        with progress:
            for name, f in zip(names, files, strict=True):
                tasks[name] = progress.add_task(f.name, total=None, frames=0)
            while not pipe.wait(0.1):
                for name, task in tasks.items():
                    cam = pipe.cameras[name]
                    total = None
                    if cam.duration_s and s.fps:
                        n_frames = max(1, int(cam.duration_s * s.fps))
                        total = max(1, (max(0, n_frames - s.window_size) + s.stride - 1) // s.stride + 1)
                    progress.update(task, completed=cam.windows_grounded, total=total, frames=cam.frames_in)
            for name, task in tasks.items():
                cam = pipe.cameras[name]
                progress.update(task, completed=cam.windows_grounded, total=max(cam.windows_grounded, 1), frames=cam.frames_in)
    except KeyboardInterrupt:
        interrupted = True
    pipe.stop()
    return pipe.summary(interrupted=interrupted)


def _force_progress() -> bool:
    return os.environ.get("STREAMVG_PROGRESS") == "1"


def _camera_table(pipe: Pipeline) -> Table:
    table = Table(title=f"streamvg monitor · {pipe.name} · {len(pipe.queries)} queries · {pipe.windows_grounded} windows · {pipe.events_published} events")
    for col in ("camera", "state", "frames", "dropped", "windows", "stale dropped", "failed", "latency", "detail"):
        table.add_column(col, overflow="fold")
    colors = {"up": "green", "connecting": "yellow", "stalled": "yellow", "down": "red", "failed": "red"}
    for cam in pipe.cameras.values():
        c = colors.get(cam.state, "white")
        table.add_row(
            cam.name, f"[{c}]{cam.state}[/]", str(cam.frames_in), str(cam.frames_dropped), str(cam.windows_grounded),
            str(cam.windows_dropped), str(cam.windows_failed), f"{cam.last_latency_ms:.0f} ms" if cam.last_latency_ms is not None else "-",
            cam.detail[:90],
        )
    return table


def monitor(
    pipeline_file: Annotated[Path, typer.Argument(help="Pipeline YAML (see pipelines/monitor-rtsp.yaml).")],
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    role: Annotated[str, typer.Option(help="all (one process), ingest (cameras → Redis work stream) or ground (workers).")] = "all",
    view: Annotated[bool, typer.Option("--view/--no-view", help="Live per-camera status table (on a terminal).")] = True,
    duration_s: Annotated[float | None, typer.Option(help="Stop after this many seconds (default: run until Ctrl-C/SIGTERM).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary at exit.")] = False,
) -> None:
    """Run a live multi-camera pipeline and publish events to Redis (or JSONL without a Redis URL).

    Cameras reconnect forever; one dead camera never stops the others. SIGINT/SIGTERM
    stop gracefully: sinks are flushed within 5 s. Add or remove standing queries while it
    runs with `streamvg query add|remove`.
    """
    cfg = load_pipeline(pipeline_file)
    if role != "all":
        from streamvg.cli.scaleout import run_role

        run_role(cfg, role, metrics_port=metrics_port, duration_s=duration_s, json_out=json_out)
        return
    if not cfg.sources:
        raise ConfigError(f"{pipeline_file}: sources: no cameras configured; add at least one under sources:")
    if cfg.sinks.redis is None and cfg.sinks.jsonl is None and cfg.sinks.mqtt is None:
        err_console.print("no Redis URL configured: writing events to streamvg-events.jsonl")
    pipe = Pipeline(cfg, metrics_port=metrics_port)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    pipe.start()
    started = time.monotonic()
    show = view and err_console.is_terminal and not json_out
    try:
        with Live(_camera_table(pipe), console=err_console, refresh_per_second=2, transient=False) if show else _Null() as live:
            while not stop.wait(0.5):
                if live is not None:
                    live.update(_camera_table(pipe))
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    break
                if pipe.wait(0):
                    break
    finally:
        t0 = time.monotonic()
        pipe.stop(timeout=4.0)
        for s, h in old.items():
            signal.signal(s, h)
    summary = pipe.summary()
    if json_out:
        typer.echo(json.dumps({
            "windows_grounded": summary.windows_grounded, "windows_failed": summary.windows_failed,
            "events_published": summary.events_published, "shutdown_s": round(time.monotonic() - t0, 3),
            "error": summary.error,
            "cameras": {n: {"state": c.state, "frames_in": c.frames_in, "windows_grounded": c.windows_grounded,
                            "windows_dropped": c.windows_dropped, "windows_failed": c.windows_failed,
                            "reconnects": c.reconnects} for n, c in summary.cameras.items()},
        }))
    else:
        failed = f", {summary.windows_failed} failed" if summary.windows_failed else ""
        err_console.print(f"stopped: {summary.windows_grounded} windows grounded{failed}, "
                          f"{summary.events_published} events published")
    if summary.error:
        err_console.print(f"[red]error: {summary.error}[/]")
        raise typer.Exit(1)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated videos, answers and events.")] = Path("streamvg-demo"),
    cameras: Annotated[int, typer.Option(min=1, max=8, help="Cameras in the generated scene.")] = 3,
    duration_s: Annotated[float, typer.Option(min=2.0, max=120.0, help="Length of the generated videos, seconds.")] = 12.0,
    redis_url: Annotated[str, typer.Option(help="Publish here if it answers, else write JSONL.")] = "redis://127.0.0.1:6379/0",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """A whole StreamVG run on any machine, no model needed.

    Generates a multi-camera scene of moving shapes (with its exact ground truth), grounds
    it with the replay engine fed from that ground truth, tracks every answer, publishes
    the events to Redis when one answers (else to OUT/events.jsonl), and prints the tracks
    found with their identity score (IDF1) against the ground truth.
    """
    from streamvg.demo import run_demo

    result = run_demo(out, cameras=cameras, duration_s=duration_s, redis_url=redis_url,
                      redis_ok=_redis_answers(redis_url), show=not json_out)
    if json_out:
        typer.echo(json.dumps(result))


query_app = typer.Typer(help="Add or remove standing queries of a running `streamvg monitor`.", no_args_is_help=True)


@query_app.command("add")
def query_add(
    query_id: Annotated[str, typer.Argument(help="Id of the query (letters, digits, _ . -).")],
    text: Annotated[str, typer.Argument(help="The question, e.g. 'a person in a red jacket'.")],
    pipeline: Annotated[str, typer.Option(help="Pipeline name (its `name:`).")] = "default",
    mode: Annotated[str, typer.Option(help="direct or reason.")] = "direct",
    url: Annotated[str, typer.Option(envvar="STREAMVG_REDIS_URL", help="Redis URL.")] = "redis://127.0.0.1:6379/0",
) -> None:
    """Start asking a query in every window of PIPELINE from now on."""
    q = QueryConfig(id=query_id, text=text, mode=mode)  # type: ignore[arg-type]
    entry = _send(url, pipeline, "add", query=q)
    typer.echo(f"query {query_id} added to pipeline {pipeline} ({entry})")


@query_app.command("remove")
def query_remove(
    query_id: Annotated[str, typer.Argument(help="Id of the query to stop.")],
    pipeline: Annotated[str, typer.Option(help="Pipeline name (its `name:`).")] = "default",
    url: Annotated[str, typer.Option(envvar="STREAMVG_REDIS_URL", help="Redis URL.")] = "redis://127.0.0.1:6379/0",
) -> None:
    """Stop asking a query; its open tracks end."""
    entry = _send(url, pipeline, "remove", query_id=query_id)
    typer.echo(f"query {query_id} removed from pipeline {pipeline} ({entry})")


def _send(url: str, pipeline: str, op: str, **kw: Any) -> str:
    import redis

    from streamvg.errors import PublishError

    try:
        return send_query_command(url, pipeline, op, **kw)  # type: ignore[arg-type]
    except redis.RedisError as exc:
        raise PublishError(f"cannot reach Redis at {mask_url(url)} ({exc.__class__.__name__}); check --url and that Redis runs") from exc


def register(app: typer.Typer) -> None:
    app.command("search")(search)
    app.command("monitor")(monitor)
    app.command("demo")(demo)
    app.add_typer(query_app, name="query")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
