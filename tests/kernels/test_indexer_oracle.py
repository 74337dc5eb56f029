"""Independent float64 numpy oracle for the lightning indexer tests (loops, no jax; holds no tests)."""

from __future__ import annotations

import numpy as np


def scores_f64(q, w, k, ratio, qseg=None, kseg=None):
  """Masked scores [B, S, N] in float64: sum_h w relu(q . k); -inf where not visible."""
  q, w, k = (np.asarray(a, np.float64) for a in (q, w, k))
  b, s, _h, _d = q.shape
  n = k.shape[1]
  logits = np.einsum("bshd,bnd->bshn", q, k)
  sc = np.einsum("bshn,bsh->bsn", np.maximum(logits, 0.0), w)
  t = np.arange(s)[:, None]
  vis = np.broadcast_to(np.arange(n)[None, :] < (t + 1) // ratio, (b, s, n)).copy()
  if qseg is not None:
    vis &= np.asarray(qseg)[:, :, None] == np.asarray(kseg)[:, None, :]
  return np.where(vis, sc, -np.inf)


def topk_sets(scores, topk):
  """Per row: the set of the topk best visible entries (ties broken by lower index)."""
  b, s, n = scores.shape
  out = np.empty((b, s), dtype=object)
  for i in range(b):
    for t in range(s):
      row = scores[i, t]
      order = sorted(range(n), key=lambda j: (-row[j], j))
      out[i, t] = {j for j in order[:topk] if row[j] > -np.inf}
  return out


def recall(idx, sets):
  """Fraction of the oracle's picks that idx [B, S, topk] also picked."""
  idx = np.asarray(idx)
  hit = tot = 0
  for i in range(idx.shape[0]):
    for t in range(idx.shape[1]):
      got = {int(j) for j in idx[i, t] if j >= 0}
      hit += len(got & sets[i, t])
      tot += len(sets[i, t])
  return hit / max(tot, 1)
