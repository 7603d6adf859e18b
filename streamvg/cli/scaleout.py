"""`streamvg monitor --role ingest|ground`: the scale-out roles (see `streamvg.scaleout`)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import typer

from streamvg.config import PipelineConfig
from streamvg.errors import ConfigError, PublishError
from streamvg.pipeline import Pipeline, Sink, default_sinks
from streamvg.sources import is_live


def _slot_sinks(config: PipelineConfig, role: str, max_slots: int = 64) -> list[Sink]:
    """The pipeline's sinks with a spool of this process's own: several processes of one
    role on a host take spool slots `{role}-0`, `{role}-1`, … so a restarted one replays
    what a dead one left behind."""
    assert config.sinks.redis is not None
    base = config.sinks.redis.spool_dir
    last: PublishError | None = None
    for slot in range(max_slots):
        redis_cfg = config.sinks.redis.model_copy(update={"spool_dir": os.path.join(base, f"{role}-{slot}")})
        sinks_cfg = config.sinks.model_copy(update={"redis": redis_cfg})
        try:
            return default_sinks(config.model_copy(update={"sinks": sinks_cfg}))
        except PublishError as exc:
            if "in use by another" not in str(exc):
                raise
            last = exc
    raise PublishError(f"all {max_slots} spool slots under {base} are in use; give this process another sinks.redis.spool_dir") from last


def run_role(cfg: PipelineConfig, role: str, *, metrics_port: int | None, duration_s: float | None, json_out: bool) -> None:
    """Run one scale-out role until the sources end (ingest of files), SIGINT/SIGTERM, or
    `duration_s`. Neither role exits because Redis is away: both wait for it."""
    from streamvg.scaleout import GroundWorker, WindowPublisher

    if role not in ("ingest", "ground"):
        raise ConfigError(f"--role {role!r} is not a role; use all, ingest or ground")
    if cfg.sinks.redis is None:
        raise ConfigError("--role ingest/ground needs sinks.redis.url in the pipeline file: the work streams live in Redis")
    stop = threading.Event()
    signals: list[int] = []  # SIGINT exits 130, SIGTERM 0 (streamvg.cli.outcome)

    def _on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    deadline = started + duration_s if duration_s else None

    def _watch_deadline() -> None:
        while deadline is not None and not stop.wait(0.2):
            if time.monotonic() >= deadline:
                stop.set()

    threading.Thread(target=_watch_deadline, daemon=True).start()
    try:
        if role == "ingest":
            if not cfg.sources:
                raise ConfigError("sources: no cameras configured; the ingest role needs at least one")
            live = [s.name for s in cfg.sources if is_live(s.uri)]
            publisher = WindowPublisher(
                cfg.sinks.redis.url, cfg.name, settings=cfg.scaleout, live_cameras=live,
                # the replay engine answers in original pixels and never looks at them: send frames whole
                max_pixels=None if cfg.engine.kind == "replay" else cfg.engine.max_pixels,
            )
            # Its sinks carry the cameras' source_status events (spooled through outages).
            pipe = Pipeline(cfg, sinks=_slot_sinks(cfg, "ingest"), window_sink=publisher.put,
                            metrics_port=metrics_port, control=False)
            sinks = pipe._sinks or []
            if pipe.metrics is not None:
                from prometheus_client import Gauge

                Gauge("streamvg_scaleout_windows_dropped", "Stale live windows dropped by ingest (buffer or backlog)",
                      registry=pipe.metrics.registry).set_function(lambda: float(publisher.dropped))
                Gauge("streamvg_scaleout_windows_buffered", "Windows waiting in ingest for Redis",
                      registry=pipe.metrics.registry).set_function(lambda: float(publisher.pending()))
            pipe.start()
            while not stop.is_set() and not pipe.wait(0.2):
                if publisher._fatal is not None:
                    raise publisher._fatal
            pipe.stop()
            # After each camera's last window: its tracks end on the ground worker that has it.
            publisher.end_cameras(s.name for s in cfg.sources)
            # Files lose nothing: wait for Redis as long as it takes (a second signal gives up);
            # stopped live cameras get 10 s.
            stopped = stop.is_set()
            stop.clear()
            delivered = publisher.drain(timeout=10.0 if stopped else None, stop=stop)
            publisher.close()
            for sink in sinks:
                sink.flush()
                sink.close()
            summary = {"role": "ingest", "windows_published": publisher.published, "windows_dropped": publisher.dropped,
                       "windows_undelivered": 0 if delivered else publisher.pending(),
                       "cameras": {n: c.state for n, c in pipe.cameras.items()}}
        else:
            worker = GroundWorker(cfg, metrics_port=metrics_port, stop=stop)
            try:
                worker.run(stop)
            finally:
                worker.close()
            summary = {"role": "ground", "worker": worker.worker_id, "windows_grounded": worker.windows_grounded,
                       "windows_failed": worker.failures.total, "leases_lost": worker.leases_lost,
                       "commits_refused": worker.commits_refused, "dead_letters": worker.dead_letters}
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(", ".join(f"{k}: {v}" for k, v in summary.items()), err=True)
    if signal.SIGINT in signals:
        from streamvg.cli.outcome import EXIT_INTERRUPTED

        raise typer.Exit(EXIT_INTERRUPTED)
