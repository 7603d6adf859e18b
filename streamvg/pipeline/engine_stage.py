"""How the runtime drives the engine: batches of (window, query) requests in chunks, with
failed chunks skipped and counted (`GroundingFailures`) instead of ending the run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from streamvg.errors import GroundingCancelled, GroundingError
from streamvg.grounding import Grounding, GroundingEngine
from streamvg.redaction import mask_text
from streamvg.types import Query, Window

__all__ = ["GroundingFailures", "ground_in_chunks"]

log = logging.getLogger("streamvg.pipeline")


class GroundingFailures:
    """Windows whose grounding raised: skipped and counted, not fatal, up to a limit.

    A model server restarting or one out-of-memory batch must not end a monitor that
    watches cameras for days, so a failed batch's windows are skipped (their frames go
    ungrounded; trackers bridge the gap like a missed detection). `limit` failed windows in
    a row end the run instead (None: never), so a search whose engine cannot work at all
    stops with the reason rather than skipping every window. Logging is one line when a
    burst starts, one every `log_every_s` while it lasts, and one when grounding recovers.
    """

    def __init__(self, limit: int | None, *, log_every_s: float = 30.0) -> None:
        self.limit = limit
        self.log_every_s = log_every_s
        self.total = 0
        self.consecutive = 0
        self.last_error = ""
        self._last_log = 0.0

    def failed(self, windows: int, exc: BaseException) -> bool:
        """Count `windows` skipped because of `exc`; True when the limit is reached."""
        self.total += windows
        self.consecutive += windows
        self.last_error = mask_text(str(exc) or type(exc).__name__)
        now = time.monotonic()
        if self.consecutive == windows:
            log.warning("grounding failed, skipping %d window(s): %s", windows, self.last_error)
            self._last_log = now
        elif now - self._last_log >= self.log_every_s:
            log.warning("grounding still failing: %d window(s) skipped in a row; last error: %s",
                        self.consecutive, self.last_error)
            self._last_log = now
        log.debug("grounding failure", exc_info=exc)
        return self.limit is not None and self.consecutive >= self.limit

    def succeeded(self) -> None:
        if self.consecutive:
            log.info("grounding recovered after %d skipped window(s)", self.consecutive)
        self.consecutive = 0

    def give_up_message(self) -> str:
        return (f"grounding failed for {self.consecutive} windows in a row, so the run stopped; "
                f"last error: {self.last_error}")


def ground_in_chunks(
    engine: GroundingEngine,
    requests: list[tuple[Window, Query]],
    batch_size: int,
    failures: GroundingFailures,
    on_failed: Callable[[Window], None],
) -> Iterator[tuple[list[tuple[Window, Query]], list[Grounding], float]]:
    """Ground `requests` `batch_size` at a time; yield `(chunk, groundings, seconds)` for
    each chunk the engine answered. A chunk that raises is skipped: each of its windows is
    passed to `on_failed` once and counted in `failures`, which raises `GroundingError`
    (the run stops) when its limit of failures in a row is reached."""
    failed: set[int] = set()  # windows (by id) already reported
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        t0 = time.perf_counter()
        try:
            groundings = engine.ground_many(chunk)
        except GroundingCancelled:
            raise  # the run is stopping: not a failure of the engine
        except Exception as exc:  # skipped and counted, not fatal: see GroundingFailures
            newly = {id(w): w for w, _q in chunk if id(w) not in failed}
            failed.update(newly)
            give_up = bool(newly) and failures.failed(len(newly), exc)  # first: on_failed sees last_error
            for w in newly.values():
                on_failed(w)
            if give_up:
                raise GroundingError(failures.give_up_message()) from exc
            continue
        failures.succeeded()
        yield chunk, groundings, time.perf_counter() - t0


