"""Hybrid Newton-Schulz against a float64 reference, batching, and the Muon update of Alg. 1."""

import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.optim import (
    HYBRID_NS_COEFFS,
    hybrid_muon,
    hybrid_newton_schulz,
    scale_by_hybrid_muon,
)


def _reference_ns(m):
    """float64 numpy: the same iteration, one matrix at a time."""
    m = np.asarray(m, np.float64)
    transpose = m.shape[0] > m.shape[1]
    x = m.T if transpose else m
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in HYBRID_NS_COEFFS:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transpose else x


def test_coefficient_schedule_is_the_papers():
    assert len(HYBRID_NS_COEFFS) == 10
    assert HYBRID_NS_COEFFS[:8] == ((3.4445, -4.7750, 2.0315),) * 8
    assert HYBRID_NS_COEFFS[8:] == ((2.0, -1.5, 0.5),) * 2


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_matches_float64_reference(shape):
    m = np.random.default_rng(sum(shape)).standard_normal(shape)
    got = np.asarray(hybrid_newton_schulz(jnp.asarray(m, jnp.float32)))
    np.testing.assert_allclose(got, _reference_ns(m), rtol=2e-4, atol=2e-5)


def test_singular_values_near_one():
    rng = np.random.default_rng(1)
    for shape in [(32, 48), (48, 32), (24, 24)]:
        out = np.asarray(
            hybrid_newton_schulz(jnp.asarray(rng.standard_normal(shape), jnp.float32))
        )
        s = np.linalg.svd(out, compute_uv=False)
        assert 0.9 < s.min() and s.max() < 1.1, (shape, s.min(), s.max())


def test_polar_factor_direction():
    m = np.random.default_rng(2).standard_normal((12, 20))
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    out = np.asarray(hybrid_newton_schulz(jnp.asarray(m, jnp.float32)))
    np.testing.assert_allclose(out, u @ vt, atol=5e-3)


def test_every_matrix_in_a_batch_is_orthogonalised_on_its_own():
    m = np.random.default_rng(3).standard_normal((2, 3, 5, 7)).astype(np.float32)
    m[0, 1] *= (
        100.0  # a scaled expert must not change the others (per-matrix Frobenius norm)
    )
    batched = np.asarray(hybrid_newton_schulz(jnp.asarray(m)))
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(
                batched[i, j], _reference_ns(m[i, j]), rtol=2e-4, atol=2e-5
            )


def test_bfloat16_iterations_stay_close():
    m = jnp.asarray(np.random.default_rng(4).standard_normal((16, 24)), jnp.float32)
    f32 = np.asarray(hybrid_newton_schulz(m))
    bf16 = hybrid_newton_schulz(m, compute_dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    assert np.abs(np.asarray(bf16) - f32).max() < 0.05


def test_muon_direction_follows_algorithm_1():
    mu, rms = 0.95, 0.18
    rng = np.random.default_rng(5)
    g1, g2 = (jnp.asarray(rng.standard_normal((6, 10)), jnp.float32) for _ in range(2))
    tx = scale_by_hybrid_muon(momentum=mu, update_rms=rms)
    state = tx.init({"w": g1})
    u1, state = tx.update({"w": g1}, state)
    u2, state = tx.update({"w": g2}, state)
    scale = np.sqrt(10) * rms
    np.testing.assert_allclose(
        np.asarray(u1["w"]), _reference_ns((1 + mu) * g1) * scale, rtol=1e-3, atol=1e-5
    )
    momentum = mu * np.asarray(g1) + np.asarray(g2)  # M_2 = mu M_1 + G_2
    np.testing.assert_allclose(np.asarray(state.momentum["w"]), momentum, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(u2["w"]),
        _reference_ns(mu * momentum + np.asarray(g2)) * scale,
        rtol=1e-3,
        atol=1e-5,
    )


def test_update_rms_is_rescaled_to_0_18():
    g = jnp.asarray(np.random.default_rng(6).standard_normal((3, 32, 32)), jnp.float32)
    tx = scale_by_hybrid_muon(update_rms=0.18)
    u, _ = tx.update(g, tx.init(g))
    rms = np.sqrt(np.mean(np.square(np.asarray(u)), axis=(-2, -1)))
    np.testing.assert_allclose(rms, 0.18, rtol=2e-3)


def test_weight_decay_and_learning_rate():
    w = jnp.asarray(np.random.default_rng(7).standard_normal((4, 6)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(8).standard_normal((4, 6)), jnp.float32)
    lr, wd = 0.01, 0.1
    u, _ = hybrid_muon(lr, weight_decay=wd).update(
        g, hybrid_muon(lr, weight_decay=wd).init(w), w
    )
    direction, _ = scale_by_hybrid_muon().update(g, scale_by_hybrid_muon().init(w))
    np.testing.assert_allclose(
        np.asarray(w + u),
        np.asarray(w * (1 - lr * wd) - lr * direction),
        rtol=1e-5,
        atol=1e-7,
    )


def test_rejects_vectors():
    with pytest.raises(ValueError, match="rank"):
        scale_by_hybrid_muon().init({"v": jnp.zeros(3)})
