"""Lightning indexer: the XLA reference against a float64 oracle, input checks and dispatch."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_indexer_oracle as oracle

from v4jax.kernels import indexer
from v4jax.kernels.indexer import api, quantize, reference


def _inputs(seed, b=2, s=48, h=3, d=32, n=None, ratio=4):
  n = s // ratio if n is None else n
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(k1, (b, s, h, d), jnp.float32)
  w = jax.random.normal(k2, (b, s, h), jnp.float32)
  k = jax.random.normal(k3, (b, n, d), jnp.float32)
  return q, w, k


def _segments(b, s, seed):
  """Random packing: 2-3 documents per row."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((b, s), np.int32)
  for i in range(b):
    for cut in sorted(rng.choice(np.arange(5, s - 5), size=2, replace=False)):
      seg[i, cut:] += 1
  return jnp.asarray(seg)


@pytest.mark.parametrize("topk", [5, 20])
def test_reference_matches_float64_oracle(topk):
  seed = np.random.randint(1 << 30)
  q, w, k = _inputs(seed)
  idx, vals = reference.indexer_topk(q, w, k, topk, 4, chunk=16)
  sc = oracle.scores_f64(q, w, k, 4)
  sets = oracle.topk_sets(sc, topk)
  assert oracle.recall(idx, sets) == 1.0
  idx, vals = np.asarray(idx), np.asarray(vals)
  # scores belong to their indices; -1 exactly where fewer than topk entries are visible
  picked = np.take_along_axis(sc, np.maximum(idx, 0), axis=-1)
  np.testing.assert_allclose(vals[idx >= 0], picked[idx >= 0], rtol=1e-5, atol=1e-5)
  visible = np.minimum((np.arange(q.shape[1]) + 1) // 4, k.shape[1])
  np.testing.assert_array_equal((idx == -1).sum(-1), np.maximum(0, topk - visible)[None, :].repeat(2, 0))
  assert np.all(vals[idx == -1] == -np.inf)


def test_reference_segments_and_entry_segment_derivation():
  seed = np.random.randint(1 << 30)
  q, w, k = _inputs(seed, s=64)
  qseg = _segments(2, 64, seed)
  kseg = jnp.take(qseg, 4 * jnp.arange(16) + 3, axis=1)
  idx, _ = reference.indexer_topk(q, w, k, 6, 4, segment_ids=qseg)
  idx2, _ = reference.indexer_topk(q, w, k, 6, 4, segment_ids=(qseg, kseg))
  np.testing.assert_array_equal(idx, idx2)
  sets = oracle.topk_sets(oracle.scores_f64(q, w, k, 4, qseg, kseg), 6)
  assert oracle.recall(idx, sets) == 1.0
  # no pick crosses a document boundary
  idx = np.asarray(idx)
  same = np.take_along_axis(np.asarray(kseg)[:, None, :].repeat(64, 1), np.maximum(idx, 0), -1)
  assert np.all((idx < 0) | (same == np.asarray(qseg)[:, :, None]))


def test_sequence_shorter_than_one_window_is_all_invalid():
  q, w, k = _inputs(0, b=1, s=3, n=1)
  idx, vals = indexer.indexer_topk(q, w, k, 4, 4)
  assert np.all(np.asarray(idx) == -1) and np.all(np.asarray(vals) == -np.inf)


@pytest.mark.parametrize("quant,min_recall", [("fp8", 0.85), ("mxfp4", 0.6)])
def test_reference_quant_modes_recall(quant, min_recall):
  seed = np.random.randint(1 << 30)
  q, w, k = _inputs(seed, s=96, d=64)
  idx, _ = reference.indexer_topk(q, w, k, 8, 4, quant=quant)
  idx0, _ = reference.indexer_topk(q, w, k, 8, 4)
  sets = oracle.topk_sets(oracle.scores_f64(q, w, k, 4), 8)
  r = oracle.recall(idx, sets)
  assert min_recall <= r
  # the quantized selection follows its own (fake-quantised) scores exactly
  qf, kf = quantize.fake_quant_qk(q, k, quant)
  assert oracle.recall(idx, oracle.topk_sets(oracle.scores_f64(qf, w, kf, 4), 8)) == 1.0
  assert oracle.recall(idx0, sets) == 1.0


def test_kernel_operand_rows_reproduce_fake_quant_values():
  x = jax.random.normal(jax.random.PRNGKey(np.random.randint(1 << 30)), (3, 5, 64)) * 4
  for quant in ("fp8", "mxfp4"):
    fq, _ = quantize.fake_quant_qk(x, x[0], quant)
    q8, scale = quantize.quantize_rows(x, quant)
    assert q8.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(q8.astype(jnp.float32) * scale[..., None]), np.asarray(fq))
    assert float(jnp.abs(fq - (x if quant == "fp8" else quantize._rotate(x))).max()) > 0


@pytest.mark.parametrize("bad", [
    {"w_shape": (1, 8, 3)}, {"topk": 0}, {"ratio": 0}, {"quant": "int4"},
    {"implementation": "cuda"}, {"k_shape": (1, 2, 16)}])
def test_bad_inputs_raise_one_line_value_error(bad):
  q, w, k = _inputs(0, b=1, s=8, h=2, d=32)
  w = jnp.zeros(bad.get("w_shape", w.shape))
  k = jnp.zeros(bad.get("k_shape", k.shape))
  with pytest.raises(ValueError) as err:
    indexer.indexer_topk(q, w, k, bad.get("topk", 2), bad.get("ratio", 4), quant=bad.get("quant"),
                         implementation=bad.get("implementation"))
  assert "\n" not in str(err.value)


def test_dispatch_picks_platform_default_and_falls_back_with_a_warning():
  assert api._pick(None, "gpu", False, 64, 128) == "triton"
  assert api._pick(None, "gpu", False, 3, 128) == "xla"
  assert api._pick(None, "tpu", False, 64, 128) == "mosaic_tpu"
  assert api._pick(None, "cpu", False, 64, 128) == "xla"
  assert api._pick("triton", "cpu", True, 64, 128) == "triton"
  for impl in ("mosaic_gpu", "triton", "mosaic_tpu"):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      assert api._pick(impl, "cpu", False, 64, 128) == "xla"
    assert caught and impl in str(caught[0].message)
