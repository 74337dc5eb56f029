"""hadamard: equals x @ H_n / sqrt(n) for the Sylvester matrix, is orthonormal and its own inverse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import quant


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1, 1], [1, -1]]), h)
    return h


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_matches_dense_sylvester_matrix(n):
    x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
    want = x.astype(np.float64) @ _sylvester(n) / np.sqrt(n)
    np.testing.assert_allclose(np.asarray(quant.hadamard(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_orthonormal_involution_preserves_scores():
    q, k = jax.random.normal(jax.random.key(0), (2, 4, 128))
    hq, hk = quant.hadamard(q), quant.hadamard(k)
    np.testing.assert_allclose(np.asarray(quant.hadamard(hq)), np.asarray(q), atol=1e-5)
    scores = jnp.einsum("id,jd->ij", q, k)  # [4, 4]
    np.testing.assert_allclose(np.asarray(jnp.einsum("id,jd->ij", hq, hk)), np.asarray(scores), atol=1e-4)


def test_spreads_an_outlier():
    x = jnp.zeros((128,)).at[7].set(1.0)
    y = np.asarray(quant.hadamard(x))
    np.testing.assert_allclose(np.abs(y), 128**-0.5, rtol=1e-6)


def test_keeps_dtype_and_rejects_non_power_of_two():
    assert quant.hadamard(jnp.ones((2, 16), jnp.bfloat16)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="not a power of two"):
        quant.hadamard(jnp.ones((2, 96)))
