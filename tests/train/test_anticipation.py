"""The look-ahead queue: routes computed for step t+delta are used at t+delta, and its state round-trips."""

import numpy as np
import pytest

from v4jax.train.anticipation import LookaheadQueue


class CountingIterator:
    """A resumable iterator of batches {"tokens": [[i]]}."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"tokens": np.array([[self.i - 1]])}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def route(batch):
    return batch["tokens"] * 100


def test_routes_arrive_delta_steps_later():
    queue = LookaheadQueue(CountingIterator(), delta=2)
    assert queue.anticipate(route)  # step 0 computes routes for the batch of step 2
    first = queue.pop()
    assert first.batch["tokens"][0, 0] == 0 and first.routed_indices is None
    assert queue.pop().routed_indices is None  # step 1 (anticipation was off at step 1)
    third = queue.pop()
    assert third.batch["tokens"][0, 0] == 2 and third.routed_indices[0, 0] == 200


def test_state_round_trip_replays_the_same_batches_and_routes():
    queue = LookaheadQueue(CountingIterator(), delta=2)
    for _ in range(3):
        queue.anticipate(route)
        queue.pop()
    it_state, arrays, valid = queue.get_state()
    expected = []
    for _ in range(4):
        queue.anticipate(route)
        e = queue.pop()
        expected.append((int(e.batch["tokens"][0, 0]), None if e.routed_indices is None else int(e.routed_indices[0, 0])))

    resumed = LookaheadQueue(CountingIterator(), delta=2)
    resumed.set_state(it_state, arrays, valid)
    got = []
    for _ in range(4):
        resumed.anticipate(route)
        e = resumed.pop()
        got.append((int(e.batch["tokens"][0, 0]), None if e.routed_indices is None else int(e.routed_indices[0, 0])))
    assert got == expected and got[0] == (3, 300)


def test_delta_must_be_positive():
    with pytest.raises(ValueError, match="delta"):
        LookaheadQueue(CountingIterator(), delta=0)
