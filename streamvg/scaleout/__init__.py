"""Scale-out over Redis: ingest processes put windows on per-camera work streams, ground
workers lease cameras and ground their windows.

```
 streamvg monitor --role ingest            streamvg monitor --role ground  (×N, GPU)
 cameras → windows → local buffer ─XADD─▶ streamvg:{p}:work:{camera} ─XREAD─▶ engine → trackers
 (source_status events through the        (a camera is leased to one worker at a time, with a
  Redis sink and its spool)                fencing token; state, acks and events in one fenced
                                           commit)
```

```
codec.py    work entries: encode (downsizing), checked decode (sizes before inflating), PoisonEntry
lease.py    fenced leases (Lua: acquire, renew, release, commit), Outage (backoff, one log line)
ingest.py   WindowPublisher: bounded per-camera buffer and a sender thread
ground.py   GroundWorker: heartbeat thread, balance, adopt, process, dead letters
```

See each module's docstring; the README's "Scaling out" section says what is fenced,
what an outage does and the limits.
"""

from streamvg.scaleout.codec import (
    PoisonEntry,
    WorkItem,
    decode_entry,
    decode_window,
    encode_window,
    end_marker,
    jpeg_size,
)
from streamvg.scaleout.ground import GroundWorker, check_state_size
from streamvg.scaleout.ingest import WindowPublisher, work_key
from streamvg.scaleout.lease import Commit, Fence, Outage, key

__all__ = [
    "Commit",
    "Fence",
    "GroundWorker",
    "Outage",
    "PoisonEntry",
    "WindowPublisher",
    "WorkItem",
    "check_state_size",
    "decode_entry",
    "decode_window",
    "encode_window",
    "end_marker",
    "jpeg_size",
    "key",
    "work_key",
]
