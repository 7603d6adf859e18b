"""Prometheus metrics of a running pipeline."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = ["PipelineMetrics"]


def _sum_sink_stat(sinks: Sequence[Any], name: str) -> float:
    return float(sum(getattr(getattr(s, "stats", None), name, 0) for s in sinks))


def _sum_sink_reason(sinks: Sequence[Any], reason: str) -> float:
    return float(sum((getattr(getattr(s, "stats", None), "dropped_by_reason", None) or {}).get(reason, 0)
                     for s in sinks))


class PipelineMetrics:
    """Prometheus metrics, in a registry of this pipeline's own, served on `address:port`
    (`metrics.address`: 127.0.0.1 keeps them on this host, 0.0.0.0 opens every interface)."""

    def __init__(self, port: int, *, address: str = "127.0.0.1") -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        self.registry = CollectorRegistry()
        self.frames_in = Counter("streamvg_frames_in", "Frames sampled", ["camera"], registry=self.registry)
        self.windows_dropped = Counter("streamvg_windows_dropped", "Stale windows dropped (freshest policy)", ["camera"], registry=self.registry)
        self.windows_grounded = Counter("streamvg_windows_grounded", "Windows grounded", ["camera"], registry=self.registry)
        self.windows_failed = Counter(
            "streamvg_windows_failed", "Windows skipped because grounding raised", ["camera"], registry=self.registry
        )
        self.engine_latency = Histogram("streamvg_engine_latency_seconds", "Engine batch latency", registry=self.registry)
        self.events = Counter("streamvg_events_published", "Events published", ["kind"], registry=self.registry)
        self.camera_up = Gauge("streamvg_camera_up", "1 when the camera is streaming", ["camera"], registry=self.registry)
        self._server: Any = start_http_server(port, addr=address, registry=self.registry)

    def watch_sinks(self, sinks: Sequence[Any]) -> None:
        """Export the sinks' delivery counters (published, spooled, replayed, dropped)."""
        from prometheus_client import Gauge

        for field_name in ("published", "spooled", "replayed", "dropped"):
            gauge = Gauge(f"streamvg_sink_events_{field_name}", f"Events {field_name} by the sinks", registry=self.registry)
            gauge.set_function(functools.partial(_sum_sink_stat, sinks, field_name))
        from streamvg.sinks.spool import DROP_REASONS

        by_reason = Gauge("streamvg_sink_events_dropped_by_reason", "Events lost by the sinks, by reason",
                          ["reason"], registry=self.registry)
        for reason in DROP_REASONS:
            by_reason.labels(reason).set_function(functools.partial(_sum_sink_reason, sinks, reason))

    def close(self) -> None:
        server = self._server[0] if isinstance(self._server, tuple) else self._server
        if server is not None and hasattr(server, "shutdown"):
            server.shutdown()
