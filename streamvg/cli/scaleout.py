"""`streamvg monitor --role ingest|ground`: the scale-out roles (see `streamvg.scaleout`)."""

from __future__ import annotations

import json
import signal
import threading
import time

import typer

from streamvg.config import PipelineConfig
from streamvg.errors import ConfigError
from streamvg.pipeline import Pipeline


def run_role(cfg: PipelineConfig, role: str, *, metrics_port: int | None, duration_s: float | None, json_out: bool) -> None:
    """Run one scale-out role until the sources end (ingest of files), SIGINT/SIGTERM, or
    `duration_s`."""
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
            publisher = WindowPublisher(cfg.sinks.redis.url, cfg.name)
            pipe = Pipeline(cfg, sinks=[], window_sink=publisher.put, metrics_port=metrics_port, control=False)
            pipe.start()
            while not stop.is_set() and not pipe.wait(0.2):
                pass
            pipe.stop()
            publisher.close()
            summary = {"role": "ingest", "windows_published": publisher.published, "windows_dropped": publisher.dropped,
                       "cameras": {n: c.state for n, c in pipe.cameras.items()}}
        else:
            worker = GroundWorker(cfg, metrics_port=metrics_port)
            try:
                worker.run(stop)
            finally:
                worker.close()
            summary = {"role": "ground", "worker": worker.worker_id, "windows_grounded": worker.windows_grounded,
                       "windows_failed": worker.failures.total}
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
