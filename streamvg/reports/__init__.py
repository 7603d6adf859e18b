"""Results people can look at: segment clips, an HTML report, annotated video, MOT files.

The last stage: it reads what a run produced (search segments, published events) and the
source videos again, and writes files; it never feeds anything back into a pipeline.

```
clips.py     one H.264 MP4 per segment, box and track id drawn (search --clips)
html.py      one self-contained static HTML report (search --report)
annotate.py  a run's events drawn on its video (streamvg annotate)
mot.py       MOTChallenge files per video and query (search --mot)
draw.py      boxes, colours, interpolation between sampled frames
video.py     PyAV decode of every frame / H.264 MP4 writer
```
"""

from streamvg.reports.annotate import AnnotateResult, annotate_video, read_events, track_boxes
from streamvg.reports.clips import clip_name, write_clip, write_clips
from streamvg.reports.html import VideoInfo, render_report, videos_from_summary, write_report
from streamvg.reports.mot import mot_lines, write_mot

__all__ = [
    "AnnotateResult",
    "VideoInfo",
    "annotate_video",
    "clip_name",
    "mot_lines",
    "read_events",
    "render_report",
    "track_boxes",
    "videos_from_summary",
    "write_clip",
    "write_clips",
    "write_mot",
    "write_report",
]
