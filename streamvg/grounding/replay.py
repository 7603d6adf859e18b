"""`ReplayEngine`: groundings read from a JSONL file instead of a model (engine kind `replay`).

Tracking, events and sinks then run and are tested without a model, the way trackers are
evaluated on MOTChallenge "public detections".

Record format (one JSON object per line; blank lines and lines starting with `#` are skipped):

```json
{"camera": "door", "pts": 12.48, "query": "vest",
 "boxes": [{"xyxy": [x1, y1, x2, y2], "score": 0.91, "label": "man in yellow vest"}]}
```

- `camera` (str) and `pts` (float, media seconds) say which frame the boxes are for;
- `query` (str or null): null answers any query, otherwise it matches the `Query.id` or
  `Query.text`; a query-specific record wins over a null one at the same frame;
- `boxes`: `xyxy` in original frame pixels (required), `score` (default 1.0), `label` (optional).

For each frame of a window the record with the same camera and `|pts - frame.pts| <=
tolerance_s` is used (the nearest one); its boxes get `image_index` = the frame's position
in the window. A frame with no record has no boxes. `streamvg.testing.synthetic.replay_records`
writes this format from a synthetic scene's ground truth.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamvg.errors import ConfigError
from streamvg.grounding import EngineStats, Grounding
from streamvg.types import Detections, Query, Window

__all__ = ["ReplayEngine", "ReplayRecord", "load_replay"]


@dataclass(frozen=True)
class ReplayRecord:
    """One frame's stored boxes (see the module docstring for the JSON form)."""

    camera: str
    pts: float
    query: str | None
    xyxy: np.ndarray  # (N, 4) float32, original frame pixels
    score: np.ndarray  # (N,) float32
    labels: tuple[str, ...] = ()


def _record(data: Any, where: str) -> ReplayRecord:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object with camera, pts and boxes, got {type(data).__name__}")
    camera, pts, query, boxes = data.get("camera"), data.get("pts"), data.get("query"), data.get("boxes", [])
    if not isinstance(camera, str) or not camera:
        raise ConfigError(f"{where}: 'camera' must be a non-empty string, got {camera!r}")
    if isinstance(pts, bool) or not isinstance(pts, (int, float)) or not math.isfinite(pts):
        raise ConfigError(f"{where}: 'pts' must be a number of media seconds, got {pts!r}")
    if query is not None and not isinstance(query, str):
        raise ConfigError(f"{where}: 'query' must be a string or null, got {query!r}")
    if not isinstance(boxes, list):
        raise ConfigError(f"{where}: 'boxes' must be a list of {{xyxy, score}} objects, got {type(boxes).__name__}")
    xyxy: list[list[float]] = []
    scores: list[float] = []
    labels: list[str] = []
    for i, box in enumerate(boxes):
        coords = box.get("xyxy") if isinstance(box, dict) else None
        if (
            not isinstance(coords, list)
            or len(coords) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coords)
        ):
            raise ConfigError(f"{where}: boxes[{i}].xyxy must be four finite numbers [x1, y1, x2, y2], got {coords!r}")
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise ConfigError(f"{where}: boxes[{i}].xyxy {coords} has x2 < x1 or y2 < y1; write [x1, y1, x2, y2]")
        score = box.get("score", 1.0)
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise ConfigError(f"{where}: boxes[{i}].score must be a number in [0, 1], got {score!r}")
        xyxy.append([float(v) for v in coords])
        scores.append(float(score))
        labels.append(str(box.get("label", "")))
    return ReplayRecord(
        camera=camera,
        pts=float(pts),
        query=query,
        xyxy=np.array(xyxy, dtype=np.float32).reshape(-1, 4),
        score=np.array(scores, dtype=np.float32),
        labels=tuple(labels),
    )


def load_replay(path: str | Path) -> list[ReplayRecord]:
    """Read and validate a replay JSONL file; `ConfigError` names the file and line of a bad record."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"replay file {p} not found; give a groundings JSONL file (engine.replay_path)", field="engine.replay_path")
    records: list[ReplayRecord] = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{p}:{n}: not valid JSON ({exc.msg}); each line must be one record", field="engine.replay_path") from exc
            records.append(_record(data, f"{p}:{n}"))
    return records


class ReplayEngine:
    """Groundings from a replay JSONL file, keyed by camera and media time.

    Args:
        path: The JSONL file (format in the module docstring), or a list of record dicts.
        tolerance_s: Largest |pts difference| in seconds between a frame and its record;
            wider tolerates resampled timestamps but may take a neighbouring frame's boxes.
    """

    def __init__(
        self, path: str | Path | Sequence[dict[str, Any]], *, tolerance_s: float = 0.02, latency_s: float = 0.0
    ) -> None:
        if tolerance_s < 0:
            raise ConfigError(f"tolerance_s must be >= 0, got {tolerance_s}")
        if latency_s < 0:
            raise ConfigError(f"latency_s must be >= 0, got {latency_s}")
        # Simulated model time per batch: lets capacity tests and scale-out drills behave
        # like a real model (which takes ~0.1-1 s per batch) without one.
        self.latency_s = latency_s
        if isinstance(path, (str, Path)):
            records = load_replay(path)
            self.name = f"replay:{Path(path).name}"
        else:
            records = [_record(r, f"record {i}") for i, r in enumerate(path)]
            self.name = "replay"
        self.tolerance_s = tolerance_s
        self.stats = EngineStats()
        self._by_camera: dict[str, tuple[list[float], list[ReplayRecord]]] = {}
        for rec in sorted(records, key=lambda r: (r.camera, r.pts)):
            times, recs = self._by_camera.setdefault(rec.camera, ([], []))
            times.append(rec.pts)
            recs.append(rec)

    def __len__(self) -> int:
        return sum(len(v[1]) for v in self._by_camera.values())

    def lookup(self, camera: str, pts: float, query: Query) -> ReplayRecord | None:
        """The record for a frame: nearest within tolerance, query-specific before null."""
        entry = self._by_camera.get(camera)
        if entry is None:
            return None
        times, recs = entry
        lo = bisect.bisect_left(times, pts - self.tolerance_s)
        hi = bisect.bisect_right(times, pts + self.tolerance_s)
        best: tuple[int, float] | None = None
        chosen: ReplayRecord | None = None
        for rec in recs[lo:hi]:
            if rec.query is not None and rec.query not in (query.id, query.text):
                continue
            rank = (0 if rec.query is not None else 1, abs(rec.pts - pts))
            if best is None or rank < best:
                best, chosen = rank, rec
        return chosen

    def ground(self, windows: Sequence[Window], query: Query) -> list[Grounding]:
        """One `Grounding` per window, boxes from the stored records."""
        return self.ground_many([(w, query) for w in windows])

    def ground_many(self, requests: Sequence[tuple[Window, Query]]) -> list[Grounding]:
        """One `Grounding` per (window, query), in order."""
        if self.latency_s and requests:
            time.sleep(self.latency_s)
        out: list[Grounding] = []
        for window, query in requests:
            t0 = time.perf_counter()
            parts: list[Detections] = []
            raw: list[dict[str, Any]] = []
            for k, frame in enumerate(window.frames):
                rec = self.lookup(frame.camera, frame.pts, query)
                if rec is None or not len(rec.xyxy):
                    continue
                parts.append(Detections(xyxy=rec.xyxy, score=rec.score, image_index=np.full(len(rec.xyxy), k, dtype=np.int64)))
                raw.append({"camera": rec.camera, "pts": rec.pts, "image": k, "boxes": rec.xyxy.tolist()})
            det = Detections.concat(parts)
            if query.min_score > 0 and len(det):
                det = det[det.score >= query.min_score]
            total = time.perf_counter() - t0
            self.stats.windows += 1
            self.stats.boxes += len(det)
            out.append(
                Grounding(
                    window_id=window.id,
                    query_id=query.id,
                    detections=det,
                    raw_text=json.dumps(raw),
                    reasoning=None,
                    model=self.name,
                    timings={"prepare": 0.0, "vision": 0.0, "generate": 0.0, "parse": total, "total": total},
                    parse_ok=True,
                )
            )
        return out

    def close(self) -> None:
        """Nothing to release (the records are in memory)."""
