"""The per-epoch shuffle: a true permutation, fixed by (seed, epoch), equal to a plain-Python oracle."""

import grain
import numpy as np

from v4jax.data.shuffle import (
    EpochShuffleMapDataset,
    WindowShuffleIterDataset,
    epoch_permutation,
)

M = (1 << 64) - 1


def _splitmix64_py(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def test_permutation_matches_python_oracle():
    for n, seed, epoch in [(1, 0, 0), (7, 3, 1), (300, 12345, 9)]:
        base = _splitmix64_py((seed * 0x100000001B3 + epoch) & M)
        want = sorted(range(n), key=lambda i: (_splitmix64_py(i ^ base), i))
        assert epoch_permutation(n, seed, epoch).tolist() == want


def test_permutation_depends_on_seed_and_epoch():
    p = epoch_permutation(50, 1, 0)
    assert sorted(p.tolist()) == list(range(50))
    assert not np.array_equal(p, epoch_permutation(50, 1, 1))
    assert not np.array_equal(p, epoch_permutation(50, 2, 0))


def test_dataset_reshuffles_each_epoch_when_repeated():
    ds = EpochShuffleMapDataset(grain.MapDataset.range(10), seed=4).repeat(3)
    epochs = [[ds[e * 10 + i] for i in range(10)] for e in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] == epoch_permutation(10, 4, 0).tolist()
    assert epochs[0] != epochs[1] != epochs[2]


def test_window_shuffle_permutes_each_window_and_resumes_everywhere():
    ds = WindowShuffleIterDataset(
        grain.MapDataset.range(23).to_iter_dataset(), window_size=5, seed=9
    )
    out = list(ds)
    assert len(out) == 23
    for start in range(0, 23, 5):
        window = out[start : start + 5]
        assert sorted(window) == list(
            range(start, min(start + 5, 23))
        )  # no element leaves its window
    assert out[:5] == [int(i) for i in epoch_permutation(5, 9, 0)]
    assert out[:5] != sorted(out[:5]) or out[5:10] != sorted(out[5:10])
    it = iter(ds)
    for step in range(24):
        state = it.get_state()
        fresh = iter(ds)
        fresh.set_state(state)
        assert list(fresh) == out[step:]
        if step < 23:
            next(it)
