"""Where events go: `RedisSink` (Redis Streams + pub/sub, spooled through outages) and
`JsonlSink` (a file; the embedded default when no Redis URL is configured).

Every sink has the same protocol: `publish(event)`, `flush()`, `close()`, a context manager,
and `stats` counters for metrics.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, runtime_checkable

from streamvg.config import SinksConfig
from streamvg.events import Event
from streamvg.sinks.jsonl import JsonlSink
from streamvg.sinks.redis import RedisSink, SinkStats, live_channel, stream_key
from streamvg.sinks.spool import Spool

__all__ = [
    "FanoutSink",
    "JsonlSink",
    "RedisSink",
    "Sink",
    "SinkStats",
    "Spool",
    "create_sink",
    "live_channel",
    "stream_key",
]


@runtime_checkable
class Sink(Protocol):
    """What the pipeline publishes to."""

    def publish(self, event: Event) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Sink: ...

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class FanoutSink:
    """Publish every event to several sinks (e.g. Redis and a JSONL archive)."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def publish(self, event: Event) -> None:
        for s in self.sinks:
            s.publish(event)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()

    def close(self) -> None:
        for s in self.sinks:
            s.close()

    def __enter__(self) -> FanoutSink:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def create_sink(config: SinksConfig, pipeline: str) -> Sink:
    """The sink(s) a pipeline file asks for; JSONL (`streamvg-events.jsonl`) when none is given."""
    sinks: list[Sink] = []
    if config.redis is not None:
        r = config.redis
        sinks.append(
            RedisSink(
                r.url, pipeline, maxlen=r.maxlen, spool_dir=r.spool_dir,
                spool_max_bytes=r.spool_max_bytes, stream=r.stream,
            )
        )
    if config.mqtt is not None:
        from streamvg.sinks.mqtt import MqttSink  # paho-mqtt is an optional extra

        m = config.mqtt
        sinks.append(MqttSink(m.url, pipeline, topic=m.topic, qos=m.qos, retain=m.retain, client_id=m.client_id,
                              spool_dir=m.spool_dir, spool_max_bytes=m.spool_max_bytes))
    if config.jsonl is not None or not sinks:
        path = config.jsonl.path if config.jsonl is not None else "streamvg-events.jsonl"
        sinks.append(JsonlSink(path, fsync=config.jsonl.fsync if config.jsonl is not None else False))
    return sinks[0] if len(sinks) == 1 else FanoutSink(sinks)
