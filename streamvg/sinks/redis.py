"""`RedisSink`: events to a Redis Stream (+ pub/sub), with an on-disk spool for outages.

Delivery contract (at-least-once, in order):

* Each event is `XADD streamvg:{pipeline}:events MAXLEN ~ N * data <json>`. Events are
  batched: a batch goes out in one round trip when it reaches `batch_size` or is
  `flush_interval_s` old. For dashboards each batch is also published once on
  `streamvg:{pipeline}:live`: one message holding the batch's events as JSON lines
  (`<json>\\n<json>…`; compact JSON never contains a raw newline), which
  `streamvg.consumer.live_events` splits. One PUBLISH per batch instead of per event
  halves the commands Redis runs per event.
* If Redis is unreachable or answers with an error, the batch and every later event go to
  the spool (`streamvg.sinks.spool.Spool`) instead; a background thread retries Redis with
  capped exponential backoff and, once it answers, replays the spool **in order** before
  any newer event. Events spooled by an earlier run are replayed when the sink starts.
* Replies are read one batch late (just before the next batch is sent, or by `flush`,
  `close` and the interval flush), so Redis executes a batch while the caller builds the
  next. A batch counts as published once Redis confirmed it; when anything fails, every
  unconfirmed batch is spooled, oldest first, before newer events.
* A batch that failed half-way is spooled whole, so Redis may see some events twice;
  every event has a deterministic `event_id` and `streamvg.consumer.Subscriber` drops
  duplicates. Nothing is dropped while the spool has room and its disk takes writes;
  overflow drops the oldest events (`stats.dropped_by_reason["full"]`), a full or
  unwritable disk the new ones (`"disk"`), each logged once per episode with the count.
  "Unreachable" and "refuses writes" (out of memory, read-only) are told apart in the log.
* `publish()` never waits on a dead Redis for more than one socket timeout: once Redis is
  down, publishing writes to the local spool only and the network is left to the
  background thread.

Commands are packed into RESP by hand (one buffer per batch) because redis-py's generic
pipeline costs more per command than building, validating and serialising the event.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamvg.errors import ConfigError, PublishError, RedisAuthError
from streamvg.events import Event
from streamvg.redaction import mask_text, mask_url, remember_url_secret
from streamvg.sinks.spool import Spool

__all__ = ["RedisSink", "SinkStats", "connect_redis", "live_channel", "stream_key", "translate_redis_error"]

log = logging.getLogger(__name__)

try:  # redis-py's hiredis parser; its reader is used directly by `_read_replies`
    from redis._parsers.hiredis import _HiredisParser
except ImportError:  # pragma: no cover - other redis-py layouts: read_response per reply
    _HiredisParser = None  # type: ignore[assignment,misc]
try:  # what its reader returns for "need more bytes" (redis-py >= 5.1; older ones use False)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _HIREDIS_NOT_ENOUGH_DATA
except ImportError:  # pragma: no cover
    _HIREDIS_NOT_ENOUGH_DATA = False


def stream_key(pipeline: str) -> str:
    """The stream events go to: `streamvg:{pipeline}:events`."""
    return f"streamvg:{pipeline}:events"


def live_channel(pipeline: str) -> str:
    """The pub/sub channel for dashboards: `streamvg:{pipeline}:live`."""
    return f"streamvg:{pipeline}:live"


@dataclass
class SinkStats:
    """Counters for metrics (monotonic over the sink's life).

    Attributes:
        published: Events Redis accepted (replayed ones included).
        spooled: Events written to the on-disk spool because Redis was unreachable.
        replayed: Spooled events later delivered to Redis.
        dropped: Events lost, all reasons together (`dropped_by_reason`).
        dropped_by_reason: `full` (spool cap, oldest first), `disk` (the spool or file
            could not be written: full disk, unwritable folder), `corrupt` (damaged spool
            records found on reading), `unreadable` (a spool segment that cannot be read).
        errors: Failed attempts to talk to Redis (or to write the file).
    """

    published: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: int = 0
    errors: int = 0
    dropped_by_reason: dict[str, int] = field(default_factory=dict)


def _check_url(url: str) -> None:
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"Redis URL {mask_url(url)!r} is not a redis://, rediss:// or unix:// URL; "
            "write it like redis://[user:password@]host:6379/0",
            field="sinks.redis.url",
        )


def connect_redis(
    url: str, *, socket_timeout_s: float | None = 2.0, connect_timeout_s: float = 1.0, **kwargs: Any
) -> redis.Redis:
    """A redis-py client for `url` (redis://, rediss:// (TLS), unix://; user/password from
    the URL) with bounded timeouts and no hidden retries (callers decide how to retry).

    Raises:
        ConfigError: the URL is not a Redis URL.
    """
    _check_url(url)
    remember_url_secret(url)
    try:
        return redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            **kwargs,
        )
    except ValueError as exc:
        raise ConfigError(
            f"Redis URL {mask_url(url)!r} is invalid ({mask_text(str(exc))}); "
            "write it like redis://[user:password@]host:6379/0",
            field="sinks.redis.url",
        ) from exc


def _is_auth_error(exc: BaseException) -> bool:
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)):
        return True
    msg = str(exc)
    return isinstance(exc, redis.ResponseError) and msg.startswith(("NOAUTH", "WRONGPASS", "NOPERM"))


def translate_redis_error(exc: BaseException, url: str) -> PublishError:
    """One sentence for a redis-py error (password masked): `RedisAuthError` for refused
    credentials, `PublishError` otherwise."""
    where = mask_url(url)
    if _is_auth_error(exc):
        return RedisAuthError(
            f"Redis at {where} refused the credentials in the URL ({mask_text(str(exc))}); "
            "check the user name and password (redis://user:password@host:port/db)"
        )
    return PublishError(f"Redis at {where} failed: {mask_text(str(exc)) or type(exc).__name__}")


def _why_down(where: str, exc: BaseException) -> str:
    """Why Redis cannot take events, in words: unreachable, or up but refusing writes."""
    msg = mask_text(str(exc)) or type(exc).__name__
    oom = getattr(redis.exceptions, "OutOfMemoryError", ())
    if isinstance(exc, redis.ResponseError) or (isinstance(exc, redis.RedisError) and msg.startswith(("OOM", "READONLY", "MISCONF"))):
        if (oom and isinstance(exc, oom)) or msg.startswith("OOM") or "maxmemory" in msg:
            return f"Redis at {where} is out of memory and refuses writes ({msg}); raise its maxmemory or lower maxlen"
        return f"Redis at {where} answers but refuses the events ({msg})"
    return f"Redis at {where} is unreachable ({msg})"


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(b), b)


def _read_replies(conn: Any, n: int) -> None:
    """Read `n` pipelined replies from `conn`; raise the first error reply (after reading
    all of them) or any connection error.

    With redis-py's hiredis parser the replies are taken straight from its `hiredis.Reader`
    (one C call each, refilled from the socket by the parser's own `read_from_socket`, so
    timeouts and closed sockets surface as redis-py errors): `Connection.read_response`
    costs about a microsecond of Python per reply, which for XADD + PUBLISH is a sixth of a
    publish. Other parsers fall back to `read_response`.
    """
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if reader is None or _HiredisParser is None or not isinstance(parser, _HiredisParser):
        read = conn.read_response
        for _ in range(n):
            read()
        return
    gets = reader.gets
    fill = parser.read_from_socket
    first_error: BaseException | None = None
    while n:
        reply = gets()
        # XADD/PUBLISH never reply a boolean, so False can only be an older reader's "need more".
        if reply is _HIREDIS_NOT_ENOUGH_DATA or reply is False:
            fill()
            continue
        n -= 1
        if isinstance(reply, BaseException) and first_error is None:
            first_error = reply
    if first_error is not None:
        raise first_error


class RedisSink:
    """Publish events to Redis Streams + pub/sub, spooling to disk while Redis is away.

    Args:
        url: `redis://[user:password@]host:port/db`, `rediss://` for TLS, or
            `unix:///path.sock`. The password is never logged.
        pipeline: Pipeline name; keys are `streamvg:{pipeline}:events` / `:live`.
        maxlen: Approximate stream length cap (`XADD MAXLEN ~`); older entries are trimmed
            by Redis. Larger keeps more history for late consumers, at the cost of memory.
        spool_dir: Folder for the outage spool; the spool itself is `{spool_dir}/{pipeline}`.
        spool_max_bytes: Spool size cap; beyond it the oldest events are dropped (counted).
        stream: Stream key to use instead of `streamvg:{pipeline}:events`.
        live: Also `PUBLISH` each batch on `streamvg:{pipeline}:live` (one message per
            batch, one event JSON per line).
        batch_size: Events sent per round trip; larger is faster, smaller is lower latency.
        flush_interval_s: Longest time an event waits in the batch before it is sent.
        socket_timeout_s: Longest a Redis read/write may block (bounds a `publish` stall).
        connect_timeout_s: Longest a connection attempt may take.
        retry_max_s: Cap of the exponential backoff between reconnect attempts.
        check: Ping Redis at construction, raising `RedisAuthError` at once for refused
            credentials (an unreachable server only starts the spool).

    Raises:
        ConfigError: the URL is not a Redis URL.
        RedisAuthError: Redis refused the credentials (with `check=True`).
        PublishError: the spool folder cannot be used.

    Example:
        with RedisSink("redis://localhost:6379/0", "lobby", spool_dir="/var/spool/streamvg") as sink:
            sink.publish(event)
    """

    def __init__(
        self,
        url: str,
        pipeline: str,
        *,
        maxlen: int = 100_000,
        spool_dir: str | Path = ".streamvg-spool",
        spool_max_bytes: int = 256 * 1024 * 1024,
        stream: str | None = None,
        live: bool = True,
        batch_size: int = 256,
        flush_interval_s: float = 0.05,
        socket_timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        retry_max_s: float = 5.0,
        check: bool = True,
    ) -> None:
        if maxlen < 1:
            raise ConfigError(f"maxlen must be at least 1, got {maxlen}", field="sinks.redis.maxlen")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.url = mask_url(url)
        self.pipeline = pipeline
        self.stream = stream or stream_key(pipeline)
        self.channel = live_channel(pipeline)
        self.maxlen = int(maxlen)
        self.live = live
        self.batch_size = int(batch_size)
        self.flush_interval_s = float(flush_interval_s)
        self.retry_min_s = min(0.05, retry_max_s)
        self.retry_max_s = float(retry_max_s)
        self._stats = SinkStats()
        self._url = url
        self._client = connect_redis(url, socket_timeout_s=socket_timeout_s, connect_timeout_s=connect_timeout_s)
        self._conn: Any = None

        key = self.stream.encode()
        self._xadd = (
            b"*8\r\n$4\r\nXADD\r\n" + _bulk(key) + b"$6\r\nMAXLEN\r\n$1\r\n~\r\n"
            + _bulk(str(self.maxlen).encode()) + b"$1\r\n*\r\n$4\r\ndata\r\n$"
        )
        self._publish = b"*3\r\n$7\r\nPUBLISH\r\n" + _bulk(self.channel.encode())

        self._lock = threading.RLock()  # buffer, state, spool appends, the connection while up
        self._io_lock = threading.Lock()  # the connection
        self._wake = threading.Condition(self._lock)
        self._buf: list[bytes] = []
        self._buf_since = 0.0
        self._inflight: list[bytes] = []  # sent, replies not read yet (see _flush_locked)
        self._inflight_replies = 0
        self._closed = False
        self._retry_at = 0.0
        self._backoff = self.retry_min_s
        self._down_logged = False
        self._answered = False  # Redis answered since it went down
        self._episode_replayed = 0

        self.spool = Spool(Path(spool_dir) / pipeline, max_bytes=spool_max_bytes)
        # Events left by an earlier run are replayed before anything new.
        self._up = len(self.spool) == 0
        if check:
            try:
                self._connection().send_command("PING")
                self._connection().read_response()
            except Exception as exc:
                self._drop_connection()
                if _is_auth_error(exc):
                    self.spool.close()
                    raise translate_redis_error(exc, url) from exc
                if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
                    self.spool.close()
                    raise translate_redis_error(exc, url) from exc
                with self._lock:
                    self._mark_down(exc)
        self._thread = threading.Thread(target=self._run, name=f"streamvg-redis-sink-{pipeline}", daemon=True)
        self._thread.start()

    # --- public API ------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Queue one event; sends the batch when it is full. Thread-safe.

        Raises:
            PublishError: the sink is closed.
        """
        data = event.to_json()
        with self._lock:
            if self._closed:
                raise PublishError(f"RedisSink for {self.url} is closed; create a new sink to publish")
            if not self._up:
                self._spool([data])
                return
            if not self._buf:
                self._buf_since = time.monotonic()
            self._buf.append(data)
            if len(self._buf) >= self.batch_size:
                self._flush_locked()

    def flush(self) -> None:
        """Send what is batched now and wait for Redis to confirm it; if Redis is away,
        make sure it is on disk (fsync)."""
        with self._lock:
            if self._up:
                self._flush_locked(wait=True)
            self.spool.sync()

    def close(self, drain_timeout_s: float = 5.0) -> None:
        """Flush, stop the background thread, and close the spool.

        If events are spooled and Redis answers, replay them for up to `drain_timeout_s`;
        whatever is left stays in the spool for the next run.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)
        with self._lock:
            if self._up:
                self._flush_locked(wait=True)
        deadline = time.monotonic() + drain_timeout_s
        while len(self.spool) and time.monotonic() < deadline:
            if not self._replay_once():
                break
        with self._lock:
            left = len(self.spool)
            self.spool.close()
            self._drop_connection()
            self._client.close()
        if left:
            log.warning("RedisSink %s: %d events stay in spool %s for the next run", self.url, left, self.spool.directory)

    @property
    def stats(self) -> SinkStats:
        """The sink's counters (published, spooled, replayed, dropped by reason, errors)."""
        self._stats.dropped_by_reason = {k: v for k, v in self.spool.dropped_by_reason.items() if v}
        self._stats.dropped = self.spool.dropped
        return self._stats

    @property
    def pending(self) -> int:
        """Events not yet delivered to Redis (batched in memory + spooled)."""
        with self._lock:
            return len(self._buf) + len(self._inflight) + len(self.spool)

    @property
    def connected(self) -> bool:
        """Whether the sink is currently publishing straight to Redis (not spooling)."""
        return self._up

    def __enter__(self) -> RedisSink:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisSink(url={self.url!r}, stream={self.stream!r}, up={self._up})"

    # --- internals -------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # a dead socket; nothing to do
                conn.disconnect()

    def _pack(self, payloads: list[bytes]) -> tuple[bytes, int]:
        """One batch as a RESP buffer (XADD per event, one PUBLISH) and its reply count."""
        xadd = self._xadd  # ends with the "$" of the data argument's length
        parts = [b"%b%d\r\n%b\r\n" % (xadd, len(p), p) for p in payloads]
        replies = len(payloads)
        if self.live:  # one PUBLISH per batch: the events as JSON lines (JSON has no raw newline)
            msg = b"\n".join(payloads)
            parts.append(b"%b$%d\r\n%b\r\n" % (self._publish, len(msg), msg))
            replies += 1
        return b"".join(parts), replies

    def _send(self, payloads: list[bytes]) -> None:
        """Send one batch in one round trip and read its replies; raises on any failure
        (connection dropped). Used for spool replay, which commits only what Redis confirmed."""
        data, replies = self._pack(payloads)
        with self._io_lock:
            try:
                conn = self._connection()
                conn.send_packed_command([data], check_health=False)
                _read_replies(conn, replies)
            except BaseException:
                self._drop_connection()
                raise

    def _flush_locked(self, wait: bool = False) -> None:
        """Send the in-memory batch (lock held, state up); on failure spool it and go down.

        Replies are read one batch late: the previous batch's replies are read just before
        this batch is sent, so Redis executes a batch while the caller builds the next one
        instead of the caller idling on the round trip. `wait=True` (flush, close, the
        interval flush) also reads this batch's replies. A batch counts as published once
        its replies are read; on any failure the unconfirmed batches are spooled, oldest
        first, before anything newer (at-least-once, in order, as before).
        """
        batch, self._buf = self._buf, []
        if not batch and not self._inflight:
            return
        try:
            with self._io_lock:
                try:
                    conn = self._connection()
                    if self._inflight:
                        _read_replies(conn, self._inflight_replies)
                        self._stats.published += len(self._inflight)
                        self._inflight = []
                    if batch:
                        data, replies = self._pack(batch)
                        conn.send_packed_command([data], check_health=False)
                        self._inflight, self._inflight_replies, batch = batch, replies, []
                    if wait and self._inflight:
                        _read_replies(conn, self._inflight_replies)
                        self._stats.published += len(self._inflight)
                        self._inflight = []
                except BaseException:
                    self._drop_connection()
                    raise
        except Exception as exc:
            failed = self._inflight + batch  # oldest first
            self._inflight = []
            self._stats.errors += 1
            if _is_auth_error(exc):
                log.error("%s", translate_redis_error(exc, self._url))
            self._spool(failed)
            self._mark_down(exc)

    def _spool(self, payloads: list[bytes]) -> None:
        """Spool payloads (lock held); what the spool cannot keep it counts as dropped."""
        before = len(self.spool) + self.spool.dropped_by_reason["full"]
        self.spool.extend(payloads)
        # Records the cap dropped to make room were spooled earlier; count what landed now.
        self._stats.spooled += len(self.spool) + self.spool.dropped_by_reason["full"] - before

    def _mark_down(self, exc: BaseException) -> None:
        self._up = False
        self._retry_at = time.monotonic() + self._backoff
        if not self._down_logged:
            log.warning("%s; spooling events to %s and retrying", _why_down(self.url, exc), self.spool.directory)
            self._down_logged = True
            self._episode_replayed = 0
        self._wake.notify_all()

    def _replay_once(self) -> bool:
        """Deliver one chunk of the spool; on an empty spool go up. False on failure."""
        with self._lock:
            chunk, pos = self.spool.peek(self.batch_size)
            if not chunk:
                if not self._up:
                    # Nothing to replay, and Redis has not answered since it went down: ask it.
                    if self._down_logged and not self._answered and not self._ping():
                        return False
                    self._up = True
                    self._backoff = self.retry_min_s
                    if self._down_logged:
                        log.warning("Redis at %s answers again; %d spooled events replayed, publishing directly",
                                    self.url, self._episode_replayed)
                    elif self._episode_replayed:
                        log.info("Redis at %s: replayed %d events spooled by an earlier run",
                                 self.url, self._episode_replayed)
                    self._down_logged = False
                    self._answered = False
                    self._episode_replayed = 0
                return True
        try:
            self._send(chunk)  # without the main lock: publish() keeps spooling meanwhile
        except Exception as exc:
            with self._lock:
                self._stats.errors += 1
                self._backoff = min(self._backoff * 2, self.retry_max_s)
                self._retry_at = time.monotonic() + self._backoff
                if _is_auth_error(exc):
                    log.error("%s", translate_redis_error(exc, self._url))
                log.debug("Redis at %s still unreachable: %s", self.url, mask_text(str(exc)))
            return False
        with self._lock:
            self.spool.commit(pos)
            self._stats.published += len(chunk)
            self._stats.replayed += len(chunk)
            self._episode_replayed += len(chunk)
            self._answered = True
        return True

    def _ping(self) -> bool:
        """Whether Redis answers now (used when there is nothing to replay)."""
        try:
            with self._io_lock:
                try:
                    conn = self._connection()
                    conn.send_command("PING")
                    conn.read_response()
                except BaseException:
                    self._drop_connection()
                    raise
        except Exception as exc:
            with self._lock:
                self._stats.errors += 1
                self._backoff = min(self._backoff * 2, self.retry_max_s)
                self._retry_at = time.monotonic() + self._backoff
                log.debug("Redis at %s still unreachable: %s", self.url, mask_text(str(exc)))
            return False
        self._answered = True
        return True

    def _run(self) -> None:
        """Background thread: interval flushes, periodic fsync, reconnect + replay."""
        while True:
            with self._lock:
                if self._closed:
                    return
                self._wake.wait(self.flush_interval_s)
                if self._closed:
                    return
                if self._up:
                    if self._inflight or (
                        self._buf and time.monotonic() - self._buf_since >= self.flush_interval_s
                    ):
                        self._flush_locked(wait=True)
                    continue
                self.spool.sync()
                if time.monotonic() < self._retry_at:
                    continue
            # Down (or replaying an earlier run's spool): replay until empty or failure.
            while not self._closed:
                with self._lock:
                    if self._up:
                        break
                if not self._replay_once():
                    break
