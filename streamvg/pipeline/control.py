"""The Redis control stream `streamvg:{pipeline}:control`: standing queries added and
removed while a pipeline runs (`send_query_command` writes, `ControlFollower` reads).

The stream is replayed from its start whenever a pipeline starts, so queries added at run
time survive a restart. Two rules keep that replay cheap and harmless:

* **Limits** (`ControlConfig`): a command larger than `max_command_bytes`, a query text
  longer than `max_query_chars`, or an add beyond `max_queries` standing queries is
  rejected with one (truncated) log line, before it is parsed or applied.
* **Compaction**: the follower deletes (`XDEL`) every entry that no longer shapes the
  query set: rejected or malformed commands, an add or remove superseded by a later
  command for the same query id, and a remove of a query that only a run-time add had
  made. What stays is at most one command per query id: the commands that make today's
  query set. `XDEL` of an entry is idempotent, so several followers may compact at once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any, Literal

from streamvg.config import ControlConfig, QueryConfig
from streamvg.errors import ConfigError
from streamvg.redaction import mask_text
from streamvg.types import Query

__all__ = ["ControlFollower", "control_key", "query_from_config", "send_query_command"]

log = logging.getLogger("streamvg.pipeline")

_PREVIEW = 120  # characters of a rejected command shown in its log line


def query_from_config(q: QueryConfig | Query) -> Query:
    if isinstance(q, Query):
        return q
    return Query(id=q.id, text=q.text, mode=q.mode, min_score=q.min_score)


def control_key(pipeline: str) -> str:
    """Redis stream that carries query add/remove commands for `pipeline`."""
    return f"streamvg:{pipeline}:control"


def _preview(raw: bytes | str | None) -> str:
    if raw is None:
        return "(none)"
    text = raw[: _PREVIEW * 4].decode("utf-8", "replace") if isinstance(raw, bytes) else raw[: _PREVIEW * 4]
    text = mask_text(text)
    return repr(text[:_PREVIEW]) + ("…" if len(raw) > _PREVIEW else "")


class ControlFollower:
    """Follows a pipeline's control stream from its start and applies each command
    through `add` / `remove`, until `stop` is set. Redis being down is retried quietly:
    the standing queries stay as they are.

    Args:
        url: Redis URL.
        pipeline: Pipeline name.
        add, remove: Apply a command.
        stop: Set to end `run`.
        limits: Size and count limits (defaults: `ControlConfig()`).
        query_count: Standing queries now (for `limits.max_queries`).
        config_ids: Query ids from the pipeline file; a remove of one of them is kept on
            the stream (a restart must remove it again), a remove of any other is not.
        compact: Delete superseded and rejected entries from the stream.
    """

    def __init__(
        self,
        url: str,
        pipeline: str,
        *,
        add: Callable[[QueryConfig], None],
        remove: Callable[[str], object],
        stop: threading.Event,
        limits: ControlConfig | None = None,
        query_count: Callable[[], int] | None = None,
        config_ids: Collection[str] = (),
        compact: bool = True,
    ) -> None:
        self.url = url
        self.key = control_key(pipeline)
        self._add = add
        self._remove = remove
        self._stop = stop
        self.limits = limits or ControlConfig()
        self._query_count = query_count
        self._config_ids = set(config_ids)
        self._compact = compact
        self._latest: dict[str, str] = {}  # query id -> entry id of its latest command
        self.rejected = 0
        self.applied = 0

    def run(self) -> None:
        import redis

        last_id = "0"
        client: redis.Redis | None = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = redis.Redis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=1.0)
                reply: Any = client.xread({self.key: last_id}, count=100, block=500)
                for _stream, entries in reply or []:
                    stale: list[str] = []
                    for entry_id, fields in entries:
                        last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        stale += self.apply(fields, entry_id=last_id)
                    if stale and self._compact:
                        client.xdel(self.key, *stale)
            except Exception as exc:  # Redis down: try again shortly; queries stay as they are
                log.debug("control stream unavailable: %s", mask_text(str(exc)))
                client = None
                self._stop.wait(1.0)

    def _reject(self, entry_id: str | None, why: str, raw: bytes | str | None) -> list[str]:
        self.rejected += 1
        log.warning("control command %s rejected: %s; command: %s", entry_id or "", why, _preview(raw))
        return [entry_id] if entry_id else []

    def apply(self, fields: dict[Any, Any], *, entry_id: str | None = None) -> list[str]:
        """Check and apply one command; returns the entry ids that no longer shape the
        query set (for compaction)."""
        raw = fields.get(b"data") or fields.get("data")
        if raw is None:
            return self._reject(entry_id, "it has no data field", None)
        if len(raw) > self.limits.max_command_bytes:
            return self._reject(
                entry_id, f"{len(raw)} bytes is more than control.max_command_bytes "
                f"({self.limits.max_command_bytes}); raise it in the pipeline file if this is meant", raw,
            )
        try:
            cmd = json.loads(raw)
            if not isinstance(cmd, dict):
                raise ValueError("not a JSON object")
            op = cmd.get("op")
            if op == "add":
                q = cmd.get("query")
                if not isinstance(q, dict):
                    raise ValueError("'query' is not an object")
                text = q.get("text")
                if isinstance(text, str) and len(text) > self.limits.max_query_chars:
                    return self._reject(
                        entry_id, f"its query text has {len(text)} characters, more than "
                        f"control.max_query_chars ({self.limits.max_query_chars})", raw,
                    )
                query = QueryConfig(**q)
                known = query.id in self._latest or query.id in self._config_ids
                if (
                    self._query_count is not None and not known
                    and self._query_count() >= self.limits.max_queries
                ):
                    return self._reject(
                        entry_id, f"{self._query_count()} standing queries already, the most "
                        f"control.max_queries allows ({self.limits.max_queries}); remove one first", raw,
                    )
                self._add(query)
                self.applied += 1
                stale = [self._latest[query.id]] if query.id in self._latest else []
                if entry_id:
                    self._latest[query.id] = entry_id
                return stale
            if op == "remove":
                qid = str(cmd["id"])
                self._remove(qid)
                self.applied += 1
                stale = [self._latest.pop(qid)] if qid in self._latest else []
                if qid in self._config_ids:
                    if entry_id:
                        self._latest[qid] = entry_id  # a restart must remove it again
                elif entry_id:
                    stale.append(entry_id)  # nothing left for it to remove on a replay
                return stale
            raise ValueError(f"unknown op {op!r}")
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return self._reject(entry_id, f"malformed ({mask_text(msg[:200])})", raw)


def send_query_command(
    url: str, pipeline: str, op: Literal["add", "remove"], *, query: Query | QueryConfig | None = None,
    query_id: str | None = None, limits: ControlConfig | None = None,
) -> str:
    """Ask running `pipeline`s to add or remove a standing query; returns the command's id.

    Commands are kept on the control stream, so a pipeline that starts later applies
    them too, in order.

    Raises:
        ConfigError: the query text is longer than `limits.max_query_chars` (pipelines
            would reject it).
    """
    import redis

    lim = limits or ControlConfig()
    if op == "add":
        if query is None:
            raise ValueError("op 'add' needs query")
        q = query_from_config(query)
        if len(q.text) > lim.max_query_chars:
            raise ConfigError(
                f"query {q.id}: the text has {len(q.text)} characters, more than the {lim.max_query_chars} "
                "a pipeline accepts (control.max_query_chars); shorten it or raise the limit in the pipeline file",
                field="control.max_query_chars",
            )
        cmd: dict[str, Any] = {"op": "add", "query": {"id": q.id, "text": q.text, "mode": q.mode, "min_score": q.min_score}}
    else:
        if not query_id:
            raise ValueError("op 'remove' needs query_id")
        cmd = {"op": "remove", "id": query_id}
    client = redis.Redis.from_url(url)
    try:
        entry = client.xadd(control_key(pipeline), {"data": json.dumps(cmd)})
    finally:
        client.close()
    return entry.decode() if isinstance(entry, bytes) else str(entry)
