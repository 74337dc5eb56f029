"""The model's lightning indexer selects through `v4jax.kernels.indexer`: every backend (xla, triton and
mosaic_tpu in interpret mode) picks the same sets as the model's own formula (fp32 scores, compacted
entries visible as `entry_visibility` says), on packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import quant
from v4jax.kernels import indexer as indexer_kernels
from v4jax.model import ModelConfig, presets
from v4jax.model import indexer as model_indexer
from v4jax.model.compressor import doc_positions, entry_visibility, window_ends
from v4jax.model.layers import rope_inv_freq

S = 40
# Row 0: documents of 13, 3 (shorter than one window), 17 tokens, then 7 padding tokens (segment 0).
# Row 1: documents of 22 and 18 tokens. Queries see 0 to 5 entries: TOPK = 3 is more than some see.
TOPK = 3
SEGMENTS = np.array([[1] * 13 + [2] * 3 + [3] * 17 + [0] * 7, [1] * 22 + [2] * 18], np.int32)


def _cfg(impl, **kw):
  d = presets.tiny().to_dict()
  d.update(dtype="float32", index_topk=TOPK, indexer_impl=impl, indexer_interpret=impl != "xla", **kw)
  return ModelConfig.from_config(d)


def _inputs(seed):
  cfg = _cfg("xla")
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (2, S, cfg.hidden_size), jnp.float32)
  q_latent = jax.random.normal(k2, (2, S, cfg.q_lora_rank), jnp.float32)
  seg = jnp.asarray(SEGMENTS)
  doc_pos = doc_positions(seg)
  inv_freq = jnp.asarray(rope_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta))
  return (x, q_latent, seg, doc_pos, doc_pos, inv_freq)


def _run(impl, seed, qat=None, qat_factor=None, capture=None):
  """Indexer picks [B, S, k] for one backend; `capture` collects the kernel api's inputs."""
  args = _inputs(seed)
  module = model_indexer.Indexer(_cfg(impl), qat)
  variables = module.init(jax.random.PRNGKey(seed + 1), *args, qat_factor)
  api = indexer_kernels.indexer_topk

  def spy(q, w, k, topk, ratio, segment_ids, **kw):
    capture.update(q=q, w=w, k=k, topk=topk)
    return api(q, w, k, topk, ratio, segment_ids, **kw)

  if capture is not None:
    model_indexer.indexer_kernels.indexer_topk = spy
  try:
    idx, selected, stats = module.apply(variables, *args, qat_factor)
  finally:
    model_indexer.indexer_kernels.indexer_topk = api
  return np.asarray(idx), np.asarray(selected), stats


def _sets(idx):
  return [[frozenset(int(j) for j in row if j >= 0) for row in b] for b in idx]


def _expected_sets(q, w, k, topk, score_dtype=jnp.float32):
  """The model's pre-kernel formula: fp32 scores, `entry_visibility` of the compressor's entries, top-k."""
  seg = jnp.asarray(SEGMENTS)
  end, valid = window_ends(seg, doc_positions(seg), 4)
  entries = model_indexer.Entries(k, end, jnp.take_along_axis(seg, end, 1), valid)
  vis = entry_visibility(entries, seg)  # [B, S, N]
  qk = jnp.einsum("bshc,bnc->bshn", q, k, precision="highest")  # [B, S, H, N]
  scores = jnp.einsum("bshn,bsh->bsn", jax.nn.relu(qk), w, precision="highest")  # [B, S, N]
  scores = jnp.where(vis, scores.astype(score_dtype), -jnp.inf)
  vals, idx = jax.lax.top_k(scores, topk)
  return _sets(np.where(np.asarray(vals) > -np.inf, np.asarray(idx), -1)), np.asarray(vis)


@pytest.mark.parametrize("impl", ["triton", "mosaic_tpu"])
def test_pallas_backends_pick_what_xla_and_the_model_formula_pick(impl):
  seed = np.random.randint(1 << 20)
  cap = {}
  idx_x, sel_x, stats = _run("xla", seed, capture=cap)
  idx_p, sel_p, _ = _run(impl, seed)
  want, vis = _expected_sets(cap["q"], cap["w"], cap["k"], cap["topk"])
  assert _sets(idx_x) == want and _sets(idx_p) == want
  np.testing.assert_array_equal(sel_x, sel_p)
  # the picks are visible entries; queries with fewer than topk visible keep them all (-1 padding)
  assert not np.any(sel_x & ~vis)
  n_vis = vis.sum(-1)
  np.testing.assert_array_equal(sel_x.sum(-1), np.minimum(n_vis, TOPK))
  np.testing.assert_array_equal(np.asarray(stats["visible"]), n_vis)
  assert (n_vis == 0).any() and ((n_vis > 0) & (n_vis < TOPK)).any() and (n_vis > TOPK).any()
  assert not vis[0, 33:].any()  # padding tokens see nothing
  assert vis[0, 13:16].sum() == 0  # the 3-token document has no complete window


def test_qat_bf16_scores_same_picks_on_triton():
  """QAT on (factor 1): fake-quantised q/keys and bf16 index scores; ties broken by lower index."""
  seed = np.random.randint(1 << 20)
  policy = quant.QATPolicy(enabled=True)
  cap = {}
  idx_x, _, _ = _run("xla", seed, policy, 1.0, capture=cap)
  idx_t, _, _ = _run("triton", seed, policy, 1.0)
  want, _ = _expected_sets(cap["q"], cap["w"], cap["k"], cap["topk"], jnp.bfloat16)
  assert _sets(idx_x) == want and _sets(idx_t) == want
  # factor 0: QAT not started, fp32 scores of the unquantised q/keys, as without a policy
  idx_0, _, _ = _run("triton", seed, policy, 0.0)
  idx_plain, _, _ = _run("xla", seed)
  assert _sets(idx_0) == _sets(idx_plain)


def test_selection_mask_marks_exactly_the_picks():
  idx = jnp.asarray([[[2, 0, -1], [-1, -1, -1]]], jnp.int32)
  mask = np.asarray(model_indexer.selection_mask(idx, 4))
  np.testing.assert_array_equal(mask, [[[True, False, True, False], [False] * 4]])


def test_config_field_reaches_the_kernel_api():
  """indexer_impl="triton" without interpret on the CPU reaches the api, which warns and uses xla."""
  d = presets.tiny().to_dict()
  d.update(dtype="float32", index_topk=TOPK, indexer_impl="triton")
  module = model_indexer.Indexer(ModelConfig.from_config(d))
  args = _inputs(0)
  with pytest.warns(UserWarning, match="triton needs a GPU"):
    variables = module.init(jax.random.PRNGKey(1), *args)
  with pytest.warns(UserWarning, match="falling back to 'xla'"):
    idx = module.apply(variables, *args)[0]
  assert idx.shape == (2, S, TOPK) and ModelConfig().indexer_impl == "auto"
