"""StreamVG: a video and multi-camera grounding stream processor.

Sources → windows → grounding engine (GeM-VG) → tracker → sinks (Redis / JSONL).
The shared value types are re-exported here.
"""

from streamvg.types import Detections, Frame, Query, Window

__version__ = "0.1.0"

__all__ = ["Detections", "Frame", "Query", "Window", "__version__"]
