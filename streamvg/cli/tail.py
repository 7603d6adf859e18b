"""`streamvg tail` (follow published events) and `streamvg schema` (the event JSON Schema)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

import typer

from streamvg.events import Event, event_json_schema

if TYPE_CHECKING:
    from streamvg.consumer import DeadLetter

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def format_event(ev: Event) -> str:
    """One line for people: time, camera, kind, query, track, boxes."""
    ts = ev.wall_time if ev.wall_time is not None else ev.processed_time
    clock = datetime.fromtimestamp(ts, tz=timezone.utc).astimezone().strftime("%H:%M:%S.%f")[:-3]
    media = f"t={ev.t:8.3f}s" if ev.t is not None else "t=       -"
    if ev.kind == "source_status":
        return f"{clock} {media} {ev.camera:<12} {ev.kind:<13} {ev.state}{': ' + ev.detail if ev.detail else ''}"
    track = f"#{ev.track_id}" if ev.track_id is not None else ""
    boxes = " ".join(
        "[" + ",".join(f"{v:.0f}" for v in b["xyxy"]) + f" {b['score']:.2f}]" for b in ev.boxes[:4]
    )
    if len(ev.boxes) > 4:
        boxes += f" +{len(ev.boxes) - 4} more"
    if not ev.boxes:
        boxes = "(no boxes)"
    extra = f" ({ev.detail})" if ev.detail else ""
    return f"{clock} {media} {ev.camera:<12} {ev.kind:<13} {ev.query_id}: {ev.query!r} {track} {boxes}{extra}".rstrip()


def tail(
    pipeline: Annotated[str, typer.Option("--pipeline", "-p", help="Pipeline name (stream streamvg:{pipeline}:events).")] = "default",
    group: Annotated[
        str | None,
        typer.Option("--group", "-g", help="Read as this consumer group (acked, shared work); default: follow the live channel."),
    ] = None,
    consumer: Annotated[str | None, typer.Option("--consumer", help="Consumer name within --group (default host-pid).")] = None,
    url: Annotated[
        str | None,
        typer.Option("--url", help="Redis URL; default $STREAMVG_REDIS_URL, $STREAMVG_SINKS__REDIS__URL or redis://127.0.0.1:6379/0.", show_default=False),
    ] = None,
    from_start: Annotated[bool, typer.Option("--from-start", help="Read the stream from its beginning (what was already published), then follow it; with --group, a new group starts there. Add --timeout S to stop once nothing new comes.")] = False,
    count: Annotated[int | None, typer.Option("--count", "-n", min=1, help="Stop after N events.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0, help="Stop after this many seconds without an event.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print each event as raw JSON (one line).")] = False,
    dead: Annotated[
        bool,
        typer.Option("--dead", help="Show the dead letters (streamvg:{pipeline}:dead): events a consumer group "
                     "gave up on, with the handler's error; oldest first, then waits for new ones until --timeout."),
    ] = False,
) -> None:
    """Follow a pipeline's events, one line each (time, camera, query, track, boxes), or raw JSON.

    Without --group it follows the live pub/sub channel (what is published from now on);
    with --group it reads the stream through a consumer group, acking what it printed.
    """
    from streamvg.consumer import Subscriber, live_events

    redis_url = url or os.environ.get("STREAMVG_REDIS_URL") or os.environ.get("STREAMVG_SINKS__REDIS__URL") or DEFAULT_URL
    if dead:
        _tail_dead(redis_url, pipeline, timeout=timeout, count=count, json_out=json_out)
        return
    if group is None and from_start:
        events = stream_events(redis_url, pipeline, timeout_s=timeout, count=count)
        sub = None
    elif group is None:
        events = live_events(redis_url, pipeline, timeout_s=timeout, count=count)
        sub = None
    else:
        sub = Subscriber(
            redis_url, pipeline, group, consumer, start="0" if from_start else "$",
            timeout_s=timeout, count=count,
        )
        events = iter(sub)
    try:
        for ev in events:
            typer.echo(ev.to_json().decode() if json_out else format_event(ev))
    finally:
        if sub is not None:
            sub.close(ack_last=True)


def stream_events(
    url: str, pipeline: str, *, timeout_s: float | None = None, count: int | None = None, start: str = "0-0"
) -> Iterator[Event]:
    """Events of `pipeline`'s stream from `start` (its beginning), without a consumer group
    (nothing is acked or kept in Redis); follows new entries until `count` events or
    `timeout_s` seconds without one."""
    import redis

    from streamvg.sinks.redis import connect_redis, stream_key, translate_redis_error

    r = connect_redis(url, socket_timeout_s=None)
    key = stream_key(pipeline)
    last_id, n, last = start, 0, time.monotonic()
    try:
        while count is None or n < count:
            block_ms = 1000
            if timeout_s is not None:
                left = timeout_s - (time.monotonic() - last)
                if left <= 0:
                    return
                block_ms = max(1, min(block_ms, int(left * 1000)))
            try:
                reply: Any = r.xread({key: last_id}, count=500, block=block_ms)
            except redis.RedisError as exc:
                raise translate_redis_error(exc, url) from exc
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    data = fields.get(b"data")
                    if data is None:
                        continue
                    try:
                        ev = Event.from_json(data)
                    except ValueError:
                        continue  # not a streamvg event (a foreign writer); the live path logs these
                    n += 1
                    last = time.monotonic()
                    yield ev
                    if count is not None and n >= count:
                        return
    finally:
        r.close()
def format_dead_letter(d: DeadLetter) -> str:
    """One line for people: when, group, deliveries, the error, then the event's own line."""
    ms = int(d.entry_id.split("-")[0])
    clock = datetime.fromtimestamp(ms / 1000, tz=timezone.utc).astimezone().strftime("%H:%M:%S.%f")[:-3]
    what = format_event(d.event) if d.event is not None else f"(not a valid event: {d.data[:80]!r})"
    return f"{clock} dead in group {d.group} after {d.deliveries} deliveries: {d.error} | {what}"


def _tail_dead(url: str, pipeline: str, *, timeout: float | None, count: int | None, json_out: bool) -> None:
    from streamvg.consumer import dead_letters

    for d in dead_letters(url, pipeline, follow=True, timeout_s=timeout, count=count):
        typer.echo(json.dumps(d.to_json()) if json_out else format_dead_letter(d))


def schema(
    indent: Annotated[int, typer.Option("--indent", help="JSON indentation.")] = 2,
) -> None:
    """Print the JSON Schema of StreamVG events (streamvg.event/v1)."""
    typer.echo(json.dumps(event_json_schema(), indent=indent or None))


def register(app: typer.Typer) -> None:
    app.command("tail")(tail)
    app.command("schema")(schema)
