"""Fenced camera leases, Redis keys, and the outage guard both roles share.

```
streamvg:{p}:fence:{camera}   INCR on every take-over: the fencing token, only grows
streamvg:{p}:lease:{camera}   "{worker}|{token}" with a TTL (PX lease_s), renewed by a heartbeat
streamvg:{p}:trackstate:{c}   the camera's tracker state (written only through `commit`)
streamvg:{p}:work:{camera}    the camera's windows (ingest XADDs, the owner XDELs in `commit`)
streamvg:{p}:dead             dead letters: fields data, error, source
```

A worker holds a camera while the lease key holds exactly its `{worker}|{token}`. Every
write it makes for the camera (tracker state, deleting the windows it processed, the
events it publishes, the counters) goes through one Lua script, `commit`, which first
checks that value: all of it happens, or nothing does. A worker frozen past its lease
(GC pause, swap, SIGSTOP) wakes up with a token that is no longer the lease's, so its
commit is refused and nothing it computed is seen. The fence counter never goes back, so
a token is never reused by another owner; if Redis loses its data (restart without
persistence) the lease key is gone too, and every commit is refused until the camera is
taken again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from streamvg.redaction import mask_text

__all__ = ["Commit", "Fence", "Outage", "is_outage", "key"]

log = logging.getLogger("streamvg.scaleout")


def key(pipeline: str, name: str) -> str:
    return f"streamvg:{pipeline}:{name}"


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` means Redis is unreachable (ride it out) rather than a refusal."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)):
        return not isinstance(exc, redis.AuthenticationError)
    # A restarting Redis answers LOADING / MASTERDOWN for a moment: still an outage.
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN"))


class Outage:
    """Backoff and logging for one component's Redis outages: one line when an outage
    starts, one when Redis answers again; waits grow from `min_s` to `max_s`.

    `max_s` bounds how long after Redis comes back the component notices (seconds)."""

    def __init__(self, what: str, *, min_s: float = 0.1, max_s: float = 2.0) -> None:
        self.what = what
        self.min_s, self.max_s = min_s, max_s
        self.down_since: float | None = None
        self.outages = 0
        self._wait = min_s

    def down(self, exc: BaseException, stop: threading.Event | None = None) -> None:
        """Note a failed call and wait the next backoff step (returns early on `stop`)."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            self._wait = self.min_s
            log.warning("%s: Redis is unreachable (%s); retrying until it is back", self.what,
                        mask_text(str(exc) or type(exc).__name__))
        if stop is not None:
            stop.wait(self._wait)
        else:
            time.sleep(self._wait)
        self._wait = min(self.max_s, self._wait * 2)

    def up(self) -> None:
        if self.down_since is not None:
            log.warning("%s: Redis is back after %.1f s", self.what, time.monotonic() - self.down_since)
            self.down_since = None


_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return false end
local tok = redis.call('incr', KEYS[2])
local val = ARGV[1] .. '|' .. tok
redis.call('set', KEYS[1], val, 'PX', ARGV[2])
return val
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS: lease, trackstate, work, events, grounded, failed, dead, live
# ARGV: lease value, state mode (set|del|keep), state, events maxlen, grounded, failed,
#       n ids, ids..., n events, events..., n dead, (data, error, source)...
_COMMIT = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
local mode = ARGV[2]
if mode == 'set' then redis.call('set', KEYS[2], ARGV[3]) elseif mode == 'del' then redis.call('del', KEYS[2]) end
local i = 8
local n = tonumber(ARGV[7])
for j = i, i + n - 1 do redis.call('xdel', KEYS[3], ARGV[j]) end
i = i + n
local ne = tonumber(ARGV[i]); i = i + 1
for j = i, i + ne - 1 do redis.call('xadd', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[j]) end
if ne > 0 then redis.call('publish', KEYS[8], table.concat(ARGV, '\\n', i, i + ne - 1)) end
i = i + ne
local nd = tonumber(ARGV[i]); i = i + 1
for j = 0, nd - 1 do
  local b = i + 3 * j
  redis.call('xadd', KEYS[7], 'MAXLEN', '~', '10000', '*', 'data', ARGV[b], 'error', ARGV[b + 1], 'source', ARGV[b + 2])
end
i = i + 3 * nd
if ARGV[i] == 'set' then redis.call('set', KEYS[9], ARGV[i + 1]) end
if tonumber(ARGV[5]) > 0 then redis.call('incrby', KEYS[5], ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('incrby', KEYS[6], ARGV[6]) end
return 1
"""


@dataclass
class Commit:
    """Everything one processing step writes for a camera, applied atomically by `Fence.commit`.

    Attributes:
        state: The tracker state to save (`None`: leave it; `b""`: delete it).
        ids: Work entries done with (deleted from the work stream).
        events: Event JSON lines to XADD to the event stream (and PUBLISH on the live channel).
        dead: Dead letters `(data, error, source)`.
        grounded, failed: Counter increments (windows grounded / whose grounding raised).
        identity: The cross-camera identity state to save with it (`None`: leave it).
    """

    state: bytes | None = None
    ids: list[Any] = field(default_factory=list)
    events: list[bytes] = field(default_factory=list)
    dead: list[tuple[bytes, str, str]] = field(default_factory=list)
    grounded: int = 0
    failed: int = 0
    identity: bytes | None = None


class Fence:
    """The Lua scripts of fenced leases on one Redis client (see the module docstring)."""

    def __init__(self, client: redis.Redis, pipeline: str, *, events_key: str, live_key: str, events_maxlen: int) -> None:
        self.client = client
        self.pipeline = pipeline
        self.events_key, self.live_key, self.events_maxlen = events_key, live_key, events_maxlen
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._commit = client.register_script(_COMMIT)

    def lease_key(self, camera: str) -> str:
        return key(self.pipeline, f"lease:{camera}")

    def acquire(self, camera: str, worker_id: str, lease_ms: int) -> str | None:
        """Take a free camera: its lease value `{worker}|{token}` (a new, larger token), or None."""
        val: Any = self._acquire(keys=[self.lease_key(camera), key(self.pipeline, f"fence:{camera}")], args=[worker_id, lease_ms])
        if not val:
            return None
        return val.decode() if isinstance(val, bytes) else str(val)

    def renew(self, camera: str, lease: str, lease_ms: int) -> bool:
        return bool(self._renew(keys=[self.lease_key(camera)], args=[lease, lease_ms]))

    def release(self, camera: str, lease: str) -> bool:
        return bool(self._release(keys=[self.lease_key(camera)], args=[lease]))

    def commit(self, camera: str, work_key: str, lease: str, c: Commit, *, client: Any = None) -> bool:
        """Apply `c` if `lease` is still the camera's lease; False (nothing written) if not."""
        mode = "keep" if c.state is None else ("del" if c.state == b"" else "set")
        args: list[Any] = [lease, mode, c.state or b"", self.events_maxlen, c.grounded, c.failed, len(c.ids), *c.ids,
                           len(c.events), *c.events, len(c.dead)]
        for data, error, source in c.dead:
            args += [data, error, source]
        args += ["keep", b""] if c.identity is None else ["set", c.identity]
        keys: Sequence[str] = [
            self.lease_key(camera), key(self.pipeline, f"trackstate:{camera}"), work_key, self.events_key,
            key(self.pipeline, "windows_grounded"), key(self.pipeline, "windows_failed"), key(self.pipeline, "dead"),
            self.live_key, key(self.pipeline, f"identitystate:{camera}"),
        ]
        return bool(self._commit(keys=list(keys), args=args, client=client))


def token_of(lease: str) -> int:
    """The fencing token in a lease value `{worker}|{token}`."""
    return int(lease.rsplit("|", 1)[-1])
