"""Aux-loss-free bias update (direction, re-centring, hash rows) and the sequence-wise balance loss."""

import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.optim.router_bias import sequence_balance_loss, update_router_bias


def test_bias_moves_towards_balance_and_is_recentred():
    bias = jnp.zeros((2, 5))
    load = jnp.asarray([[40.0, 10, 10, 10, 10], [1, 2, 3, 4, 5]])
    new = np.asarray(update_router_bias(bias, load, speed=0.001))
    # overloaded experts go down relative to underloaded ones
    assert new[0, 0] < new[0, 1] and new[1, 0] > new[1, 4]
    np.testing.assert_allclose(new.mean(axis=-1), 0.0, atol=1e-9)
    # exact rule: +/- speed by sign(mean - load), minus the row mean
    step = 0.001 * np.sign(np.asarray(load).mean(-1, keepdims=True) - np.asarray(load))
    np.testing.assert_allclose(new, step - step.mean(-1, keepdims=True), atol=1e-9)
    assert new[0, 1] == pytest.approx(0.001 - (-0.001 + 4 * 0.001) / 5)


def test_hash_rows_unchanged_and_balanced_rows_stay_put():
    bias = jnp.asarray([[0.3, -0.1, -0.2], [0.05, 0.0, -0.05]])
    load = jnp.asarray([[9.0, 1, 2], [4.0, 4, 4]])
    new = np.asarray(
        update_router_bias(bias, load, 0.01, learned_mask=jnp.asarray([False, True]))
    )
    np.testing.assert_array_equal(new[0], np.asarray(bias[0]))
    np.testing.assert_allclose(
        new[1], np.asarray(bias[1]), atol=1e-9
    )  # equal loads: no push; already centred


def test_repeated_updates_flatten_a_skewed_preference():
    """Simulate routing by argmax-top-1 of (affinity + bias): the bias must spread the load."""
    rng = np.random.default_rng(0)
    affinity = rng.standard_normal((2000, 4)) * 0.01 + np.asarray(
        [0.03, 0.0, 0.0, -0.03]
    )
    bias = jnp.zeros((1, 4))
    for _ in range(200):
        choice = np.argmax(affinity + np.asarray(bias)[0], axis=-1)
        load = np.bincount(choice, minlength=4)[None].astype(np.float32)
        bias = update_router_bias(bias, jnp.asarray(load), speed=0.001)
    assert load.max() / load.mean() < 1.3


def _loss_loop(scores, indices, mask):
    """Direct per-sequence loops of spec §5.3."""
    b, s, e = scores.shape
    k = indices.shape[-1]
    total, n = 0.0, 0
    for i in range(b):
        tokens = [t for t in range(s) if mask[i, t]]
        if not tokens:
            continue
        f = np.zeros(e)
        p = np.zeros(e)
        for t in tokens:
            for j in indices[i, t]:
                f[j] += 1
            p += scores[i, t] / scores[i, t].sum()
        f *= e / (k * len(tokens))
        p /= len(tokens)
        total += (f * p).sum()
        n += 1
    return total / n


def test_balance_loss_matches_the_formula_and_ignores_padding():
    rng = np.random.default_rng(1)
    b, s, e, k = 3, 7, 6, 2
    scores = np.sqrt(np.log1p(np.exp(rng.standard_normal((b, s, e)))))
    indices = np.stack(
        [
            np.stack([rng.choice(e, k, replace=False) for _ in range(s)])
            for _ in range(b)
        ]
    )
    mask = np.ones((b, s), bool)
    mask[1, 4:] = False
    mask[2, :] = False  # an all-padding sequence is left out of the average
    got = float(
        sequence_balance_loss(
            jnp.asarray(scores), jnp.asarray(indices), jnp.asarray(mask)
        )
    )
    assert got == pytest.approx(_loss_loop(scores, indices, mask), rel=1e-5)
    scores2 = scores.copy()
    scores2[1, 5] *= 10.0
    indices2 = indices.copy()
    indices2[2] = 0
    again = float(
        sequence_balance_loss(
            jnp.asarray(scores2), jnp.asarray(indices2), jnp.asarray(mask)
        )
    )
    assert again == pytest.approx(got, rel=1e-6)


def test_balance_loss_is_one_when_perfectly_balanced():
    e = 4
    indices = jnp.asarray([[[0, 1], [2, 3]]])  # each expert chosen once in 2 tokens
    scores = jnp.ones((1, 2, e))
    assert float(sequence_balance_loss(scores, indices, None)) == pytest.approx(1.0)
    skewed = jnp.asarray([[[0, 1], [0, 1]]])
    peaked = jnp.asarray([[[5.0, 5.0, 0.1, 0.1]] * 2])
    assert float(sequence_balance_loss(peaked, skewed, None)) > 1.5
