"""Wiring of the stages into a running pipeline.

```
runtime.py         Pipeline: camera threads, engine thread, sinks; RunSummary, CameraState
queue.py           WindowQueue between camera threads and the engine thread
engine_stage.py    ground_in_chunks, GroundingFailures: how the engine is driven
tracking_stage.py  TrackingStage: answers → trackers → events, search segments
identity_stage.py  IdentityStage: tracked boxes → cross-camera identities → global_id on events
control.py         the Redis control stream (standing queries at run time)
metrics.py         Prometheus metrics
```

Modules import downwards only: `runtime` uses every other module; none of them uses `runtime`.
"""

from streamvg.pipeline.control import (
    ControlFollower,
    control_key,
    query_from_config,
    send_query_command,
)
from streamvg.pipeline.engine_stage import GroundingFailures, ground_in_chunks
from streamvg.pipeline.identity_stage import GlobalTrack, IdentityStage, global_tracks
from streamvg.pipeline.metrics import PipelineMetrics
from streamvg.pipeline.queue import WindowQueue
from streamvg.pipeline.runtime import CameraState, Pipeline, RunSummary, Sink, default_sinks
from streamvg.pipeline.tracking_stage import Segment, TrackingStage

__all__ = [
    "CameraState",
    "ControlFollower",
    "GlobalTrack",
    "GroundingFailures",
    "IdentityStage",
    "Pipeline",
    "PipelineMetrics",
    "RunSummary",
    "Segment",
    "Sink",
    "TrackingStage",
    "WindowQueue",
    "control_key",
    "default_sinks",
    "global_tracks",
    "ground_in_chunks",
    "query_from_config",
    "send_query_command",
]
