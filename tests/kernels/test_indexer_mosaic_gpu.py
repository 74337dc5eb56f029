"""The indexer's Mosaic GPU score kernel: in the Mosaic GPU interpreter (which simulates TMA, barriers and
wgmma on CPU and fills buffers with NaN first) against the float64 oracle and the Triton backend, and
lowered for CUDA without a GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_indexer_oracle as oracle

from v4jax.kernels import indexer
from v4jax.kernels.indexer import api, mosaic_gpu, triton


def _inputs(seed, b=2, s=256, h=2, d=64, n=None):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  n = s // 4 if n is None else n
  q = jax.random.normal(k1, (b, s, h, d), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(k2, (b, s, h), jnp.float32)
  k = jax.random.normal(k3, (b, n, d), jnp.float32).astype(jnp.bfloat16)
  return q, w, k


def test_matches_oracle_with_segments_short_rows_and_padding():
  q, w, k = _inputs(np.random.randint(1 << 30), n=58)  # N < S / 4: the last entries are missing
  seg = np.zeros((2, 256), np.int32)
  seg[0, 100:] = 1
  seg[1, 170:] = 1
  seg = jnp.asarray(seg)
  topk = 12  # the first rows see fewer: -1 padding
  idx, vals = mosaic_gpu.indexer_topk(q, w, k, topk, 4, segment_ids=seg, interpret=True, chunk=128)
  kseg = jnp.take(seg, 4 * jnp.arange(58) + 3, axis=1)
  ref = oracle.scores_f64(q.astype(jnp.float32), w, k.astype(jnp.float32), 4, seg, kseg)
  idx, vals = np.asarray(idx), np.asarray(vals)
  assert oracle.recall(idx, oracle.topk_sets(ref, topk)) == 1.0
  np.testing.assert_array_equal((idx >= 0).sum(-1), np.vectorize(len)(oracle.topk_sets(ref, topk)))
  assert np.all(vals[idx < 0] == -np.inf) and not np.isnan(vals).any()
  picked = np.take_along_axis(ref, np.maximum(idx, 0), axis=-1)
  np.testing.assert_allclose(vals[idx >= 0], picked[idx >= 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_quant_modes_select_what_triton_selects(quant):
  q, w, k = _inputs(np.random.randint(1 << 30), b=1)
  got = mosaic_gpu.indexer_topk(q, w, k, 10, 4, quant=quant, interpret=True, chunk=128)
  ref = triton.indexer_topk(q, w, k, 10, 4, quant=quant, interpret=True, chunk=128, operands="bf16")
  assert oracle.recall(np.asarray(got[0]), _sets(ref[0])) >= 0.99  # fp32 sums in another order
  np.testing.assert_allclose(np.sort(np.asarray(got[1]), -1), np.sort(np.asarray(ref[1]), -1),
                             rtol=1e-5, atol=1e-5)


def _sets(idx):
  idx = np.asarray(idx)
  out = np.empty(idx.shape[:2], dtype=object)
  for i in range(idx.shape[0]):
    for t in range(idx.shape[1]):
      out[i, t] = {int(j) for j in idx[i, t] if j >= 0}
  return out


def test_api_routes_mosaic_gpu_and_bf16_scores():
  q, w, k = _inputs(np.random.randint(1 << 30), b=1, s=128)
  idx, vals = indexer.indexer_topk(q, w, k, 8, 4, implementation="mosaic_gpu", interpret=True,
                                   score_dtype=jnp.bfloat16)
  ref_idx, _ = indexer.indexer_topk(q, w, k, 8, 4, implementation="triton", interpret=True,
                                    score_dtype=jnp.bfloat16)
  assert oracle.recall(np.asarray(idx), _sets(ref_idx)) >= 0.99
  v = np.asarray(vals)
  assert np.array_equal(v[np.isfinite(v)].astype(jnp.bfloat16).astype(np.float32), v[np.isfinite(v)])
  assert api._pick("mosaic_gpu", "gpu", False, 64, 128) == "mosaic_gpu"
  with pytest.warns(UserWarning, match="mosaic_gpu needs"):
    assert api._pick("mosaic_gpu", "gpu", False, 64, 32) == "triton"


def test_rejects_head_dim_not_a_multiple_of_64():
  q, w, k = _inputs(0, b=1, s=128, d=32)
  with pytest.raises(ValueError, match="D=32 must be a multiple of 64"):
    mosaic_gpu.indexer_topk(q, w, k, 8, 4, interpret=True)


@pytest.mark.parametrize("score_dtype", [jnp.float32, jnp.bfloat16])
def test_score_kernel_lowers_for_cuda_without_a_gpu(score_dtype):
  b, c, h, d, n = 1, 128, 4, 128, 256
  shapes = [((1,), jnp.int32), ((b, c, h, d), jnp.bfloat16), ((b, c, h), jnp.float32),
            ((b, n, d), jnp.bfloat16), ((b, n), jnp.float32), ((b, c), jnp.int32), ((b, n), jnp.int32),
            ((b, n), jnp.int32)]
  args = [jax.ShapeDtypeStruct(s, t) for s, t in shapes]
  f = lambda *a: mosaic_gpu.scores_call(*a, ratio=4, n_valid=n, interpret=False, score_dtype=score_dtype)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert set(re.findall(r"custom_call @([\w$.]+)", text)) == {"mosaic_gpu_v2"}
  assert "wgmma" in text and "tma" in text


def test_several_key_tiles_skipped_tiles_and_entry_ends_match_oracle():
  """S = 1024, N = 256: score rows 256 wide (two key tiles, the second skipped by early query blocks), D = 128,
  4 heads (the head pipeline reuses its buffers), entries that open late (entry_end), default chunk."""
  q, w, k = _inputs(np.random.randint(1 << 30), b=1, s=1024, h=4, d=128)
  ends = np.asarray(4 * np.arange(256) + 3, np.int32)
  ends[::7] += 40  # every 7th entry becomes visible 40 queries late
  entry_end = jnp.asarray(ends)[None]
  topk = 16
  idx, vals = mosaic_gpu.indexer_topk(q, w, k, topk, 4, entry_end=entry_end, interpret=True)
  ref = oracle.scores_f64(q.astype(jnp.float32), w, k.astype(jnp.float32), 4)
  t = np.arange(1024)[:, None]
  ref = np.where((ends[None, :] <= t)[None], ref, -np.inf)
  idx, vals = np.asarray(idx), np.asarray(vals)
  assert oracle.recall(idx, oracle.topk_sets(ref, topk)) >= 0.999  # fp32 near-ties may flip a pick
  assert not np.isnan(vals).any() and np.all(vals[idx < 0] == -np.inf)
  picked = np.take_along_axis(ref, np.maximum(idx, 0), axis=-1)
  np.testing.assert_allclose(vals[idx >= 0], picked[idx >= 0], rtol=1e-5, atol=1e-4)


def test_float32_inputs_warn_that_qk_runs_in_bf16():
  q, w, k = _inputs(0, b=1, s=128)
  with pytest.warns(UserWarning, match="rounded to bf16"):
    mosaic_gpu.indexer_topk(q.astype(jnp.float32), w, k.astype(jnp.float32), 8, 4, interpret=True)
