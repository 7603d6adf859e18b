"""Consumer SDK: read StreamVG events from Redis as typed `Event`s.

`Subscriber` reads `streamvg:{pipeline}:events` through a consumer group:

* `XREADGROUP` delivers each event to one consumer of the group; the event is acked
  (`XACK`) when the loop body that received it finishes (the next `next()`), or at once
  with `auto_ack=False` + `sub.ack(event)`. An exception in the loop body leaves the
  event pending, so it is delivered again.
* A consumer that dies holding unacked events loses them to the others: every
  `claim_interval_s` the subscriber runs `XAUTOCLAIM` for entries idle longer than
  `claim_idle_s` and processes them itself.
* Events are validated (`Event.from_json`); duplicate `event_id`s (a publisher's replay
  after an outage) are acked and skipped; entries that are not valid events are logged,
  counted in `invalid` and acked so they cannot block the group.
* If Redis restarts and the group vanishes (`NOGROUP`), it is created again at `0`, so
  events replayed into the new stream are not missed; lost connections are retried with
  backoff.

`Subscriber.live()` follows the pub/sub channel instead (no history, no acks) for dashboards.
A live message carries one published batch: its events as JSON lines, one event per line.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal

import redis
from pydantic import ValidationError

from streamvg.errors import PublishError
from streamvg.events import Event
from streamvg.redaction import mask_text, mask_url
from streamvg.sinks.redis import (
    _is_auth_error,
    connect_redis,
    live_channel,
    stream_key,
    translate_redis_error,
)

__all__ = ["Subscriber"]

log = logging.getLogger(__name__)


class Subscriber:
    """Iterate the events of a pipeline as a member of a Redis consumer group.

    Args:
        url: `redis://[user:password@]host:port/db` (or `rediss://`, `unix://`).
        pipeline: Pipeline name (stream `streamvg:{pipeline}:events`).
        group: Consumer group; each event goes to one consumer of the group.
        consumer: This consumer's name within the group (default `host-pid`).
        start: Where a new group starts: `"0"` (everything still in the stream) or
            `"$"` (only events published from now on).
        stream: Stream key instead of `streamvg:{pipeline}:events`.
        batch: Entries fetched per `XREADGROUP`.
        block_s: How long one read waits for new events.
        claim_idle_s: Pending entries idle this long are taken from their (dead) consumer;
            shorter recovers faster but may steal from a slow live consumer.
        claim_interval_s: How often to look for such entries (default `claim_idle_s / 2`).
        auto_ack: Ack each event when the loop body that got it finishes.
        timeout_s: Stop iterating after this many seconds without an event (None = never).
        count: Stop after this many events (None = never).
        dedupe_size: How many recent `event_id`s are remembered to drop duplicates.

    Raises:
        ConfigError: the URL is not a Redis URL.
        RedisAuthError: Redis refused the credentials.

    Example:
        with Subscriber("redis://localhost:6379/0", "lobby", "alerts", "worker-1") as sub:
            for event in sub:
                handle(event)   # acked when this body returns
    """

    def __init__(
        self,
        url: str,
        pipeline: str,
        group: str,
        consumer: str | None = None,
        *,
        start: Literal["0", "$"] = "$",
        stream: str | None = None,
        batch: int = 100,
        block_s: float = 1.0,
        claim_idle_s: float = 30.0,
        claim_interval_s: float | None = None,
        auto_ack: bool = True,
        timeout_s: float | None = None,
        count: int | None = None,
        dedupe_size: int = 100_000,
        socket_timeout_s: float | None = None,
    ) -> None:
        if start not in ("0", "$"):
            raise ValueError(f"start must be '0' (whole stream) or '$' (new events only), got {start!r}")
        self.url = mask_url(url)
        self._url = url
        self.pipeline = pipeline
        self.stream = stream or stream_key(pipeline)
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.start = start
        self.batch = int(batch)
        self.block_ms = max(1, int(block_s * 1000))
        self.claim_idle_ms = max(1, int(claim_idle_s * 1000))
        self.claim_interval_s = claim_idle_s / 2 if claim_interval_s is None else claim_interval_s
        self.auto_ack = auto_ack
        self.timeout_s = timeout_s
        self.count = count
        self.delivered = 0
        self.duplicates = 0
        self.invalid = 0
        self.claimed = 0
        self._dedupe_size = dedupe_size
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._queue: list[tuple[bytes, Event]] = []
        self._unacked: dict[str, bytes] = {}  # event_id -> entry id (delivered, not acked)
        self._last: tuple[bytes, Event] | None = None
        self._own_pending_done = False
        self._next_claim = 0.0
        self._last_event_at = time.monotonic()
        sock_timeout = socket_timeout_s if socket_timeout_s is not None else block_s + 5.0
        self._r = connect_redis(url, socket_timeout_s=sock_timeout)
        try:
            self._ensure_group(self.start)
        except redis.RedisError as exc:
            if _is_auth_error(exc):
                raise translate_redis_error(exc, url) from exc
            if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
                raise translate_redis_error(exc, url) from exc
            log.warning("Redis at %s is unreachable (%s); will retry", self.url, mask_text(str(exc)))
            self._group_ready = False
        else:
            self._group_ready = True

    # --- group management -------------------------------------------------------------

    def _ensure_group(self, start: str) -> None:
        try:
            self._r.xgroup_create(self.stream, self.group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- iteration ------------------------------------------------------------------

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._last is not None and self.auto_ack:
            self._ack_entry(self._last[0], self._last[1].event_id)
        self._last = None
        if self.count is not None and self.delivered >= self.count:
            raise StopIteration
        while True:
            while self._queue:
                entry_id, ev = self._queue.pop(0)
                if ev.event_id in self._seen:
                    self.duplicates += 1
                    self._ack_entry(entry_id, None)
                    continue
                self._unacked[ev.event_id] = entry_id
                self._last = (entry_id, ev)
                self.delivered += 1
                self._last_event_at = time.monotonic()
                return ev
            if self.timeout_s is not None and time.monotonic() - self._last_event_at > self.timeout_s:
                raise StopIteration
            self._fill()

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self._dedupe_size:
            self._seen.popitem(last=False)

    def _decode(self, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            if fields is None:  # deleted (trimmed) while pending
                self._ack_entry(entry_id, None)
                continue
            data = fields.get(b"data") if isinstance(fields, dict) else None
            try:
                if data is None:
                    raise ValueError("entry has no 'data' field")
                ev = Event.from_json(data)
            except (ValidationError, ValueError) as exc:
                self.invalid += 1
                log.warning(
                    "stream %s entry %s is not a valid streamvg event (%s); acked and skipped",
                    self.stream, entry_id.decode(), str(exc).splitlines()[0],
                )
                self._ack_entry(entry_id, None)
                continue
            self._queue.append((entry_id, ev))

    def _fill(self) -> None:
        """Fetch the next entries: own pending first, then reclaimed, then new."""
        wait = self.block_ms
        if self.timeout_s is not None:
            left = self.timeout_s - (time.monotonic() - self._last_event_at)
            wait = max(1, min(wait, int(left * 1000) + 1))
        try:
            if not self._group_ready:
                self._ensure_group("0")
                self._group_ready = True
            if not self._own_pending_done:
                # Entries this consumer name received before a restart and never acked.
                resp: Any = self._r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=self.batch)
                entries = resp[0][1] if resp else []
                if entries:
                    self._decode(entries)
                    if self._queue:
                        return
                else:
                    self._own_pending_done = True
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + self.claim_interval_s
                res: Any = self._r.xautoclaim(
                    self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=self.batch
                )
                claimed = res[1] if len(res) > 1 else []
                if claimed:
                    self.claimed += len(claimed)
                    log.info("reclaimed %d idle pending events of group %s", len(claimed), self.group)
                    self._decode(claimed)
                    if self._queue:
                        self._next_claim = now  # there may be more
                        return
            resp = self._r.xreadgroup(  # RESP2: [[stream, entries]]
                self.group, self.consumer, {self.stream: ">"}, count=self.batch, block=wait
            )
            if resp:
                self._decode(resp[0][1])
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                log.warning("group %s on %s vanished (Redis restarted?); recreating it at 0", self.group, self.stream)
                self._group_ready = False
                self._own_pending_done = False
                return
            if _is_auth_error(exc):
                raise translate_redis_error(exc, self._url) from exc
            raise translate_redis_error(exc, self._url) from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if _is_auth_error(exc):
                raise translate_redis_error(exc, self._url) from exc
            log.warning("Redis at %s: %s; retrying", self.url, mask_text(str(exc)) or type(exc).__name__)
            self._group_ready = False
            self._own_pending_done = False
            time.sleep(min(0.2, self.block_ms / 1000))

    # --- acks ------------------------------------------------------------------------

    def _ack_entry(self, entry_id: bytes, event_id: str | None) -> None:
        if event_id is not None:
            self._unacked.pop(event_id, None)
            self._remember(event_id)  # processed: later copies are duplicates
        try:
            self._r.xack(self.stream, self.group, entry_id)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Not acked: the entry stays pending and comes back; dedupe drops it then.
            log.warning("could not ack %s on %s: %s", entry_id.decode(), self.url, mask_text(str(exc)))

    def ack(self, event: Event) -> None:
        """Ack an event delivered by this subscriber (for `auto_ack=False`).

        Raises:
            PublishError: the event was not delivered by this subscriber, or is acked already.
        """
        entry_id = self._unacked.get(event.event_id)
        if entry_id is None:
            raise PublishError(
                f"event {event.event_id} was not delivered by this subscriber or is acked already"
            )
        if self._last is not None and self._last[1].event_id == event.event_id:
            self._last = None
        self._ack_entry(entry_id, event.event_id)

    # --- live ------------------------------------------------------------------------

    def live(self, *, timeout_s: float | None = None, count: int | None = None) -> Iterator[Event]:
        """Follow `streamvg:{pipeline}:live` (pub/sub): low latency, no history, no acks."""
        return live_events(self._url, self.pipeline, timeout_s=timeout_s, count=count)

    # --- lifecycle -------------------------------------------------------------------

    def close(self, *, ack_last: bool = False) -> None:
        """Close the connection; with `ack_last`, ack the last event handed out first."""
        if ack_last and self._last is not None and self.auto_ack:
            self._ack_entry(self._last[0], self._last[1].event_id)
        self._last = None
        self._r.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A loop left by `break` (no exception) finished its last body: ack it.
        self.close(ack_last=et is None)


def live_events(
    url: str, pipeline: str, *, timeout_s: float | None = None, count: int | None = None
) -> Iterator[Event]:
    """Events from the pub/sub channel of `pipeline`, validated; stops after `count`
    events or `timeout_s` seconds without one.

    Each message is one batch published by `RedisSink`: events as JSON lines, yielded in order.

    Raises:
        RedisAuthError: Redis refused the credentials.
    """
    r = connect_redis(url, socket_timeout_s=None)  # pub/sub waits in get_message
    ps = r.pubsub(ignore_subscribe_messages=True)
    try:
        try:
            ps.subscribe(live_channel(pipeline))
        except redis.RedisError as exc:
            raise translate_redis_error(exc, url) from exc
        n = 0
        last = time.monotonic()
        while count is None or n < count:
            wait = 1.0
            if timeout_s is not None:
                left = timeout_s - (time.monotonic() - last)
                if left <= 0:
                    return
                wait = min(wait, left)
            msg = ps.get_message(timeout=wait)
            if msg is None or msg.get("type") != "message":
                continue
            # One message per published batch: its events as JSON lines (one event = one line).
            for line in msg["data"].split(b"\n"):
                if count is not None and n >= count:
                    return
                try:
                    ev = Event.from_json(line)
                except ValidationError as exc:
                    log.warning("live message is not a valid streamvg event (%s); skipped", str(exc).splitlines()[0])
                    continue
                n += 1
                last = time.monotonic()
                yield ev
    finally:
        ps.close()
        r.close()
