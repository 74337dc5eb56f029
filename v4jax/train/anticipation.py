"""The look-ahead batch queue behind anticipatory routing, and its resumable state.

Anticipatory routing (paper section 4.2.3) chooses the experts of step t with the parameters of step
t - delta. The loop keeps the batches of steps t .. t+delta in a queue; while anticipation is on, at
step t (before the update) it runs a routing-only forward on the batch of step t+delta with the
current parameters and caches the indices; at step t+delta those indices are passed to the model as
`routed_indices` (combine weights still come from the current router). The queue is part of the
checkpoint: the data-iterator state from before its oldest batch plus the cached indices, so a
resumed run draws the same batches and uses the same routes.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass
class QueuedBatch:
    batch: dict[str, np.ndarray]
    iterator_state_before: Any  # the data iterator's state just before this batch was drawn
    routed_indices: Any = None  # [L, B, S, K] cached by an anticipation forward, or None


class LookaheadQueue:
    """Holds the batches of the next `delta + 1` steps, drawn from a resumable data iterator."""

    def __init__(self, iterator: Any, delta: int):
        if delta < 1:
            raise ValueError(f"anticipation delta must be >= 1, got {delta}")
        self.iterator, self.delta = iterator, delta
        self._queue: collections.deque[QueuedBatch] = collections.deque()

    def fill(self) -> None:
        """Draws batches until the queue holds the current step and the `delta` after it."""
        while len(self._queue) < self.delta + 1:
            state = self.iterator.get_state()
            self._queue.append(QueuedBatch(next(self.iterator), state))

    def anticipate(self, route: Callable[[dict[str, np.ndarray]], Any]) -> bool:
        """Caches routes for the furthest batch (step t+delta) if it has none; True when a forward ran."""
        self.fill()
        last = self._queue[-1]
        if last.routed_indices is not None:
            return False
        last.routed_indices = route(last.batch)
        return True

    def pop(self) -> QueuedBatch:
        """The batch of the current step (with its cached routes, if any)."""
        self.fill()
        return self._queue.popleft()

    def get_state(self) -> tuple[Any, dict[str, np.ndarray], list[bool]]:
        """(iterator state before the oldest queued batch, {qI: indices}, valid flags) for a checkpoint."""
        iterator_state = self._queue[0].iterator_state_before if self._queue else self.iterator.get_state()
        arrays = {"_": np.zeros((1,), np.int32)}  # orbax needs at least one leaf
        valid = []
        for i, entry in enumerate(self._queue):
            valid.append(entry.routed_indices is not None)
            if entry.routed_indices is not None:
                arrays[f"q{i}"] = np.asarray(entry.routed_indices)
        return iterator_state, arrays, valid

    def set_state(self, iterator_state: Any, arrays: dict[str, np.ndarray], valid: list[bool]) -> None:
        """Restores the queue: rewinds the iterator, redraws the queued batches, re-attaches routes."""
        self._queue.clear()
        self.iterator.set_state(iterator_state)
        for i, has_routes in enumerate(valid):
            state = self.iterator.get_state()
            self._queue.append(QueuedBatch(next(self.iterator), state, arrays[f"q{i}"] if has_routes else None))
