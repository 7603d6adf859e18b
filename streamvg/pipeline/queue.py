"""The bounded window queue between the camera threads and the engine thread."""

from __future__ import annotations

import threading
import time
from collections import deque

from streamvg.types import Window

__all__ = ["WindowQueue"]


class WindowQueue:
    """A bounded FIFO of windows shared by the camera threads and the engine thread.

    `put(window, live=True)` never blocks: when full it drops the oldest window of the same
    camera (or the oldest overall) so a slow engine always sees fresh frames.
    `put(window, live=False)` blocks while full (files are processed completely).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Window] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, window: Window, *, live: bool, stop: threading.Event) -> Window | None:
        """Queue `window`; returns the window dropped to make room (live), if any."""
        with self._cond:
            dropped: Window | None = None
            if live:
                if len(self._items) >= self.capacity:
                    cam = window.frames[0].camera
                    for i, w in enumerate(self._items):
                        if w.frames[0].camera == cam:
                            dropped = w
                            del self._items[i]
                            break
                    else:
                        dropped = self._items.popleft()
            else:
                while len(self._items) >= self.capacity and not stop.is_set():
                    self._cond.wait(0.1)
                if stop.is_set():
                    return None
            self._items.append(window)
            self._cond.notify_all()
            return dropped

    def get_batch(self, max_items: int, *, wait_s: float, timeout: float) -> list[Window]:
        """Up to `max_items` windows: waits up to `timeout` for the first, then at most
        `wait_s` for more to arrive."""
        with self._cond:
            deadline = time.monotonic() + timeout
            while not self._items:
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return []
                self._cond.wait(left)
            if len(self._items) < max_items and wait_s > 0:
                fill_deadline = time.monotonic() + wait_s
                while len(self._items) < max_items and not self.closed:
                    # Once every camera has ended nothing more will come: no waiting.
                    left = fill_deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._cond.notify_all()
            return batch

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


