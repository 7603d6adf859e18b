"""Stopping a running `generate` between tokens when the pipeline stops.

A long `generate` (a real model on CPU, a reasoning answer) can run for minutes; a monitor
told to stop must not wait for it, nor leave the interpreter while it runs (torch's threads
then abort the process). `stop_criteria(event)` is a transformers `StoppingCriteria` that
ends generation at the next token once `event` is set; the engine then raises
`GroundingCancelled` instead of returning the cut answer.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = ["StopOnEvent", "with_stop_event"]


class StopOnEvent(StoppingCriteria):
    """Ends every sequence of the batch at the next token once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self.event.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def with_stop_event(criteria: Any, event: threading.Event) -> StoppingCriteriaList:
    """`criteria` (None, one criterion or a list, from the caller's generate kwargs) plus `StopOnEvent(event)`."""
    out = StoppingCriteriaList()
    if isinstance(criteria, StoppingCriteria):
        out.append(criteria)
    elif criteria:
        out.extend(criteria)
    out.append(StopOnEvent(event))
    return out
