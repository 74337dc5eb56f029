"""Inputs of the lightning-indexer benchmarks, and the recall of quantized / refined selection on them.

Two input families (B = 1, H = 64, D = 128, N = S / 4), both bf16 q and k and fp32 w:
  * "random": q, k iid standard normal; w standard normal * H^-0.5 * D^-0.5 (both signs). Unstructured:
    the exact top-512 of up to 32K visible entries sits in a dense tail of near-equal scores.
  * "structured" (a few keys per query stand out): G = N // 32 topics, each a random unit direction
    u_g in R^D. Entry s has a topic g_s and query t a topic g_t (uniform); k_s = z_s + A u_{g_s} and
    q[t, h] = z_{t,h} + A u_{g_t} for every head, z iid standard normal, A = 6; w = |standard normal|
    * H^-0.5 * D^-0.5 (positive). A same-topic pair has q.k ~ 36 + noise (std ~14) against ~0 + noise
    (std ~11) otherwise, in every head: each query's ~32 * (visible fraction) same-topic entries score far
    above the rest, and the rest of its top-512 is again a dense tail.
`recall_study` estimates, on sampled query rows, the recall vs the fp32 exact top-k of (a) the top-k of
the fake-quantised scores and (b) the refined selection with c * topk quantized candidates, which
recovers an exact top-k entry iff it is among the candidates: recall = |exact top-k & candidates| / k.
Usage: python experiments/benchmarks/indexer_inputs.py [--sizes 8192,32768,131072] [--rows 128]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.kernels.indexer import quantize

H, D, TOPK, RATIO = 64, 128, 512, 4
TOPIC_SIZE, AMPLITUDE = 32, 6.0


def make_inputs(kind: str, s: int, key: jax.Array, rows: np.ndarray | None = None):
  """(q [1, R, H, D] bf16, w [1, R, H] fp32, k [1, N, D] bf16) for query rows `rows` (None = all S).

  With `rows`, the query rows are fresh draws of the same distribution (their noise is not the one the
  full-sequence call would give them), so a sampled estimate needs no [S, H, D] tensor.
  """
  n = s // RATIO
  kq, kw, kk, kt, ku, kg = jax.random.split(key, 6)
  r = s if rows is None else len(rows)
  q = jax.random.normal(kq, (1, r, H, D), jnp.float32)
  k = jax.random.normal(kk, (1, n, D), jnp.float32)
  w = jax.random.normal(kw, (1, r, H), jnp.float32)
  if kind == "random":
    return q.astype(jnp.bfloat16), w * (H**-0.5) * (D**-0.5), k.astype(jnp.bfloat16)
  if kind != "structured":
    raise ValueError(f"kind must be 'random' or 'structured', got {kind!r}")
  g = max(1, n // TOPIC_SIZE)
  u = jax.random.normal(ku, (g, D), jnp.float32)
  u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)  # [G, D] unit topic directions
  gk = jax.random.randint(kg, (n,), 0, g)
  gq = jax.random.randint(kt, (s,), 0, g)
  if rows is not None:
    gq = gq[jnp.asarray(rows)]
  k = k + AMPLITUDE * u[gk][None]  # [1, N, D]
  q = q + AMPLITUDE * u[gq][None, :, None, :]  # [1, R, H, D]
  return q.astype(jnp.bfloat16), jnp.abs(w) * (H**-0.5) * (D**-0.5), k.astype(jnp.bfloat16)


def row_scores(q, w, k, quant=None):
  """fp32 scores [R, N] of rows q [R, H, D], w [R, H] against k [N, D] (fake-quantised for quant)."""
  qf, kf = quantize.fake_quant_qk(q.astype(jnp.float32), k.astype(jnp.float32), quant)
  logits = jnp.einsum("rhd,nd->rhn", qf, kf, precision="highest")  # [R, H, N]
  return jnp.einsum("rhn,rh->rn", jax.nn.relu(logits), w, precision="highest")  # [R, N]


def recall_study(kind: str, s: int, num_rows: int, factors=(1, 2, 3, 4), quants=("fp8", "mxfp4"),
                 seed: int = 0, row_chunk: int = 16) -> list[dict]:
  """Recall vs fp32 exact top-k of quantized top-(c * topk) candidates, on sampled rows (module doc)."""
  rows = np.unique(np.linspace(RATIO * 8, s - 1, num_rows).astype(int))
  q, w, k = make_inputs(kind, s, jax.random.PRNGKey(seed), rows)
  hits = {(qm, c): 0 for qm in quants for c in factors}
  total = 0
  for i0 in range(0, len(rows), row_chunk):
    sl = slice(i0, i0 + row_chunk)
    vis = np.arange(k.shape[1])[None, :] < ((rows[sl] + 1) // RATIO)[:, None]  # [R, N]
    exact = np.where(vis, np.asarray(row_scores(q[0, sl], w[0, sl], k[0])), -np.inf)
    for qm in quants:
      sq = np.where(vis, np.asarray(row_scores(q[0, sl], w[0, sl], k[0], qm)), -np.inf)
      order_q = np.argsort(-sq, axis=-1, kind="stable")
      for r in range(exact.shape[0]):
        n_vis = int(vis[r].sum())
        top = np.argsort(-exact[r], kind="stable")[:min(TOPK, n_vis)]
        if qm == quants[0]:
          total += len(top)
        for c in factors:
          cand = order_q[r, :min(c * TOPK, n_vis)]
          hits[(qm, c)] += len(np.intersect1d(top, cand))
  return [{"inputs": kind, "S": s, "quant": qm, "candidates": f"{c} x topk", "rows": len(rows),
           "recall": hits[(qm, c)] / total} for qm in quants for c in factors]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="8192,32768,131072")
  ap.add_argument("--rows", type=int, default=128)
  ap.add_argument("--kinds", default="random,structured")
  args = ap.parse_args()
  print("| inputs | S | quant | candidates | rows | recall vs fp32 exact |\n|---|---|---|---|---|---|")
  for kind in args.kinds.split(","):
    for s in (int(x) for x in args.sizes.split(",")):
      for row in recall_study(kind, s, args.rows):
        print(f"| {row['inputs']} | {s} | {row['quant']} | {row['candidates']} | {row['rows']} | "
              f"{100 * row['recall']:.2f}% |", flush=True)


if __name__ == "__main__":
  main()
