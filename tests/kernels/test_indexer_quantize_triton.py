"""The fused Triton QK quantizer (interpret mode) gives the XLA quantizer's numbers bit for bit, on fresh
random rows of several scales, for both modes, bf16 and fp32 inputs, and row counts that need padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.kernels.indexer import quantize, quantize_triton, triton


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fused_quantizer_matches_xla_bit_for_bit(quant, dtype):
  key = jax.random.PRNGKey(np.random.randint(1 << 30))
  k1, k2 = jax.random.split(key)
  # rows of very different magnitudes (per-row scales over 2^-20 .. 2^20), 3 x 37 rows: not a block multiple
  mags = 2.0 ** jax.random.randint(k2, (3, 37, 1), -20, 21).astype(jnp.float32)
  x = (jax.random.normal(k1, (3, 37, 128), jnp.float32) * mags).astype(dtype)
  ref_v, ref_s = quantize.quantize_rows(x, quant)
  for out_dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
    v, s = quantize_triton.quantize_rows(x, quant, out_dtype, interpret=True)
    assert v.dtype == out_dtype and v.shape == x.shape and s.shape == x.shape[:-1]
    np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(ref_v, np.float32))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(ref_s))


def test_sylvester_matrix_is_the_butterfly():
  from v4jax import quant as vq
  x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
  h = quantize_triton.sylvester_hadamard(64)
  np.testing.assert_allclose(x @ h / 8.0, np.asarray(vq.hadamard(jnp.asarray(x))), rtol=1e-5, atol=1e-5)


def test_fused_quantizer_rejects_bad_input():
  with pytest.raises(ValueError, match="quant must be"):
    quantize_triton.quantize_rows(jnp.ones((4, 128)), "nvfp4", interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    quantize_triton.quantize_rows(jnp.ones((4, 96)), "fp8", interpret=True)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_indexer_selects_the_same_with_either_quantizer(quant):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(np.random.randint(1 << 30)), 3)
  q = jax.random.normal(k1, (1, 64, 2, 64), jnp.float32)
  w = jax.random.normal(k2, (1, 64, 2), jnp.float32)
  k = jax.random.normal(k3, (1, 16, 64), jnp.float32)
  small = {"interpret": True, "block_q": 16, "block_k": 16, "chunk": 32, "select_elems": 64}
  a = triton.indexer_topk(q, w, k, 5, 4, quant=quant, quantizer="triton", **small)
  b = triton.indexer_topk(q, w, k, 5, 4, quant=quant, quantizer="xla", **small)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
