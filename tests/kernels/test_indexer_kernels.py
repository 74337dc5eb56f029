"""Lightning indexer Pallas backends (Triton, Mosaic TPU) in interpret mode on the CPU, against the
XLA reference and the float64 oracle, on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_indexer_oracle as oracle

from v4jax.kernels import indexer
from v4jax.kernels.indexer import mosaic_tpu, quantize, reference, triton

# Small tiles so that a 64-query sequence spans several chunks, width groups and key tiles.
TRITON_SMALL = {"interpret": True, "block_q": 16, "block_k": 16, "chunk": 32, "select_elems": 64}


def _inputs(seed, b=1, s=64, h=2, d=32, n=None, ratio=4, dtype=jnp.float32):
  n = s // ratio if n is None else n
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(k1, (b, s, h, d), jnp.float32).astype(dtype)
  w = jax.random.normal(k2, (b, s, h), jnp.float32)
  k = jax.random.normal(k3, (b, n, d), jnp.float32).astype(dtype)
  return q, w, k


def _assert_same_scores(vals, ref):
  """Scores of the same picks summed in another order (dot kind, heads per step): the head sum can
  nearly cancel (w may be negative), so compare within 1e-6 of the largest score, not of each."""
  vals, ref = np.asarray(vals), np.asarray(ref)
  scale = np.abs(ref[np.isfinite(ref)]).max()
  np.testing.assert_allclose(vals, ref, rtol=1e-5, atol=1e-6 * scale)


def _check_rows(idx, vals, scores_f64, topk, rtol):
  """Sets equal to the oracle's, scores belong to idx, -1 / -inf fill exactly the unused slots."""
  idx, vals = np.asarray(idx), np.asarray(vals)
  sets = oracle.topk_sets(scores_f64, topk)
  assert oracle.recall(idx, sets) == 1.0
  n_sel = np.vectorize(len)(sets)
  np.testing.assert_array_equal((idx >= 0).sum(-1), n_sel)
  assert np.all(vals[idx < 0] == -np.inf) and not np.isnan(vals).any()
  picked = np.take_along_axis(scores_f64, np.maximum(idx, 0), axis=-1)
  np.testing.assert_allclose(vals[idx >= 0], picked[idx >= 0], rtol=rtol, atol=rtol)
  for row in idx.reshape(-1, idx.shape[-1]):  # no entry picked twice
    assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum())


def test_triton_matches_oracle_with_segments_and_short_rows():
  seed = np.random.randint(1 << 30)
  q, w, k = _inputs(seed, b=2, n=14)  # N < S / ratio: the last entries are missing
  seg = np.zeros((2, 64), np.int32)
  seg[0, 23:] = 1
  seg[1, 40:] = 1
  seg = jnp.asarray(seg)
  kseg = jnp.take(seg, 4 * jnp.arange(14) + 3, axis=1)
  topk = 6  # early rows see fewer than 6 entries: -1 padding
  idx, vals = triton.indexer_topk(q, w, k, topk, 4, segment_ids=seg, **TRITON_SMALL)
  _check_rows(idx, vals, oracle.scores_f64(q, w, k, 4, seg, kseg), topk, 1e-5)


def test_triton_topk_larger_than_all_entries_and_non_power_of_two():
  q, w, k = _inputs(np.random.randint(1 << 30), n=16)
  idx, vals = triton.indexer_topk(q, w, k, 20, 4, **TRITON_SMALL)
  assert idx.shape == (1, 64, 20)
  _check_rows(idx, vals, oracle.scores_f64(q, w, k, 4), 20, 1e-5)


def test_triton_sequence_shorter_than_one_window():
  q, w, k = _inputs(np.random.randint(1 << 30), s=3, n=1)
  idx, vals = indexer.indexer_topk(q, w, k, 4, 4, implementation="triton", interpret=True)
  assert np.all(np.asarray(idx) == -1) and np.all(np.asarray(vals) == -np.inf)


def test_triton_ties_are_broken_by_lower_index():
  q, w, k = _inputs(np.random.randint(1 << 30))
  k = jnp.concatenate([k[:, :4]] * 4, axis=1)  # entries j and j + 4 score exactly the same
  idx, vals = triton.indexer_topk(q, w, k, 6, 4, **TRITON_SMALL)
  _check_rows(idx, vals, oracle.scores_f64(q, w, k, 4), 6, 1e-5)


def test_triton_bf16_inputs_within_bf16_band():
  q, w, k = _inputs(np.random.randint(1 << 30), dtype=jnp.bfloat16)
  idx, vals = triton.indexer_topk(q, w, k, 5, 4, **TRITON_SMALL)
  sc = oracle.scores_f64(q.astype(jnp.float32), w, k.astype(jnp.float32), 4)
  _check_rows(idx, vals, sc, 5, 1e-2)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_triton_quant_modes_follow_their_quantized_scores(quant):
  q, w, k = _inputs(np.random.randint(1 << 30), d=64)
  idx, _vals = triton.indexer_topk(q, w, k, 5, 4, quant=quant, **TRITON_SMALL)
  qf, kf = quantize.fake_quant_qk(q, k, quant)
  sets_q = oracle.topk_sets(oracle.scores_f64(qf, w, kf, 4), 5)
  sets = oracle.topk_sets(oracle.scores_f64(q, w, k, 4), 5)
  assert oracle.recall(idx, sets_q) >= 0.99  # fp32 rounding of near-ties may flip a pick
  assert oracle.recall(idx, sets) >= (0.85 if quant == "fp8" else 0.6)


def test_triton_chunk_scores_match_reference_scores():
  q, w, k = _inputs(np.random.randint(1 << 30))
  sc = np.asarray(triton.chunk_scores(q, w, k, 4, c0=32, chunk=32, block_q=16, block_k=16,
                                      interpret=True))[:, :, :16]
  ref = oracle.scores_f64(q, w, k, 4)[:, 32:64]
  seen = np.isfinite(ref)  # both query tiles see key tile 0, so every element was written
  np.testing.assert_allclose(sc[seen], ref[seen], rtol=1e-5, atol=1e-5)
  assert np.all(sc[~seen] == -np.inf) and seen.any() and (~seen).any()


@pytest.mark.parametrize("quant", [None, "fp8"])
def test_mosaic_tpu_interpret_matches_oracle(quant):
  q, w, k = _inputs(np.random.randint(1 << 30), b=2, n=16)
  seg = jnp.asarray(np.repeat((np.arange(64) >= 30)[None].astype(np.int32), 2, 0))
  idx, vals = mosaic_tpu.indexer_topk(q, w, k, 6, 4, segment_ids=seg, quant=quant, interpret=True,
                                      block_q=16, block_k=16, chunk=32)
  kseg = jnp.take(seg, 4 * jnp.arange(16) + 3, axis=1)
  qf, kf = quantize.fake_quant_qk(q, k, quant)
  _check_rows(idx, vals, oracle.scores_f64(qf, w, kf, 4, seg, kseg), 6, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("quant,operands", [(None, "bf16"), ("fp8", "e4m3_widen"), ("fp8", "e4m3"),
                                            ("mxfp4", "e4m3"), ("mxfp4", "bf16")])
def test_triton_larger_shape_matches_reference(quant, operands):
  q, w, k = _inputs(np.random.randint(1 << 30), b=1, s=256, h=4, d=64)
  idx, _ = triton.indexer_topk(q, w, k, 16, 4, quant=quant, interpret=True, block_q=32,
                               block_k=32, chunk=128, operands=operands)
  ridx, _ = reference.indexer_topk(q, w, k, 16, 4, quant=quant)
  sets = np.empty(ridx.shape[:2], dtype=object)
  for i in range(ridx.shape[0]):
    for t in range(ridx.shape[1]):
      sets[i, t] = {int(j) for j in np.asarray(ridx[i, t]) if j >= 0}
  assert oracle.recall(idx, sets) >= 0.99


def test_e4m3_as_bf16_is_exact_for_every_byte():
  import ml_dtypes
  x = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
  finite = ~np.isnan(x.astype(np.float32))
  widened = jax.jit(quantize.e4m3_as_bf16)(jnp.asarray(x))
  assert widened.dtype == jnp.bfloat16 and finite.sum() == 254
  got = np.asarray(widened).astype(np.float32)
  np.testing.assert_array_equal(got[finite], x[finite].astype(np.float32))
  np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(x[finite].astype(np.float32)))


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_triton_operand_formats_select_the_same_entries(quant):
  """bf16-held E4M3, E4M3 widened in registers and the FP8 dot are the same numbers: same output."""
  q, w, k = _inputs(np.random.randint(1 << 30), d=64)
  outs = [triton.indexer_topk(q, w, k, 5, 4, quant=quant, operands=op, **TRITON_SMALL)
          for op in triton.OPERANDS]
  for idx, vals in outs[1:]:
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(outs[0][0]))
    _assert_same_scores(vals, outs[0][1])


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_q_chunk_quantized_in_pieces_equals_whole(quant):
  q, _w, _k = _inputs(np.random.randint(1 << 30), b=2, s=64, d=64)
  whole_q, whole_s = triton._quantize_q_chunk(q, quant, "bf16", piece=64)
  piece_q, piece_s = triton._quantize_q_chunk(q, quant, "bf16", piece=16)
  assert whole_q.dtype == jnp.bfloat16 and piece_q.shape == q.shape and piece_s.shape == q.shape[:3]
  np.testing.assert_array_equal(np.asarray(piece_q, np.float32), np.asarray(whole_q, np.float32))
  np.testing.assert_array_equal(np.asarray(piece_s), np.asarray(whole_s))
  e4m3, _ = quantize.quantize_rows(q, quant)
  np.testing.assert_array_equal(np.asarray(whole_q, np.float32), np.asarray(e4m3, np.float32))


def test_triton_rejects_unknown_operand_format():
  q, w, k = _inputs(0)
  with pytest.raises(ValueError, match="operands must be one of"):
    triton.indexer_topk(q, w, k, 5, 4, quant="fp8", operands="fp4", **TRITON_SMALL)


def test_triton_heads_per_step_gives_the_same_selection():
  q, w, k = _inputs(np.random.randint(1 << 30), h=4)
  one = triton.indexer_topk(q, w, k, 5, 4, **TRITON_SMALL)
  for hps in (2, 4):
    idx, vals = triton.indexer_topk(q, w, k, 5, 4, heads_per_step=hps, **TRITON_SMALL)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(one[0]))
    _assert_same_scores(vals, one[1])
  with pytest.raises(ValueError, match="heads_per_step=3 must be a power of two"):
    triton.indexer_topk(q, w, k, 5, 4, heads_per_step=3, **TRITON_SMALL)


def test_default_chunk_bounds_the_score_block():
  assert triton.default_chunk(8192, 2048, 64) == 8192  # one launch at 8K
  assert triton.default_chunk(32768, 8192, 64) == 8192  # 256 MiB
  assert triton.default_chunk(131072, 32768, 64) == 2048  # 256 MiB
  assert triton.default_chunk(1 << 20, 1 << 18, 64) == 1024  # the floor
  assert triton.default_chunk(100, 25, 64) == 128  # short sequences: one chunk
  assert triton.default_chunk(32768, 8192, 64, b=2) == 4096  # the budget covers the whole batch
  for s, b in ((8192, 1), (8192, 4), (32768, 1), (32768, 4), (131072, 1), (131072, 2)):
    n = s // 4  # (above the 1024-row floor)
    assert b * triton.default_chunk(s, n, 64, b) * n * 4 <= triton.SCORE_BLOCK_BYTES


def test_triton_rejects_zero_heads_per_step():
  q, w, k = _inputs(0)
  with pytest.raises(ValueError, match="heads_per_step=0 must be a power of two"):
    triton.indexer_topk(q, w, k, 5, 4, heads_per_step=0, **TRITON_SMALL)
