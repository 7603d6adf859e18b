"""Identity: one `global_id` for the same object across the cameras of a pipeline.

```
 tracker (per camera) ──tracked boxes of a multi-camera window──▶ Linker (per query) ──▶ global_id
                         └─ correspondence requests ─▶ engine ─▶ votes ┘
```

Per-camera tracks stay as they are; the linker only adds which tracks are one object.
Evidence, always from the model's own multi-image answers about one instant:

- **one-referent queries** ("the man in the yellow vest"): the tracked boxes one
  multi-camera window gives in several cameras are that one object: an agreeing vote for
  every pair, no extra model call;
- **queries with several targets**: a correspondence request (`correspondence.py`) shows
  the track's box drawn in its camera's image and asks which box in the other cameras'
  images is the same object; the answered box votes *agree* for the track it overlaps and
  *contradict* for the other tracks of that camera in that frame.

`Linker` (`linker.py`) turns votes into identities: several agreeing windows before a link,
links undone when contradicted, and two tracks seen in one frame of one camera never one
identity. This package imports the grounding stage's public API and nothing later.
"""

from streamvg.identity.correspondence import (
    CorrespondenceRequest,
    correspondence_text,
    is_correspondence,
    mark_box,
    marked_frame,
    parse_correspondence,
    read_answer,
)
from streamvg.identity.linker import Linker, PairEvidence, TrackKey, TrackSpan

__all__ = [
    "CorrespondenceRequest",
    "Linker",
    "PairEvidence",
    "TrackKey",
    "TrackSpan",
    "correspondence_text",
    "is_correspondence",
    "mark_box",
    "marked_frame",
    "parse_correspondence",
    "read_answer",
]
