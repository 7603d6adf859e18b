"""Exit codes and `--json` failure lists, the same for every command.

| code | meaning |
| --- | --- |
| 0 | done (also: a monitor stopped by SIGTERM or `--duration-s`) |
| 1 | finished with failures: unreadable inputs, grounding that failed or answers that did not parse for more than `FAILED_FRACTION` of the windows, the engine gave up, every camera failed, an output that could not be written |
| 2 | bad usage or input, found before any work: an unknown option, a malformed pipeline file, a missing file or model, an output path that cannot be written |
| 130 | interrupted by Ctrl-C (SIGINT); what was found so far is kept and printed |

Commands build their result with `run_failures(summary)` (one entry per input that had a
problem, with its sentence) and `run_exit_code(...)`, so `search` and `monitor` (and flags
other modules add to them) report the same way.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass
from typing import Any, Literal

from streamvg.errors import (
    ConfigError,
    EngineUnavailableError,
    ModelLoadError,
    MqttAuthError,
    RedisAuthError,
    SourceNotFoundError,
    StreamVGError,
    UnsupportedSourceError,
)
from streamvg.pipeline import RunSummary

__all__ = [
    "EXIT_FAILURES",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "FAILED_FRACTION",
    "Failure",
    "all_cameras_failed_error",
    "exit_code_for_error",
    "flush_std_streams",
    "run_exit_code",
    "run_failures",
    "summary_fields",
]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# More than this fraction of a camera's windows failed (engine raised) or of its answers
# unparseable makes the run exit 1: a few bad answers in a long search are normal, most
# of them mean the model or server is wrong for the job.
FAILED_FRACTION = 0.5

FailureKind = Literal["unreadable", "windows_failed", "unparseable", "engine_stopped", "output", "camera_failed"]

# Errors raised before any work that mean "the command as given cannot run" (exit 2);
# other StreamVG errors happened while working (exit 1).
_USAGE_ERRORS: tuple[type[StreamVGError], ...] = (
    ConfigError, SourceNotFoundError, UnsupportedSourceError, ModelLoadError, EngineUnavailableError, RedisAuthError,
    MqttAuthError,
)


def exit_code_for_error(exc: StreamVGError) -> int:
    """2 for bad usage or input (config, missing file or model, credentials), else 1."""
    return EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_FAILURES


@dataclass
class Failure:
    """One input that had a problem, for `--json` (`failures`) and the closing lines.

    Attributes:
        input: The file path or camera URI (passwords masked), or the output path.
        camera: The camera name the run gave the input ("" for outputs).
        kind: "unreadable" (could not be opened or read), "windows_failed" (the engine
            raised on its windows), "unparseable" (answers with no readable boxes),
            "engine_stopped" (the engine gave up; the run stopped), "camera_failed" (a
            live camera ended for good), "output" (a result could not be written).
        error: The sentence saying what is wrong and what to do.
        count: Windows (windows_failed) or answers (unparseable) concerned, else None.
        of: The camera's windows attempted or answers handled, for `count`, else None.
    """

    input: str
    camera: str
    kind: FailureKind
    error: str
    count: int | None = None
    of: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_failures(summary: RunSummary) -> list[Failure]:
    """Every camera's problems in `summary`, in camera order, then the engine's."""
    out: list[Failure] = []
    for cam in summary.cameras.values():
        if cam.state == "failed":
            kind: FailureKind = "camera_failed" if cam.live else "unreadable"
            out.append(Failure(cam.uri, cam.name, kind, cam.detail or "could not be read"))
        attempted = cam.windows_grounded + cam.windows_failed
        if cam.windows_failed:
            out.append(Failure(cam.uri, cam.name, "windows_failed",
                               f"grounding failed for {cam.windows_failed} of {attempted} window(s); they were skipped"
                               + (f"; last error: {cam.last_error}" if cam.last_error else ""),
                               cam.windows_failed, attempted))
        if cam.unparseable_answers:
            out.append(Failure(cam.uri, cam.name, "unparseable",
                               f"{cam.unparseable_answers} of {cam.answers} model answer(s) had no readable boxes; "
                               "those windows were skipped (check the model and engine.convention)",
                               cam.unparseable_answers, cam.answers))
    if summary.error:
        out.append(Failure("engine", "", "engine_stopped", summary.error))
    return out


def _past_threshold(f: Failure) -> bool:
    if f.kind in ("windows_failed", "unparseable"):
        return f.count is not None and f.of is not None and f.of > 0 and f.count / f.of > FAILED_FRACTION
    return True


def run_exit_code(
    summary: RunSummary, failures: list[Failure], *, interrupted: bool = False, all_cameras_must_fail: bool = False
) -> int:
    """The documented exit code of a search or monitor run.

    Args:
        summary: The run's summary.
        failures: `run_failures(summary)` plus any the command added (outputs).
        interrupted: Ctrl-C (SIGINT) stopped the run: 130 whatever else happened.
        all_cameras_must_fail: A live monitor: unreadable cameras exit 1 only when every
            camera failed (one dead camera among many is a status, not a failed run).
    """
    if interrupted:
        return EXIT_INTERRUPTED
    if summary.error:
        return EXIT_FAILURES
    camera_failures = [f for f in failures if f.kind in ("unreadable", "camera_failed")]
    if camera_failures:
        if not all_cameras_must_fail:
            return EXIT_FAILURES
        if summary.cameras and all(c.state == "failed" for c in summary.cameras.values()):
            return EXIT_FAILURES
    if any(_past_threshold(f) for f in failures if f.kind not in ("unreadable", "camera_failed")):
        return EXIT_FAILURES
    return EXIT_OK


def all_cameras_failed_error(summary: RunSummary) -> str | None:
    """The sentence for a run whose every camera failed (monitor's `error`), else None."""
    cams = list(summary.cameras.values())
    if cams and all(c.state == "failed" for c in cams):
        first = cams[0]
        return f"every camera failed, so nothing was grounded; first: {first.name}: {first.detail}"
    return None


def summary_fields(summary: RunSummary, failures: list[Failure], exit_code: int) -> dict[str, Any]:
    """The keys `search --json` and `monitor --json` share (a command adds its own)."""
    return {
        "interrupted": summary.interrupted,
        "windows_grounded": summary.windows_grounded,
        "windows_failed": summary.windows_failed,
        "unparseable_answers": summary.unparseable_answers,
        "error": summary.error,
        "failures": [f.to_json() for f in failures],
        "exit_code": exit_code,
    }


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
