"""Frequency-balanced hash tables: K distinct experts per token, balanced expected load, seeded ties."""

import numpy as np
import pytest

from v4jax.optim.hash_routing import build_hash_table, expert_loads, load_imbalance


def _zipf(vocab, exponent):
    return np.round(1e6 / np.arange(1, vocab + 1) ** exponent)


def test_table_shape_dtype_and_distinct_experts():
    table = build_hash_table(_zipf(500, 1.0), n_experts=16, k=4, seed=3)
    assert table.shape == (500, 4) and table.dtype == np.int32
    assert table.min() >= 0 and table.max() < 16
    ordered = np.sort(table, axis=1)
    assert np.all(ordered[:, 1:] != ordered[:, :-1])


@pytest.mark.parametrize("exponent", [0.8, 1.0, 1.2])
def test_zipfian_load_is_balanced_up_to_the_heaviest_token(exponent):
    counts = _zipf(3000, exponent)
    n_experts, k = 32, 4
    table = build_hash_table(counts, n_experts, k, unseen_weight=0.0)
    mean = counts.sum() * k / n_experts
    lower_bound = max(
        1.0, counts.max() / mean
    )  # one token's load on each of its experts
    ratio = load_imbalance(table, counts, n_experts)
    assert ratio <= lower_bound * 1.02 + 0.01, (ratio, lower_bound)
    # a seeded random table is far worse
    rng = np.random.default_rng(0)
    random_table = np.stack([rng.choice(n_experts, k, replace=False) for _ in counts])
    assert load_imbalance(random_table, counts, n_experts) > ratio


def test_loads_sum_to_k_times_tokens():
    counts = _zipf(200, 1.0)
    table = build_hash_table(counts, 8, 3)
    assert expert_loads(table, counts, 8).sum() == pytest.approx(3 * counts.sum())


def test_unseen_ids_are_spread():
    counts = np.zeros(64)
    counts[:4] = 100.0
    table = build_hash_table(counts, n_experts=8, k=2)
    assert len(np.unique(table[4:])) == 8
    assert load_imbalance(table, np.ones(64), 8) < 1.1


def test_seed_breaks_ties():
    counts = np.ones(40)
    a, b, c = (build_hash_table(counts, 8, 2, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        build_hash_table(np.ones(5), 4, 5)
    with pytest.raises(ValueError, match="token_counts"):
        build_hash_table(-np.ones(5), 4, 2)
