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
* **Poison events do not block the group.** Each entry's delivery count comes from the
  group's pending list; an entry delivered `max_deliveries` times without an ack goes to
  the dead-letter stream `streamvg:{pipeline}:dead` (the event JSON, the last handler
  error, the group, the count) and is acked. A handler's error is recorded when it
  leaves a `with Subscriber(...)` block or is given to `sub.nack(event, error)`; the
  record lives in Redis, so a restarted consumer knows it. `streamvg tail --dead` shows them.
* If the group vanishes (`NOGROUP`: Redis restarted) or the stream key is deleted while a
  read waits (`UNBLOCKED`), the group is created again at `0`, so events written into
  the new stream are not missed; lost connections are retried with backoff.

`Subscriber.live()` follows the pub/sub channel instead (no history, no acks) for dashboards.
A live message carries one published batch: its events as JSON lines, one event per line.
"""

from __future__ import annotations

import json
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

__all__ = ["DeadLetter", "Subscriber", "dead_key", "dead_letters"]

_ERROR_TTL_S = 7 * 24 * 3600  # a handler's last error, kept for the dead letter


def dead_key(pipeline: str) -> str:
    """The dead-letter stream of `pipeline`: `streamvg:{pipeline}:dead`."""
    return f"streamvg:{pipeline}:dead"


def _errors_key(stream: str, group: str) -> str:
    return f"{stream}:errors:{group}"

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
        max_deliveries: Deliveries without an ack after which an entry goes to the
            dead-letter stream `streamvg:{pipeline}:dead` and is acked (None = retry
            forever). Lower gives up on poison sooner; higher rides out longer outages of
            whatever the handler depends on.
        dead_stream: Dead-letter stream instead of `streamvg:{pipeline}:dead`.

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
        max_deliveries: int | None = 5,
        dead_stream: str | None = None,
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
        self.dead = 0
        if max_deliveries is not None and max_deliveries < 1:
            raise ValueError(f"max_deliveries must be at least 1 (or None), got {max_deliveries}")
        self.max_deliveries = max_deliveries
        self.dead_stream = dead_stream or dead_key(pipeline)
        self._errors = _errors_key(self.stream, group)
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

    def _delivery_counts(self, entries: list[Any]) -> dict[bytes, int]:
        """Times each (re-delivered) entry was delivered, from the group's pending list."""
        ids = [e[0] for e in entries]
        if not ids or self.max_deliveries is None:
            return {}
        rows: Any = self._r.xpending_range(self.stream, self.group, min=ids[0], max=ids[-1], count=len(ids) + 1000)
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}

    def _bury(self, entry_id: bytes, fields: Any, deliveries: int) -> None:
        """Move an entry delivered too often to the dead-letter stream, then ack it."""
        data = fields.get(b"data") if isinstance(fields, dict) else None
        err: Any = self._r.hget(self._errors, entry_id)
        error = err.decode(errors="replace") if isinstance(err, bytes) else (
            f"delivered {deliveries} times without an ack (no handler error recorded)")
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, {
            "data": data or b"", "error": error, "stream": self.stream, "group": self.group,
            "consumer": self.consumer, "entry_id": entry_id, "deliveries": deliveries,
        })
        pipe.xack(self.stream, self.group, entry_id)
        pipe.hdel(self._errors, entry_id)
        pipe.execute()
        self.dead += 1
        log.warning("stream %s entry %s was delivered %d times without an ack; moved to %s (%s)",
                    self.stream, entry_id.decode(), deliveries, self.dead_stream, error[:200])

    def _decode(self, entries: list[Any], *, redelivered: bool = False) -> None:
        counts = self._delivery_counts(entries) if redelivered else {}
        for entry_id, fields in entries:
            if fields is None:  # deleted (trimmed) while pending
                self._ack_entry(entry_id, None)
                continue
            n = counts.get(entry_id, 1)
            if self.max_deliveries is not None and n > self.max_deliveries:
                self._bury(entry_id, fields, n - 1)
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
                # One at a time: each read of an entry counts as a delivery, so fetching a
                # batch would count deliveries against entries behind a poison one that the
                # handler never saw, and send those to the dead letters too.
                resp: Any = self._r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=1)
                entries = resp[0][1] if resp else []
                if entries:
                    self._decode(entries, redelivered=True)
                    if self._queue:
                        return
                else:
                    self._own_pending_done = True
            now = time.monotonic()
            if now >= self._next_claim:
                self._next_claim = now + self.claim_interval_s
                res: Any = self._r.xautoclaim(
                    self.stream, self.group, self.consumer, self.claim_idle_ms, "0-0", count=1
                )  # one at a time, as above
                claimed = res[1] if len(res) > 1 else []
                if claimed:
                    self.claimed += len(claimed)
                    log.info("reclaimed %d idle pending events of group %s", len(claimed), self.group)
                    self._decode(claimed, redelivered=True)
                    if self._queue:
                        self._next_claim = now  # there may be more
                        return
            resp = self._r.xreadgroup(  # RESP2: [[stream, entries]]
                self.group, self.consumer, {self.stream: ">"}, count=self.batch, block=wait
            )
            if resp:
                self._decode(resp[0][1])
        except redis.ResponseError as exc:
            if str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                # The group or the whole stream key went (Redis restarted, the key was
                # deleted, even during a blocking read): start over on the new stream.
                log.warning("group %s on %s vanished (%s); recreating it at 0",
                            self.group, self.stream, str(exc).split(" ")[0])
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

    def nack(self, event: Event, error: BaseException | str) -> None:
        """Record that handling `event` failed; it stays pending and comes back (to this
        consumer at once, or to another), until `max_deliveries` sends it to the dead
        letters with this error text."""
        entry_id = self._unacked.pop(event.event_id, None)
        if entry_id is None:
            raise PublishError(f"event {event.event_id} was not delivered by this subscriber or is acked already")
        if self._last is not None and self._last[1].event_id == event.event_id:
            self._last = None
        self._record_error(entry_id, error)
        self._own_pending_done = False  # read own pending again: it comes back next

    def _record_error(self, entry_id: bytes, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        text = mask_text(text)[:2000]
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.hset(self._errors, entry_id, text)
            pipe.expire(self._errors, _ERROR_TTL_S)
            pipe.execute()
        except redis.RedisError as exc:  # the event still comes back; only the text is lost
            log.warning("could not record the handler error of %s: %s", entry_id.decode(), mask_text(str(exc)))

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
        # A loop left by `break` (no exception) finished its last body: ack it. A loop left
        # by an exception failed on it: record why, for the dead letter if it keeps failing.
        if ev is not None and self._last is not None and not isinstance(ev, (KeyboardInterrupt, GeneratorExit)):
            self._record_error(self._last[0], ev)
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


class DeadLetter:
    """One entry of a dead-letter stream: the event (None if it was not valid), the
    handler's last error, where it came from and how often it was delivered."""

    def __init__(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        self.entry_id = entry_id
        self.data = fields.get(b"data", b"")
        self.error = fields.get(b"error", b"").decode(errors="replace")
        self.group = fields.get(b"group", b"").decode(errors="replace")
        self.consumer = fields.get(b"consumer", b"").decode(errors="replace")
        self.source_entry = fields.get(b"entry_id", b"").decode(errors="replace")
        self.deliveries = int(fields.get(b"deliveries", b"0") or 0)
        try:
            self.event: Event | None = Event.from_json(self.data)
        except (ValidationError, ValueError):
            self.event = None

    def to_json(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_id, "error": self.error, "group": self.group, "consumer": self.consumer,
            "source_entry": self.source_entry, "deliveries": self.deliveries,
            "event": json.loads(self.data) if self.event is not None else self.data.decode(errors="replace"),
        }


def dead_letters(
    url: str, pipeline: str, *, follow: bool = False, timeout_s: float | None = None, count: int | None = None,
) -> Iterator[DeadLetter]:
    """The dead letters of `pipeline`, oldest first; with `follow`, wait for new ones
    (until `timeout_s` without one)."""
    r = connect_redis(url, socket_timeout_s=None)
    key = dead_key(pipeline)
    last = "0-0"
    n = 0
    quiet_since = time.monotonic()
    try:
        while count is None or n < count:
            block = None
            if follow:
                block = 1000 if timeout_s is None else max(1, int(min(1.0, timeout_s) * 1000))
            try:
                resp: Any = r.xread({key: last}, count=100, block=block)
            except redis.RedisError as exc:
                raise translate_redis_error(exc, url) from exc
            entries = resp[0][1] if resp else []
            for entry_id, fields in entries:
                last = entry_id.decode()
                n += 1
                quiet_since = time.monotonic()
                yield DeadLetter(last, fields)
                if count is not None and n >= count:
                    return
            quiet = timeout_s is not None and time.monotonic() - quiet_since >= timeout_s
            if not entries and (not follow or quiet):
                return
    finally:
        r.close()
