"""`MqttSink`: events to an MQTT broker (Home Assistant, Frigate, Node-RED), spooled on disk.

Delivery contract (at-least-once, in order), the same as `RedisSink`'s:

* Each event is published as its JSON (`Event.to_json()`, the bytes Redis and JSONL get) on
  the topic `topic` (default `streamvg/{pipeline}/events`; `{camera}`, `{kind}` and
  `{query_id}` may be used too, e.g. `streamvg/{pipeline}/{camera}`), at QoS `qos`
  (default 1: the broker acknowledges every message with a PUBACK).
* Every event first goes to the on-disk spool (`streamvg.sinks.spool.Spool`): `publish()`
  appends and returns, never waiting on the network. One sender thread publishes from the
  spool in order, a batch at a time, and removes a batch only once the broker acknowledged
  all of it. So while the broker is away (down, restarting, refusing the password) events
  simply stay in the spool and go out, oldest first, once it answers; events spooled by an
  earlier run go first when the sink starts. The price is a buffered local disk write per
  event (fsync'd every `fsync_every` events), which also keeps events through a crash of
  this process.
* A batch cut off by a lost connection is sent again whole on a new connection (a fresh
  client, so paho's own queue never re-sends behind our back): the broker may see some
  events twice; every event has a deterministic `event_id` for consumers to drop
  duplicates. Spool overflow drops the oldest events, counted in `stats.dropped`.
* The password in the URL is never logged; a broker refusing it is one sentence
  (`MqttAuthError` at start with `check=True`, an error log line, once per outage, later).
"""

from __future__ import annotations

import logging
import string
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from streamvg.errors import ConfigError, MqttAuthError, PublishError
from streamvg.events import Event
from streamvg.redaction import mask_text, mask_url
from streamvg.sinks.redis import SinkStats
from streamvg.sinks.spool import Spool

__all__ = ["MqttSink", "parse_mqtt_url"]

log = logging.getLogger(__name__)

_TOPIC_FIELDS = frozenset({"pipeline", "camera", "kind", "query_id"})
_AUTH_REASONS = {134, 135}  # "Bad user name or password", "Not authorized" (CONNACK 4 and 5 in 3.1.1)


def parse_mqtt_url(url: str) -> tuple[str, int, str | None, str | None, bool]:
    """`mqtt://[user:password@]host[:port]` (or `mqtts://` for TLS) → host, port, user,
    password, tls. Default ports 1883 / 8883.

    Raises:
        ConfigError: not an mqtt:// or mqtts:// URL, or no host.

    Example:
        >>> parse_mqtt_url("mqtt://ha:s3cret@broker.local")
        ('broker.local', 1883, 'ha', 's3cret', False)
    """
    hint = "write it like mqtt://[user:password@]host:1883 (mqtts:// for TLS)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"MQTT URL {mask_url(url)!r} is invalid ({mask_text(str(exc))}); {hint}", field="sinks.mqtt.url") from None
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ConfigError(f"MQTT URL {mask_url(url)!r} is not an mqtt:// or mqtts:// URL with a host; {hint}", field="sinks.mqtt.url")
    tls = parts.scheme == "mqtts"
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port or (8883 if tls else 1883), user, password, tls


def check_topic(topic: str) -> str:
    """Validate a topic template (placeholders {pipeline}, {camera}, {kind}, {query_id}).

    Raises:
        ConfigError: an unknown placeholder, or an MQTT wildcard (`+`, `#`) in it.
    """
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(topic) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"MQTT topic {topic!r} is not a valid template ({exc}); use {{pipeline}}, {{camera}}, {{kind}}, {{query_id}}", field="sinks.mqtt.topic") from None
    unknown = names - _TOPIC_FIELDS
    if unknown:
        raise ConfigError(
            f"MQTT topic {topic!r} uses {{{sorted(unknown)[0]}}}; the placeholders are {{pipeline}}, {{camera}}, {{kind}} and {{query_id}}",
            field="sinks.mqtt.topic",
        )
    if not topic or "+" in topic or "#" in topic or "\n" in topic or "\0" in topic:
        raise ConfigError(f"MQTT topic {topic!r} is empty or holds a wildcard (+ or #); give a plain topic like streamvg/{{pipeline}}/events", field="sinks.mqtt.topic")
    return topic


def _level(value: str | None) -> str:
    # One topic level: no separators or wildcards from camera names or query ids.
    return "".join("_" if c in "/+#\0" else c for c in (value or "-")) or "-"


class _Outbox:
    """The sink's only use of the spool: append, take the oldest batch, acknowledge it.

    Kept in one place so that a change of the spool's API touches one class.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self._spool = Spool(directory, max_bytes=max_bytes)
        self.directory = directory

    def append(self, record: bytes) -> None:
        self._spool.append(record)

    def take(self, n: int) -> tuple[list[bytes], Any]:
        records, position = self._spool.peek(n)
        return list(records), position

    def ack(self, token: Any) -> None:
        self._spool.commit(token)

    def sync(self) -> None:
        self._spool.sync()

    def close(self) -> None:
        self._spool.close()

    @property
    def dropped(self) -> int:
        return int(self._spool.dropped)

    def __len__(self) -> int:
        return len(self._spool)


class MqttSink:
    """Publish events to an MQTT broker, spooling on disk so nothing is lost while it is away.

    Args:
        url: `mqtt://[user:password@]host:1883` or `mqtts://…:8883` (TLS, system CAs).
            The password is never logged.
        pipeline: Pipeline name (the default topic's `{pipeline}`, the spool's folder).
        topic: Topic template; `{pipeline}`, `{camera}`, `{kind}`, `{query_id}`.
        qos: 0 (no acknowledgement: fastest, lost if the connection drops mid-flight),
            1 (acknowledged, maybe duplicated: the default) or 2 (exactly once per
            connection, slowest).
        retain: Ask the broker to keep the last event per topic for new subscribers.
        client_id: MQTT client id (default `streamvg-{pipeline}-{random}`).
        spool_dir: Folder for the spool; the spool itself is `{spool_dir}/mqtt/{pipeline}`.
        spool_max_bytes: Spool size cap; beyond it the oldest events are dropped (counted).
        batch_size: Events published before waiting for their acknowledgements; larger is
            faster on a distant broker, smaller re-sends less after a broken connection.
        keepalive_s: MQTT keep-alive; a dead broker is noticed within about 1.5 times this.
        connect_timeout_s: Longest a connection attempt (TCP + CONNACK) may take.
        ack_timeout_s: Longest the sender waits for a batch's acknowledgements before it
            treats the connection as broken and starts over.
        retry_max_s: Cap of the exponential backoff between connection attempts.
        check: Connect at construction, raising `MqttAuthError` at once for refused
            credentials (an unreachable broker only starts spooling).

    Raises:
        ConfigError: the URL, topic or qos is invalid, or paho-mqtt is not installed.
        MqttAuthError: the broker refused the credentials (with `check=True`).
        PublishError: the spool folder cannot be used.

    Example:
        with MqttSink("mqtt://ha:pw@homeassistant.local", "lobby") as sink:
            sink.publish(event)
    """

    def __init__(
        self,
        url: str,
        pipeline: str,
        *,
        topic: str = "streamvg/{pipeline}/events",
        qos: int = 1,
        retain: bool = False,
        client_id: str | None = None,
        spool_dir: str | Path = ".streamvg-spool",
        spool_max_bytes: int = 256 * 1024 * 1024,
        batch_size: int = 128,
        keepalive_s: int = 30,
        connect_timeout_s: float = 2.0,
        ack_timeout_s: float = 10.0,
        retry_max_s: float = 5.0,
        check: bool = True,
    ) -> None:
        try:
            import paho.mqtt.client as paho
        except ImportError:
            raise ConfigError(
                "the MQTT sink needs paho-mqtt, which is not installed; pip install 'streamvg[mqtt]'",
                field="sinks.mqtt",
            ) from None
        self._paho = paho
        if qos not in (0, 1, 2):
            raise ConfigError(f"MQTT qos must be 0, 1 or 2, got {qos!r}", field="sinks.mqtt.qos")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._host, self._port, self._user, self._password, self._tls = parse_mqtt_url(url)
        self.url = mask_url(url)
        self.pipeline = pipeline
        self.topic = check_topic(topic)
        self._static_topic = (
            topic.format(pipeline=_level(pipeline)) if not ({"camera", "kind", "query_id"} & _fields(topic)) else None
        )
        self.qos, self.retain = int(qos), bool(retain)
        self.client_id = client_id or f"streamvg-{pipeline}-{uuid.uuid4().hex[:8]}"
        self.batch_size = int(batch_size)
        self.keepalive_s = int(keepalive_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.ack_timeout_s = float(ack_timeout_s)
        self.retry_min_s = min(0.05, retry_max_s)
        self.retry_max_s = float(retry_max_s)
        self._stats = SinkStats()
        self._lock = threading.Condition()
        self._closed = False
        self._drain_until = 0.0
        self._client: Any = None
        self._up = False
        self._backoff = self.retry_min_s
        self._retry_at = 0.0
        self._down_logged = False
        self._auth_logged = False
        self.outbox = _Outbox(Path(spool_dir) / "mqtt" / pipeline, spool_max_bytes)
        if len(self.outbox):
            log.info("MQTT sink %s: %d events from an earlier run go first", self.url, len(self.outbox))
        if check:
            try:
                self._connect()
            except MqttAuthError:
                self.outbox.close()
                raise
            except PublishError as exc:
                self._mark_down(exc)
        self._thread = threading.Thread(target=self._run, name=f"streamvg-mqtt-sink-{pipeline}", daemon=True)
        self._thread.start()

    # --- public API ------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Queue one event (a local disk append; never waits on the broker). Thread-safe.

        Raises:
            PublishError: the sink is closed.
        """
        if self._static_topic is not None:
            topic = self._static_topic
        else:
            topic = self.topic.format(
                pipeline=_level(self.pipeline), camera=_level(event.camera), kind=event.kind,
                query_id=_level(event.query_id),
            )
        record = topic.encode() + b"\n" + event.to_json()
        with self._lock:
            if self._closed:
                raise PublishError(f"MqttSink for {self.url} is closed; create a new sink to publish")
            self.outbox.append(record)
            if not self._up:
                self._stats.spooled += 1
            self._lock.notify_all()

    def flush(self, timeout_s: float = 2.0) -> None:
        """Make queued events durable (fsync) and, while the broker answers, wait up to
        `timeout_s` for them to be acknowledged."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self.outbox.sync()
            while self._up and len(self.outbox) and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(min(remaining, 0.05))

    def close(self, drain_timeout_s: float = 5.0) -> None:
        """Deliver what is queued for up to `drain_timeout_s` (if the broker answers), then
        stop; whatever is left stays in the spool for the next run."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._drain_until = time.monotonic() + drain_timeout_s
            self._lock.notify_all()
        self._thread.join(timeout=drain_timeout_s + self.ack_timeout_s + 5)
        with self._lock:
            left = len(self.outbox)
            self.outbox.close()
        self._drop_client()
        if left:
            log.warning("MQTT sink %s: %d events stay in spool %s for the next run", self.url, left, self.outbox.directory)

    @property
    def stats(self) -> SinkStats:
        """Counters: published (acknowledged), spooled (queued while the broker was away),
        replayed (those later delivered), dropped (spool overflow), errors."""
        self._stats.dropped = self.outbox.dropped
        return self._stats

    @property
    def pending(self) -> int:
        """Events not yet acknowledged by the broker."""
        with self._lock:
            return len(self.outbox)

    @property
    def connected(self) -> bool:
        """Whether the sink currently has a working connection to the broker."""
        return self._up

    def __enter__(self) -> MqttSink:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MqttSink(url={self.url!r}, topic={self.topic!r}, qos={self.qos}, up={self._up})"

    # --- connection ------------------------------------------------------------------

    def _connect(self) -> None:
        """A fresh client, connected (CONNACK accepted), or raise `PublishError`/`MqttAuthError`."""
        paho = self._paho
        client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id=self.client_id,
            protocol=paho.MQTTv311, clean_session=True, reconnect_on_failure=False,
        )
        if self._user is not None:
            client.username_pw_set(self._user, self._password)
        if self._tls:
            client.tls_set()
        client.max_inflight_messages_set(self.batch_size)
        client.max_queued_messages_set(0)
        client.connect_timeout = self.connect_timeout_s
        connack: list[Any] = []
        client.on_connect = lambda _c, _u, _f, reason, _p: connack.append(reason)
        where = f"MQTT broker at {self.url}"
        try:
            client.connect(self._host, self._port, keepalive=self.keepalive_s)
            deadline = time.monotonic() + self.connect_timeout_s
            while not connack and time.monotonic() < deadline:
                rc = client.loop(timeout=0.05)
                if rc != paho.MQTT_ERR_SUCCESS and not connack:
                    raise OSError(f"connection lost ({paho.error_string(rc)})")
        except (OSError, ValueError) as exc:
            _close_quietly(client)
            raise PublishError(f"{where} is unreachable ({mask_text(str(exc)) or type(exc).__name__})") from exc
        if not connack:
            _close_quietly(client)
            raise PublishError(f"{where} did not answer the connection within {self.connect_timeout_s:.1f}s")
        reason = connack[0]
        if getattr(reason, "is_failure", False):
            _close_quietly(client)
            if int(getattr(reason, "value", 0)) in _AUTH_REASONS:
                raise MqttAuthError(
                    f"{where} refused the credentials in the URL ({reason}); check the user name and "
                    "password (mqtt://user:password@host:1883)"
                )
            raise PublishError(f"{where} refused the connection ({reason})")
        self._client = client
        with self._lock:
            if not self._up and self._down_logged:
                log.warning("%s answers again; publishing the %d spooled events", where, len(self.outbox))
            self._up = True
            self._down_logged = self._auth_logged = False
            self._backoff = self.retry_min_s

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            _close_quietly(client)

    def _mark_down(self, exc: BaseException) -> None:
        self._drop_client()
        with self._lock:
            self._up = False
            self._stats.errors += 1
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.retry_max_s)
            if isinstance(exc, MqttAuthError):
                if not self._auth_logged:
                    log.error("%s; events are spooled meanwhile", exc)
                    self._auth_logged = True
            elif not self._down_logged:
                log.warning("%s; spooling events to %s and retrying", mask_text(str(exc)), self.outbox.directory)
            self._down_logged = True
            self._lock.notify_all()

    # --- sender thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed and (not len(self.outbox) or time.monotonic() >= self._drain_until):
                    return
                if self._client is None and time.monotonic() < self._retry_at:
                    self._lock.wait(min(0.05, max(0.0, self._retry_at - time.monotonic())))
                    continue
                records, token = self.outbox.take(self.batch_size) if self._client is not None else ([], None)
                if self._client is not None and not records:
                    self._lock.wait(0.05)
            try:
                if self._client is None:
                    self._connect()
                    continue
                if not records:
                    self._service()
                    continue
                self._send(records)
            except PublishError as exc:
                self._mark_down(exc)
                continue
            with self._lock:
                self.outbox.ack(token)
                self._stats.published += len(records)
                if self._stats.spooled > self._stats.replayed:
                    self._stats.replayed = min(self._stats.spooled, self._stats.replayed + len(records))
                self._lock.notify_all()

    def _service(self) -> None:
        """Idle: let paho answer pings and notice a dead connection."""
        rc = self._client.loop(timeout=0.0)
        if rc != self._paho.MQTT_ERR_SUCCESS:
            raise PublishError(f"MQTT broker at {self.url} dropped the connection ({self._paho.error_string(rc)})")

    def _send(self, records: list[bytes]) -> None:
        """Publish a batch and wait for every acknowledgement; raise `PublishError` otherwise."""
        paho, client = self._paho, self._client
        infos = []
        for rec in records:
            topic, _, payload = rec.partition(b"\n")
            info = client.publish(topic.decode(), payload, qos=self.qos, retain=self.retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise PublishError(f"MQTT broker at {self.url} dropped the connection ({paho.error_string(info.rc)})")
            infos.append(info)
        deadline = time.monotonic() + self.ack_timeout_s
        while not all(i.is_published() for i in infos):
            if time.monotonic() > deadline:
                raise PublishError(f"MQTT broker at {self.url} did not acknowledge {len(infos)} events within {self.ack_timeout_s:.0f}s")
            rc = client.loop(timeout=0.02)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise PublishError(f"MQTT broker at {self.url} dropped the connection ({paho.error_string(rc)})")


def _fields(topic: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(topic) if f}


def _close_quietly(client: Any) -> None:
    try:
        client.disconnect()
    except Exception:  # a dead socket; nothing to do
        log.debug("closing an MQTT connection failed", exc_info=True)
    try:
        sock = client.socket()
        if sock is not None:
            sock.close()
    except Exception:
        log.debug("closing an MQTT socket failed", exc_info=True)
