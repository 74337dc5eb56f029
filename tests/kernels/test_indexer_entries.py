"""Lightning indexer with per-entry visibility (`entry_end` + entry segments), the form the model's CSA
layers use: entries compacted per document, visible to query t iff valid, end <= t and same document.
Every backend (xla; triton and mosaic_tpu in interpret mode) against a float64 oracle masked with the
model's own `entry_visibility`, on fresh random packings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_indexer_oracle as oracle

from v4jax.kernels import indexer
from v4jax.model.compressor import Entries, doc_positions, entry_visibility, window_ends

SMALL = {"triton": {"block_q": 16, "block_k": 16, "chunk": 32, "select_elems": 64},
         "mosaic_tpu": {"block_q": 16, "block_k": 16, "chunk": 32}, "xla": {"chunk": 16}}


def _packing(rng, b, s):
  """Random packed rows: documents of 1..20 tokens (some shorter than a window), sometimes a padded
  tail (segment 0, which compresses to nothing)."""
  seg = np.zeros((b, s), np.int32)
  for i in range(b):
    t, doc = 0, 1
    end = s - int(rng.integers(0, 8)) * int(rng.random() < 0.5)
    while t < end:
      n = int(rng.integers(1, 21))
      seg[i, t:min(t + n, end)] = doc
      t, doc = t + n, doc + 1
  return jnp.asarray(seg)


def _entries(seg, ratio, k):
  """The compressor's compacted entries of a packing (values k) and the kernel api's per-entry form."""
  end, valid = window_ends(seg, doc_positions(seg), ratio)
  entries = Entries(k, end, jnp.take_along_axis(seg, end, 1), valid)
  api_end = jnp.where(valid, end, seg.shape[1])  # unused slots: an end past the sequence
  return entries, api_end


def test_compacted_entry_ends_respect_the_ratio_bound():
  """end[i] >= ratio * (i + 1) - 1 for every valid compacted entry: the kernels' tile skip
  (s < (t + 1) // ratio) never skips a visible entry."""
  rng = np.random.default_rng(np.random.randint(1 << 30))
  for ratio in (2, 4, 8):
    seg = _packing(rng, 64, 96)
    end, valid = window_ends(seg, doc_positions(seg), ratio)
    end, valid = np.asarray(end), np.asarray(valid)
    bound = ratio * (np.arange(end.shape[1]) + 1) - 1
    assert valid.any() and np.all(end[valid] >= np.broadcast_to(bound, end.shape)[valid])
    # and it is tight somewhere (a single long document reaches it)
    assert np.any(end[valid] == np.broadcast_to(bound, end.shape)[valid])


@pytest.mark.parametrize("impl", ["xla", "triton", "mosaic_tpu"])
def test_entry_end_gives_exactly_the_models_visibility(impl):
  seed = np.random.randint(1 << 30)
  rng = np.random.default_rng(seed)
  b, s, h, d, ratio, topk = 2, 64, 2, 32, 4, 5
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(k1, (b, s, h, d), jnp.float32)
  w = jax.random.normal(k2, (b, s, h), jnp.float32)
  k = jax.random.normal(k3, (b, s // ratio, d), jnp.float32)
  seg = _packing(rng, b, s)
  entries, end = _entries(seg, ratio, k)
  vis = np.asarray(entry_visibility(entries, seg))  # [B, S, N]
  idx, vals = indexer.indexer_topk(q, w, k, topk, ratio, (seg, entries.segment), implementation=impl,
                                   interpret=impl != "xla", entry_end=end)
  sc = np.where(vis, oracle.scores_f64(q, w, k, 1), -np.inf)  # visible => end >= s + 1 > s: unmasked
  assert oracle.recall(idx, oracle.topk_sets(sc, topk)) == 1.0
  idx, vals = np.asarray(idx), np.asarray(vals)
  np.testing.assert_array_equal((idx >= 0).sum(-1), np.minimum(vis.sum(-1), topk))
  assert np.all(vals[idx < 0] == -np.inf)
  picked = np.take_along_axis(sc, np.maximum(idx, 0), -1)
  np.testing.assert_allclose(vals[idx >= 0], picked[idx >= 0], rtol=1e-5, atol=1e-5)


def test_entry_end_shape_is_checked():
  q, w, k = jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2)), jnp.zeros((1, 2, 16))
  with pytest.raises(ValueError, match="entry_end") as err:
    indexer.indexer_topk(q, w, k, 2, 4, entry_end=jnp.zeros((1, 3), jnp.int32))
  assert "\n" not in str(err.value)
  with pytest.raises(ValueError, match="score_dtype"):
    indexer.indexer_topk(q, w, k, 2, 4, score_dtype=jnp.float16)


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_bf16_scores_follow_the_reference(impl):
  """score_dtype=bf16: the top-k sees bf16-rounded scores (many ties, broken by lower index)."""
  seed = np.random.randint(1 << 30)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(k1, (1, 64, 2, 32), jnp.float32)
  w = jax.random.normal(k2, (1, 64, 2), jnp.float32)
  k = jax.random.normal(k3, (1, 16, 32), jnp.float32)
  ridx, rvals = indexer.indexer_topk(q, w, k, 6, 4, implementation="xla", score_dtype=jnp.bfloat16)
  idx, vals = indexer.indexer_topk(q, w, k, 6, 4, implementation=impl, interpret=True,
                                   score_dtype=jnp.bfloat16)
  vals = np.asarray(vals)
  np.testing.assert_array_equal(vals, vals.astype(jnp.bfloat16).astype(np.float32))
  sets = np.empty(ridx.shape[:2], object)
  for t in range(ridx.shape[1]):
    sets[0, t] = {int(j) for j in np.asarray(ridx[0, t]) if j >= 0}
  # equal up to fp32 summation-order differences that move a value across a bf16 rounding boundary
  assert oracle.recall(idx, sets) >= 0.98
  np.testing.assert_allclose(np.sort(vals, -1), np.sort(np.asarray(rvals), -1), rtol=1e-2)
