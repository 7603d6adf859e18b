"""Tracking stage: time-aware multi-object tracking of grounded boxes (one tracker per camera and query).

`Tracker.update(detections, t)` takes one frame's boxes at media time `t` (seconds) and returns
the boxes of confirmed tracks with `track_id` set; `pop_events()` gives the lifecycle events
(`started`, `updated`, `lost`, `ended`) the pipeline publishes. See `streamvg.tracking.tracker`.
"""

from streamvg.tracking.kalman import BoxKalman
from streamvg.tracking.tracker import Track, Tracker, TrackerInputError, TrackEvent, TrackingError

__all__ = ["BoxKalman", "Track", "TrackEvent", "Tracker", "TrackerInputError", "TrackingError"]
