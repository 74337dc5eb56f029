"""The fused Triton QK quantizer (interpret mode) against the XLA quantizer: the same E4M3 bytes for fp8, the
same values for mxfp4 (an exact zero's sign may differ, see quantize_triton), on random rows of many scales
and on structured rows (zero, -0, constant, Hadamard rows, a zero 32-block beside a large one), for bf16 and
fp32 inputs, several D and row counts that need padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import quant as vq
from v4jax.kernels.indexer import quantize, quantize_triton, triton


RANDOM_ROWS = 37  # the first rows of `_rows`; structured ones follow


def _rows(seed, d, dtype):
  rng = np.random.default_rng(seed)
  mags = 2.0 ** rng.integers(-20, 21, size=(RANDOM_ROWS, 1))
  random = rng.normal(size=(RANDOM_ROWS, d)) * mags
  h = quantize_triton.sylvester_hadamard(d)
  zero_block = rng.normal(size=(1, d)) * 1e3
  zero_block[0, : min(32, d)] = 0.0  # (for d = 32 the whole row is zero)
  structured = np.concatenate([
      np.zeros((1, d)), -np.zeros((1, d)),  # all +0, all -0
      np.full((1, d), 2.0), np.full((1, d), -10.0), np.full((1, d), 3e-30),  # constant rows
      100.0 * h[1:3], zero_block,
      np.eye(d)[:2] * 7.0,  # one-hot rows
  ])
  x = np.concatenate([random, structured]).astype(np.float32)
  return jnp.asarray(x.reshape(1, -1, d)).astype(dtype)


def _on_e2m1_knife_edge(x, rel=2.0**-16):
  """bool [1, R, D]: rotated elements within `rel` (relative) of a midpoint between two E2M1 codes, in units
  of their 32-block's scale. The two quantizers rotate in different float32 summation orders (a matrix
  product vs XLA's butterfly), so for float32 input such an element may round to either neighbour, both
  correctly; about 1e-4 of random elements, 0.2-0.4% of runs of 37 random rows at D = 128, 256."""
  xr = np.abs(np.asarray(quantize._rotate(x), np.float64))  # [1, R, D]
  block_scale = np.repeat(np.asarray(vq.effective_scales(vq.quantize(quantize._rotate(x), "mxfp4"))), 32, -1)
  t = xr / block_scale
  mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
  return np.min(np.abs(t[..., None] - mids), axis=-1) <= rel * t


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("d", [32, 128, 256])
def test_fused_quantizer_matches_xla(quant, dtype, d):
  x = _rows(np.random.randint(1 << 30), d, dtype)
  ref_v, ref_s = quantize.quantize_rows(x, quant)
  ref_bytes = np.asarray(ref_v).view(np.uint8)
  may_differ = np.zeros(x.shape, bool)  # exact equality, except float32 mxfp4 on a knife edge (random rows)
  if quant == "mxfp4" and dtype == jnp.float32:
    may_differ[:, :RANDOM_ROWS] = _on_e2m1_knife_edge(x)[:, :RANDOM_ROWS]  # structured rows test the tie rule
  for out_dtype in (jnp.float8_e4m3fn, jnp.bfloat16):
    v, s = quantize_triton.quantize_rows(x, quant, out_dtype, interpret=True)
    assert v.dtype == out_dtype and v.shape == x.shape and s.shape == x.shape[:-1]
    vals = np.asarray(v.astype(jnp.float32))
    assert not np.isnan(vals).any()
    same = vals == np.asarray(ref_v, np.float32)  # values (+0 == -0)
    assert np.all(same | may_differ), np.argwhere(~(same | may_differ))[:5]
    np.testing.assert_array_equal(np.asarray(s), np.asarray(ref_s))
    if out_dtype == jnp.float8_e4m3fn:
      got_bytes = np.asarray(v).view(np.uint8)
      differ = (got_bytes != ref_bytes) & same
      if quant == "fp8":
        assert not differ.any()  # bit for bit
      else:  # only the sign of exact zeros may differ
        assert np.all((got_bytes[differ] | ref_bytes[differ]) == 0x80)


def test_sylvester_matrix_is_the_butterfly():
  x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
  h = quantize_triton.sylvester_hadamard(64)
  np.testing.assert_allclose(x @ h / 8.0, np.asarray(vq.hadamard(jnp.asarray(x))), rtol=1e-5, atol=1e-5)


def test_fused_quantizer_rejects_bad_input():
  with pytest.raises(ValueError, match="quant must be"):
    quantize_triton.quantize_rows(jnp.ones((4, 128)), "nvfp4", interpret=True)
  for d in (96, 0):
    with pytest.raises(ValueError, match="power of two"):
      quantize_triton.quantize_rows(jnp.ones((4, d)), "fp8", interpret=True)
  with pytest.raises(ValueError, match=">= 32 for mxfp4"):
    quantize_triton.quantize_rows(jnp.ones((4, 16)), "mxfp4", interpret=True)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_indexer_selects_the_same_with_either_quantizer(quant):
  """Integer-valued q and k: their Hadamard sums are exact in any order, so both quantizers see the same
  rotated values (with normal floats, 0.5% of runs put an element on an E2M1 knife edge; see above)."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(np.random.randint(1 << 30)), 3)
  q = jax.random.randint(k1, (1, 64, 2, 64), -8, 9).astype(jnp.float32)
  w = jax.random.normal(k2, (1, 64, 2), jnp.float32)
  k = jax.random.randint(k3, (1, 16, 64), -8, 9).astype(jnp.float32)
  small = {"interpret": True, "block_q": 16, "block_k": 16, "chunk": 32, "select_elems": 64}
  a = triton.indexer_topk(q, w, k, 5, 4, quant=quant, quantizer="triton", **small)
  b = triton.indexer_topk(q, w, k, 5, 4, quant=quant, quantizer="xla", **small)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fused_quantizer_lowers_for_cuda(quant, dtype, fake_hopper):
  """Every op of both kernels has a Pallas-Triton lowering (interpret mode runs them as XLA ops instead)."""
  x = jax.ShapeDtypeStruct((256, 128), dtype)
  for out_dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
    f = lambda a, o=out_dtype: quantize_triton.quantize_rows(a, quant, o)
    text = jax.jit(f).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and f"indexer_quantize_{quant}" in text
