"""The predictions file: one JSON object per line, `{"index": <item position>, "text": "<raw answer>"}`.

Lines written by `--model` runs also carry what scoring in pixel conventions needs
(`frame_sizes`, `input_sizes`: each image's original and model-input `[width, height]`) and
the engine's `convention`. The file is appended to as answers come (flushed and fsynced per
line), so an interrupted run loses at most the answer being written, and a re-run skips
every index already present. A torn last line (the process killed mid-write) is ignored
with a warning; a later answer for the same index replaces an earlier one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamvg.errors import ConfigError

__all__ = ["Prediction", "append_prediction", "read_predictions"]

log = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(frozen=True)
class Prediction:
    """One answered item.

    Attributes:
        index: Position of the item in the dataset file (0-based).
        text: The model's raw answer.
        frame_sizes: `(width, height)` of each image of the item as stored, if known.
        input_sizes: `(width, height)` of each image as the model saw it, if known.
        convention: The engine's box convention when the answer came from `--model`.
    """

    index: int
    text: str
    frame_sizes: list[Size] | None = None
    input_sizes: list[Size] | None = None
    convention: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "text": self.text}
        if self.frame_sizes is not None:
            out["frame_sizes"] = [list(s) for s in self.frame_sizes]
        if self.input_sizes is not None:
            out["input_sizes"] = [list(s) for s in self.input_sizes]
        if self.convention is not None:
            out["convention"] = self.convention
        out.update(self.extra)
        return out


def _sizes(value: Any, what: str, path: Path, line_no: int) -> list[Size] | None:
    if value is None:
        return None
    try:
        sizes = [(int(w), int(h)) for w, h in value]
    except (TypeError, ValueError):
        raise ConfigError(
            f"{path} line {line_no}: {what} must be a list of [width, height] pairs, got {str(value)[:80]}"
        ) from None
    if any(w < 1 or h < 1 for w, h in sizes):
        raise ConfigError(f"{path} line {line_no}: {what} has a size below 1 pixel")
    return sizes


def read_predictions(path: str | Path, *, n_items: int | None = None, missing_ok: bool = False) -> dict[int, Prediction]:
    """The answers in `path` by item index (the last answer of an index wins).

    Args:
        path: The JSONL file.
        n_items: Items in the dataset; an index outside `[0, n_items)` is an error.
        missing_ok: Return `{}` for a file that does not exist yet (a first `--model` run).

    Raises:
        ConfigError: the file cannot be read, or a complete line is not a prediction (one
            sentence naming the line).
    """
    p = Path(path)
    if not p.exists():
        if missing_ok:
            return {}
        raise ConfigError(f"predictions file {p} not found; give the JSONL of answers or run with --model to produce it")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"predictions file {p} cannot be read ({exc.strerror or exc})") from None
    lines = raw.split(b"\n")
    out: dict[int, Prediction] = {}
    for no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = no == len(lines)  # no newline after it: possibly torn by a kill mid-write
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if last:
                log.warning("%s: the last line is incomplete (an interrupted run?); it is ignored", p)
                continue
            raise ConfigError(
                f"predictions file {p} line {no} is not JSON; each line must be "
                '{"index": <item position>, "text": "<the model\'s answer>"}'
            ) from None
        if not isinstance(obj, dict) or "index" not in obj or "text" not in obj:
            raise ConfigError(f'predictions file {p} line {no} needs "index" and "text" fields')
        idx = obj["index"]
        if isinstance(idx, bool) or not isinstance(idx, int):
            raise ConfigError(f"predictions file {p} line {no}: index must be an integer, got {idx!r}"[:200])
        if idx < 0 or (n_items is not None and idx >= n_items):
            raise ConfigError(
                f"predictions file {p} line {no}: index {idx} is outside the dataset (0 to {(n_items or 1) - 1}); "
                "was it made for another data file?"
            )
        text = obj["text"]
        out[idx] = Prediction(
            index=idx,
            text=text if isinstance(text, str) else ("" if text is None else str(text)),
            frame_sizes=_sizes(obj.get("frame_sizes"), "frame_sizes", p, no),
            input_sizes=_sizes(obj.get("input_sizes"), "input_sizes", p, no),
            convention=str(obj["convention"]) if obj.get("convention") is not None else None,
        )
    return out


def append_prediction(path: str | Path, prediction: Prediction) -> None:
    """Append one answer as a line, flushed and fsynced (a kill loses at most this line)."""
    p = Path(path)
    line = json.dumps(prediction.to_json(), ensure_ascii=False) + "\n"
    # A torn last line from an earlier kill would glue onto ours: start on a fresh line.
    needs_newline = False
    if p.exists() and p.stat().st_size > 0:
        with p.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    with p.open("a", encoding="utf-8") as f:
        f.write(("\n" if needs_newline else "") + line)
        f.flush()
        os.fsync(f.fileno())
