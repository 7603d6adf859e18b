"""The Redis control stream `streamvg:{pipeline}:control`: standing queries added and
removed while a pipeline runs (`send_query_command` writes, `ControlFollower` reads)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, Literal

from streamvg.config import QueryConfig
from streamvg.redaction import mask_text
from streamvg.types import Query

__all__ = ["ControlFollower", "control_key", "query_from_config", "send_query_command"]

log = logging.getLogger("streamvg.pipeline")


def query_from_config(q: QueryConfig | Query) -> Query:
    if isinstance(q, Query):
        return q
    return Query(id=q.id, text=q.text, mode=q.mode, min_score=q.min_score)


def control_key(pipeline: str) -> str:
    """Redis stream that carries query add/remove commands for `pipeline`."""
    return f"streamvg:{pipeline}:control"


class ControlFollower:
    """Follows a pipeline's control stream from its start and applies each command
    through `add` / `remove`, until `stop` is set. Redis being down is retried quietly:
    the standing queries stay as they are."""

    def __init__(
        self,
        url: str,
        pipeline: str,
        *,
        add: Callable[[QueryConfig], None],
        remove: Callable[[str], object],
        stop: threading.Event,
    ) -> None:
        self.url = url
        self.key = control_key(pipeline)
        self._add = add
        self._remove = remove
        self._stop = stop

    def run(self) -> None:
        import redis

        last_id = "0"
        client: redis.Redis | None = None
        while not self._stop.is_set():
            try:
                if client is None:
                    client = redis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=1.0)
                reply: Any = client.xread({self.key: last_id}, count=100, block=500)
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                        self.apply(fields)
            except Exception as exc:  # Redis down: try again shortly; queries stay as they are
                log.debug("control stream unavailable: %s", mask_text(str(exc)))
                client = None
                self._stop.wait(1.0)

    def apply(self, fields: dict[Any, Any]) -> None:
        raw = fields.get(b"data") or fields.get("data")
        try:
            if raw is None:
                raise ValueError("no data field")
            cmd = json.loads(raw)
            if cmd.get("op") == "add":
                self._add(QueryConfig(**cmd["query"]))
            elif cmd.get("op") == "remove":
                self._remove(str(cmd["id"]))
            else:
                raise ValueError(f"unknown op {cmd.get('op')!r}")
        except Exception as exc:
            log.warning("ignored a malformed control command %r: %s", raw, exc)


def send_query_command(
    url: str, pipeline: str, op: Literal["add", "remove"], *, query: Query | QueryConfig | None = None,
    query_id: str | None = None,
) -> str:
    """Ask running `pipeline`s to add or remove a standing query; returns the command's id.

    Commands are kept on the control stream, so a pipeline that starts later applies
    them too, in order.
    """
    import redis

    if op == "add":
        if query is None:
            raise ValueError("op 'add' needs query")
        q = query_from_config(query)
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
