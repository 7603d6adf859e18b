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

from streamvg.cli import outcome, preflight
from streamvg.config import PipelineConfig, QueryConfig, load_pipeline, parse_pipeline
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
    ctx: typer.Context,
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
    cross_camera: Annotated[bool, typer.Option(
        "--cross-camera", help="The files are cameras covering the same time: ground one frame per camera at "
        "each instant and give the same object one global id across them (global tracks).")] = False,
    one_referent: Annotated[bool, typer.Option(
        "--one-referent", help="With --cross-camera: each query names one object, so its boxes in different "
        "cameras at one instant are that object (no extra model calls); otherwise the model is asked which "
        "box is the same object (correspondence requests).")] = False,
    start: Annotated[list[str] | None, typer.Option(
        help="With --cross-camera: common-clock seconds at a file's first frame, as CAMERA=SECONDS or, in file "
        "order, SECONDS; repeat per file. Default: every file starts at the same instant.")] = None,
    gating: Annotated[bool | None, typer.Option("--gating/--no-gating", help=GATING_HELP, show_default=False)] = None,
    offline_tracking: Annotated[bool, typer.Option("--offline-tracking/--online-tracking", help=OFFLINE_TRACKING_HELP)] = True,
) -> None:
    """Search video files for what a query describes; print where it appears (segments).

    Each video is sampled at --fps, grouped into windows of --window frames, grounded by
    the engine, and the boxes are tracked; every track becomes a segment: start/end time,
    the best frame and box, and (with --thumbnails) a picture with the box drawn.
    Track ids come from a second, offline tracking pass over the whole video (see
    --offline-tracking); events written during the run keep the live ids.
    Ctrl-C stops early and keeps what was found.

    Example: streamvg search videos/ -q "a person carrying a red bag" --model /models/gem-vg --thumbnails thumbs/
    """
    files = expand_videos(paths)
    names = camera_names(files)
    flags = {"fps": fps, "window": window, "stride": stride, "snap": snap, "engine": engine, "model": model,
             "replay": str(replay) if replay else None, "base_url": base_url, "device": device,
             "batch_size": batch_size, "events": str(events) if events else None}
    cfg = _search_config(ctx, names, files, query, min_score, flags)
    if cross_camera:
        cfg = _cross_camera_config(cfg, names, start or [], one_referent=one_referent)
    elif start or one_referent:
        raise ConfigError("--start and --one-referent go with --cross-camera; add --cross-camera or drop them")
    _apply_gating_flag(cfg, gating)
    if cfg.engine.kind in ("gemvg", "gemvg-trt") and not cfg.engine.model:
        raise ConfigError("--model is required with --engine gemvg: give a model directory or hub id, or set "
                          "STREAMVG_ENGINE__MODEL (or use --engine replay --replay FILE)")
    # Everything that can be found wrong before the search runs is, so no result is lost to it.
    if out is not None:
        preflight.check_output_file(out, "--out")
    if thumbnails is not None:
        preflight.check_output_dir(thumbnails, "--thumbnails")
    if cfg.engine.kind == "replay" and cfg.engine.replay_path:
        preflight.check_replay_file(cfg.engine.replay_path, "--replay")
    if cfg.sinks.jsonl is not None:
        preflight.check_output_file(Path(cfg.sinks.jsonl.path), "--events")

    from streamvg.pipeline import default_sinks

    sinks = default_sinks(cfg) if (cfg.sinks.jsonl is not None or cfg.sinks.redis is not None) else []
    pipe = Pipeline(cfg, sinks=sinks, collect_segments=True, offline_tracking=offline_tracking,
                    thumbnails_dir=thumbnails, control=False, log_errors=False)  # the summary below reports them
    summary = _run_with_progress(pipe, names, files, show=not json_out)
    segments = summary.segments
    _write_results(summary, names, files, cfg, clips=clips, report=report, mot=mot, quiet=json_out)
    failures = outcome.run_failures(summary)
    if out is not None:
        try:
            with out.open("w", encoding="utf-8") as fh:
                for s in segments:
                    fh.write(json.dumps(s.to_json()) + "\n")
        except OSError as exc:  # checked before the run; the disk filled up or the folder went away since
            failures.append(outcome.Failure(str(out), "", "output", f"--out {out} could not be written "
                                            f"({exc.strerror or type(exc).__name__}); the segments are printed instead"))
    code = outcome.run_exit_code(summary, failures, interrupted=summary.interrupted)
    if json_out:
        result: dict[str, Any] = {"segments": [s.to_json() for s in segments]}
        result.update(outcome.summary_fields(summary, failures, code))
        result.update(_delivery_json(summary))
        result.update(_work_json(summary, by_camera=True))
        if summary.global_tracks is not None:
            result["global_tracks"] = [g.to_json() for g in summary.global_tracks]
            if pipe.identity is not None:
                result["identity"] = pipe.identity.stats.as_dict()
        typer.echo(json.dumps(result))
    else:
        console = Console()
        title = f"{len(segments)} segment(s) in {len(files)} video(s), {summary.windows_grounded} windows, {summary.elapsed_s:.1f}s"
        console.print(_segments_table(segments, title))
        if summary.global_tracks is not None:
            console.print(_global_tracks_table(summary.global_tracks))
        if out is not None and not any(f.kind == "output" for f in failures):
            err_console.print(f"segments written to {out}")
    _print_failures(failures)
    if summary.error:
        err_console.print("[yellow]the segments above are what was found before the engine stopped[/]")
    if summary.interrupted:
        err_console.print("[yellow]interrupted: the segments above are what was found so far[/]")
    if code:
        raise typer.Exit(code)


_SEARCH_FLAGS = {
    "fps": "sampling.fps", "window": "sampling.window_size", "stride": "sampling.stride", "snap": "sampling.snap",
    "engine": "engine.kind", "model": "engine.model", "replay": "engine.replay_path", "base_url": "engine.base_url",
    "device": "engine.device", "batch_size": "engine.batch_size", "events": "sinks.jsonl.path",
}


def _search_config(ctx: typer.Context, names: list[str], files: list[Path], query: list[str], min_score: float,
                   flags: dict[str, Any]) -> PipelineConfig:
    """The search's pipeline: flags left at their default < STREAMVG_… variables < flags given."""
    defaults, given = preflight.flag_layers(ctx, _SEARCH_FLAGS, flags)
    fixed = {
        "name": "search",
        "sources": [{"name": n, "uri": str(f)} for n, f in zip(names, files, strict=True)],
        "queries": [{"id": f"q{i + 1}", "text": t, "min_score": min_score} for i, t in enumerate(query)],
    }
    return parse_pipeline(defaults, source="streamvg search", overrides={**given, **fixed})


def _print_failures(failures: list[outcome.Failure]) -> None:
    """One line per failure on stderr (red when it makes the run fail)."""
    for f in failures:
        if f.kind in ("windows_failed", "unparseable"):
            err_console.print(f"[yellow]{Path(f.input).name if f.camera else f.input}: {f.error}[/]")
        elif f.kind == "engine_stopped":
            err_console.print(f"[red]error: {f.error}[/]")
        else:
            err_console.print(f"[red]{Path(f.input).name if f.kind == 'unreadable' else f.input}: {f.error}[/]")


def _cross_camera_config(cfg: PipelineConfig, names: list[str], start: list[str], *, one_referent: bool) -> PipelineConfig:
    """`cfg` with multi-camera windows, the files' start times and identity on (`--cross-camera`)."""
    from streamvg.config import IdentityConfig

    if len(names) < 2:
        raise ConfigError(f"--cross-camera needs files of at least two cameras, got {len(names)}; give more files")
    starts: dict[str, float] = {}
    for i, item in enumerate(start):
        name, sep, value = item.rpartition("=")
        if not sep:
            if i >= len(names):
                raise ConfigError(f"--start {item}: more start times than files ({len(names)}); give one per file")
            name = names[i]
        elif name not in names:
            raise ConfigError(f"--start {item}: no camera {name!r}; cameras are {', '.join(names)}")
        try:
            starts[name] = float(value)
        except ValueError:
            raise ConfigError(f"--start {item}: {value!r} is not a number of seconds; write CAMERA=SECONDS, e.g. {names[0]}=1.5") from None
    sources = [src.model_copy(update={"start_s": starts.get(src.name, 0.0)}) for src in cfg.sources]
    sampling = cfg.sampling.model_copy(update={"multi_camera": True})
    identity = IdentityConfig(one_referent=["*"] if one_referent else [])
    return cfg.model_copy(update={"sources": sources, "sampling": sampling, "identity": identity})


def _global_tracks_table(tracks: list[Any]) -> Table:
    table = Table(title=f"{len(tracks)} global track(s) across cameras")
    for col in ("global id", "query", "cameras", "seen"):
        table.add_column(col, overflow="fold")
    for g in tracks:
        table.add_row(str(g.global_id), g.query, str(len(g.cameras)), g.summary())
    return table


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
    bar = show and (err_console.is_terminal or _force_progress())
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
        TextColumn("{task.fields[frames]} frames"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, disable=not bar,
    )
    lines = ProgressLines("search", _progress_interval_s(10.0)) if show and not bar else None
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
                if lines is not None:
                    lines.maybe(pipe)
            for name, task in tasks.items():
                cam = pipe.cameras[name]
                progress.update(task, completed=cam.windows_grounded, total=max(cam.windows_grounded, 1), frames=cam.frames_in)
    except KeyboardInterrupt:
        interrupted = True
    pipe.stop()
    return pipe.summary(interrupted=interrupted)


class ProgressLines:
    """Progress as one plain stderr line every `interval_s` when stderr is not a terminal
    (a log file, a pipe, CI): a bar there would print nothing until the end."""

    def __init__(self, what: str, interval_s: float) -> None:
        self.what = what
        self.interval_s = interval_s
        self.started = time.monotonic()
        self.last = self.started

    def maybe(self, pipe: Pipeline) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s:
            return
        self.last = now
        cams = list(pipe.cameras.values())
        done = sum(1 for c in cams if c.state in ("ended", "failed", "stopped"))
        failed = sum(c.windows_failed for c in cams)
        frames = sum(c.frames_in for c in cams)
        extra = f", {failed} failed" if failed else ""
        head = f"{time.strftime('%H:%M:%S')} {self.what}: {pipe.windows_grounded} windows grounded{extra}, {frames} frames"
        if self.what == "search":
            tail = f"{done}/{len(cams)} videos done"
        else:  # a monitor's cameras run until stopped: their states say more
            tail = ", ".join(f"{c.name} {c.state}" for c in cams[:8]) + (f" +{len(cams) - 8} more" if len(cams) > 8 else "")
        print(f"{head}, {pipe.events_published} events, {now - self.started:.0f} s; {tail}", file=sys.stderr, flush=True)


def _progress_interval_s(default: float) -> float:
    """Seconds between progress lines off a terminal; `STREAMVG_PROGRESS_INTERVAL_S` overrides."""
    try:
        value = float(os.environ.get("STREAMVG_PROGRESS_INTERVAL_S", default))
    except ValueError:
        return default
    return value if value > 0 else default


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
    gating: Annotated[bool | None, typer.Option("--gating/--no-gating", help=GATING_HELP, show_default=False)] = None,
) -> None:
    """Run a live multi-camera pipeline and publish events to Redis (or JSONL without a Redis URL).

    Cameras reconnect forever; one dead camera never stops the others. SIGINT/SIGTERM
    stop gracefully: sinks are flushed within 5 s. Add or remove standing queries while it
    runs with `streamvg query add|remove`.
    """
    cfg = load_pipeline(pipeline_file)
    if metrics_port is not None:
        preflight.check_metrics_port(metrics_port)
    _apply_gating_flag(cfg, gating)
    if role != "all":
        from streamvg.cli.scaleout import run_role

        run_role(cfg, role, metrics_port=metrics_port, duration_s=duration_s, json_out=json_out)
        return
    if not cfg.sources:
        raise ConfigError(f"{pipeline_file}: sources: no cameras configured; add at least one under sources:")
    preflight.check_pipeline(cfg, str(pipeline_file))
    if cfg.sinks.redis is None and cfg.sinks.jsonl is None and cfg.sinks.mqtt is None:
        err_console.print("no Redis URL configured: writing events to streamvg-events.jsonl")
    try:
        pipe = Pipeline(cfg, metrics_port=metrics_port)
    except OSError as exc:  # the port was taken between the check and now
        if metrics_port is None:
            raise
        raise ConfigError(preflight.metrics_port_message(metrics_port, exc), field="--metrics-port") from exc
    stop = threading.Event()
    stopped_by: list[int] = []  # the signal that stopped the run (SIGINT: exit 130, SIGTERM: 0)

    def _on_signal(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pipe.start()
        started = time.monotonic()
        show = view and err_console.is_terminal and not json_out
        lines = ProgressLines(f"monitor {cfg.name}", _progress_interval_s(30.0)) if not show and not json_out else None
        with Live(_camera_table(pipe), console=err_console, refresh_per_second=2, transient=False) if show else _Null() as live:
            while not stop.wait(0.5):
                if live is not None:
                    live.update(_camera_table(pipe))
                if lines is not None:
                    lines.maybe(pipe)
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    break
                if pipe.wait(0):
                    break
    finally:
        t0 = time.monotonic()
        pipe.stop(timeout=4.0)
        for s, h in old.items():
            signal.signal(s, h)
    interrupted = signal.SIGINT in stopped_by
    summary = pipe.summary(interrupted=interrupted)
    failures = outcome.run_failures(summary)
    all_failed = outcome.all_cameras_failed_error(summary) if summary.error is None else None
    if all_failed:
        summary.error = all_failed  # "error": null would read as a healthy run
    code = outcome.run_exit_code(summary, failures, interrupted=interrupted, all_cameras_must_fail=True)
    if json_out:
        result: dict[str, Any] = {
            "windows_grounded": summary.windows_grounded, "windows_failed": summary.windows_failed,
            "events_published": summary.events_published, "shutdown_s": round(time.monotonic() - t0, 3),
        }
        result.update(outcome.summary_fields(summary, failures, code))
        result.update(_delivery_json(summary))
        result.update(_work_json(summary))
        result["cameras"] = {n: {"state": c.state, "frames_in": c.frames_in, "windows_grounded": c.windows_grounded,
                                 "windows_dropped": c.windows_dropped, "windows_failed": c.windows_failed,
                                 "reconnects": c.reconnects, "detail": c.detail, **_camera_work_json(c)}
                             for n, c in summary.cameras.items()}
        typer.echo(json.dumps(result))
    else:
        failed = f", {summary.windows_failed} failed" if summary.windows_failed else ""
        err_console.print(f"{'interrupted' if interrupted else 'stopped'}: {summary.windows_grounded} windows grounded{failed}, "
                          f"{summary.events_published} events published")
    _print_failures(failures)
    if all_failed:
        err_console.print(f"[red]error: {all_failed}[/]")
    if code:
        raise typer.Exit(code)


def _delivery_json(summary: RunSummary) -> dict[str, Any]:
    """Delivery counts for `--json`: spooled, replayed, dropped (and why)."""
    return {"events_spooled": summary.events_spooled, "events_replayed": summary.events_replayed,
            "events_dropped": summary.events_dropped, "dropped_by_reason": summary.dropped_by_reason}


# --- change gating and model work (issue 18) ----------------------------------------

GATING_HELP = ("Skip windows in which nothing changed since the last grounded frame (default: the pipeline "
               "file's gating.enabled, 'auto' = on for model engines, off for replay).")


OFFLINE_TRACKING_HELP = (
    "Give the segments the ids of an offline tracking pass: once a video's frames are all grounded, its boxes are "
    "tracked again with each ambiguous pairing (objects crossing or walking side by side, a new object next to "
    "another) decided after seeing the next few answers, which keeps identities apart better at grounding "
    "rates (on benchmarks/tracking.py, +.02 to +.06 IDF1 at 1-2.5 answers a second, the same at 25). The table, --out, --json, --clips, --report, --mot and --thumbnails use these "
    "ids; events written while the search runs (--events, Redis) keep the live tracker's ids. With --cross-camera "
    "a segment's global id is that of the live track most of its boxes belonged to (segments in view at the "
    "same time never share one; a segment left without one gets an identity of its own). --online-tracking keeps the "
    "live ids everywhere.")


def _apply_gating_flag(cfg: PipelineConfig, gating: bool | None) -> None:
    if gating is not None:
        cfg.gating.enabled = gating


def _work_json(summary: RunSummary, *, by_camera: bool = False) -> dict[str, Any]:
    """`windows_unchanged` and the model's work totals (and per camera), for `--json`."""
    out: dict[str, Any] = {"windows_unchanged": summary.windows_unchanged, "model_work": dict(summary.work)}
    if by_camera:
        out["model_work_by_camera"] = {n: _camera_work_json(c) for n, c in summary.cameras.items()}
    return out


def _camera_work_json(cam: Any) -> dict[str, int]:
    from streamvg.pipeline.runtime import WORK_KEYS

    return {"windows_unchanged": cam.windows_unchanged, **{k: int(getattr(cam, k)) for k in WORK_KEYS}}


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the generated videos, answers and events.")] = Path("streamvg-demo"),
    cameras: Annotated[int, typer.Option(min=1, max=8, help="Cameras in the generated scene.")] = 3,
    duration_s: Annotated[float, typer.Option(min=2.0, max=120.0, help="Length of the generated videos, seconds.")] = 12.0,
    redis_url: Annotated[str, typer.Option(envvar=["STREAMVG_SINKS__REDIS__URL", "STREAMVG_REDIS_URL"],
                                           help="Publish here if it answers, else write JSONL.")] = "redis://127.0.0.1:6379/0",
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
    url: Annotated[str, typer.Option(envvar=["STREAMVG_REDIS_URL", "STREAMVG_SINKS__REDIS__URL"], help="Redis URL.")] = "redis://127.0.0.1:6379/0",
) -> None:
    """Start asking a query in every window of PIPELINE from now on."""
    q = QueryConfig(id=query_id, text=text, mode=mode)  # type: ignore[arg-type]
    entry = _send(url, pipeline, "add", query=q)
    typer.echo(f"query {query_id} added to pipeline {pipeline} ({entry})")


@query_app.command("remove")
def query_remove(
    query_id: Annotated[str, typer.Argument(help="Id of the query to stop.")],
    pipeline: Annotated[str, typer.Option(help="Pipeline name (its `name:`).")] = "default",
    url: Annotated[str, typer.Option(envvar=["STREAMVG_REDIS_URL", "STREAMVG_SINKS__REDIS__URL"], help="Redis URL.")] = "redis://127.0.0.1:6379/0",
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
