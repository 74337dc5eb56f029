"""The grouped-matmul api's backend choice: tokamax only for 16-bit operands on an accelerator, and the
`default_implementation` override that benchmarks use (a jit cache key, so a traced function follows it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import v4jax.model  # noqa: F401  (import order: the kernels package is reached through the model)
from v4jax.kernels.grouped_matmul import api, default_implementation, grouped_matmul


@pytest.mark.parametrize("x_dtype, backend, have, want", [
    (jnp.bfloat16, "gpu", True, "tokamax"),
    (jnp.bfloat16, "tpu", True, "tokamax"),
    (jnp.float32, "gpu", True, "xla"),  # float32 parity runs keep XLA's full-precision ragged_dot
    (jnp.bfloat16, "gpu", False, "xla"),
    (jnp.bfloat16, "cpu", True, "xla"),
])
def test_auto_implementation(x_dtype, backend, have, want):
    assert api.auto_implementation(x_dtype, x_dtype, backend, have) == want


def test_default_implementation_overrides_inside_jit():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    sizes = jnp.array([2, 3])
    f = jax.jit(lambda x: grouped_matmul(x, w, sizes))
    want = np.concatenate([np.asarray(x[:2]) @ np.asarray(w[0]), np.asarray(x[2:5]) @ np.asarray(w[1]),
                           np.zeros((1, 3))])
    np.testing.assert_allclose(f(x), want, rtol=1e-5, atol=1e-5)
    if api._tokamax_ragged_dot() is None:  # the override reaches the traced call: tokamax is asked for
        with default_implementation("tokamax"), pytest.raises(ValueError, match="tokamax is not installed"):
            f(x)
    with default_implementation("xla"):
        np.testing.assert_allclose(f(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown implementation 'cublas'"):
        with default_implementation("cublas"):
            pass
