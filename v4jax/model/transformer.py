"""The whole model: embed -> n residual streams -> blocks -> hc_head -> norm -> head, plus MTP (spec 2, 6).

Repeated layers are scanned: the layer schedule is cut into segments whose blocks repeat with a short
period (V4-Flash: 2 sliding layers, 1 CSA hash layer, then [HCA, CSA] x 20), and each segment is one
`nn.scan` over a group of `period` blocks, so compile time grows with the number of distinct segments,
not with depth. Every parameter of a segment carries a leading `layers` axis of its repeat count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from v4jax.model.block import Block, Context
from v4jax.model.compressor import doc_positions
from v4jax.model.config import ModelConfig
from v4jax.model.hyperconn import HyperHead
from v4jax.model.layers import Dense, RMSNorm, dtype_of, normal_init, rope_inv_freq


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int                 # first main layer of the segment
    kinds: tuple[str, ...]     # attention kind of each block of the period
    hashed: tuple[bool, ...]   # hash routing of each block of the period
    repeats: int

    @property
    def period(self) -> int:
        return len(self.kinds)

    def layers(self) -> list[int]:
        return [self.start + r * self.period + j for r in range(self.repeats) for j in range(self.period)]


def layer_plan(cfg: ModelConfig, max_period: int = 4) -> list[Segment]:
    """Cuts the schedule into scanned segments (each layer its own segment when `scan_layers` is off)."""
    sig = list(zip(cfg.layer_kinds, [k == "hash" for k in cfg.moe_kinds]))
    plan, i, L = [], 0, len(sig)
    while i < L:
        best = (1, 1)
        if cfg.scan_layers:
            for p in range(1, max_period + 1):
                r = 1
                while i + (r + 1) * p <= L and sig[i + r * p:i + (r + 1) * p] == sig[i:i + p]:
                    r += 1
                if r >= 2 and p * r > best[0] * best[1]:
                    best = (p, r)
        p, r = best
        plan.append(Segment(i, tuple(s[0] for s in sig[i:i + p]), tuple(s[1] for s in sig[i:i + p]), r))
        i += p * r
    return plan


class Group(nn.Module):
    """`period` consecutive blocks: the body of one scan step."""

    cfg: ModelConfig
    kinds: tuple[str, ...]
    hashed: tuple[bool, ...]
    capture: bool = False
    qat: Any = None

    @nn.compact
    def __call__(self, X, ctx: Context, overrides):
        auxes = []
        for j, (kind, hashed) in enumerate(zip(self.kinds, self.hashed)):
            override = None if overrides is None or hashed else overrides[j]
            X, aux = Block(self.cfg, kind, hashed, self.capture, self.qat, name=f"layer{j}")(X, ctx, override)
            auxes.append(aux)
        return X, tuple(auxes)


class MTP(nn.Module):
    """One multi-token-prediction depth: mixes the previous streams with the next token's embedding, then a block."""

    cfg: ModelConfig
    capture: bool = False
    qat: Any = None

    @nn.compact
    def __call__(self, X_prev, next_embedding, ctx: Context, override=None):
        cfg = self.cfg
        dtype, pdt, d = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype), cfg.hidden_size
        e = RMSNorm(cfg.rms_norm_eps, pdt, name="enorm")(next_embedding)
        h = RMSNorm(cfg.rms_norm_eps, pdt, name="hnorm")(X_prev)  # per stream over d
        X = (Dense(d, ("embed", "embed_out"), cfg.init_std, dtype, pdt, name="e_proj")(e)[:, :, None, :]
             + Dense(d, ("embed", "embed_out"), cfg.init_std, dtype, pdt, name="h_proj")(h))  # [B, S, n, d]
        X, aux = Block(cfg, cfg.mtp_layer_kind, False, self.capture, self.qat, name="block")(X, ctx, override)
        y = HyperHead(cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps, cfg.init_std, cfg.hc_init_alpha, name="hc_head")(X)
        return X, RMSNorm(cfg.rms_norm_eps, pdt, name="norm")(y), aux


class ModelOutput(NamedTuple):
    logits: Float[Array, "b s v"]
    mtp_logits: tuple
    aux: dict


class Transformer(nn.Module):
    """DeepSeek-V4. `apply(variables, tokens, segment_ids=None, positions=None, routed_indices=None)`.

    variables = {'params', 'buffers'}; buffers hold the router biases and hash tables (no gradient).
    `routed_indices` [L_moe, B, S, K] (L_moe = num_layers + mtp_depth) replaces the learned layers' expert
    selection (anticipatory routing); hash layers ignore it. `capture=True` adds per-layer activations to aux.
    `qat` (a `v4jax.quant.QATPolicy`) switches on FP4 fake-quant of the routed experts and the indexer QK
    path; `qat_factor` (a traced scalar in [0, 1], default 1) blends it in, so one compiled step serves the
    whole run ("late-stage QAT" switches it on at a step).
    """

    cfg: ModelConfig
    capture: bool = False
    qat: Any = None

    @nn.compact
    def __call__(self, tokens: Int[Array, "b s"], segment_ids=None, positions=None, routed_indices=None,
                 qat_factor=None) -> ModelOutput:
        cfg = self.cfg
        dtype, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        B, S = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, S), jnp.int32)
        doc_pos = doc_positions(segment_ids)
        if positions is None:
            positions = doc_pos if cfg.rope_restart_per_document else jnp.broadcast_to(jnp.arange(S), (B, S))
        ctx = Context(tokens, segment_ids, doc_pos, positions, segment_ids != 0,
                      jnp.asarray(rope_inv_freq(cfg.rope_head_dim, cfg.rope_theta)),
                      jnp.asarray(rope_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, cfg.yarn_factor,
                                                cfg.yarn_original_max_position, cfg.yarn_beta_fast,
                                                cfg.yarn_beta_slow)),
                      None if self.qat is None else jnp.asarray(1.0 if qat_factor is None else qat_factor, jnp.float32))
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdt, name="embed",
                         embedding_init=nn.with_logical_partitioning(normal_init(cfg.init_std), ("vocab", "embed")))
        X = jnp.broadcast_to(embed(tokens)[:, :, None, :], (B, S, cfg.hc_mult, cfg.hidden_size))

        per_layer: dict[int, dict] = {}
        for s, seg in enumerate(layer_plan(cfg)):
            overrides = None
            if routed_indices is not None:
                sl = routed_indices[seg.start:seg.start + seg.period * seg.repeats]
                overrides = sl.reshape(seg.repeats, seg.period, *sl.shape[1:])
            group = Group
            if cfg.remat:
                group = nn.remat(group, prevent_cse=False)
            scanned = nn.scan(group, variable_axes={"params": 0, "buffers": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, 0 if overrides is not None else nn.broadcast),
                              length=seg.repeats, metadata_params={nn.PARTITION_NAME: "layers"})
            X, auxes = scanned(cfg, seg.kinds, seg.hashed, self.capture, self.qat, name=f"seg{s}")(X, ctx, overrides)
            for j, aux in enumerate(auxes):
                for r in range(seg.repeats):
                    per_layer[seg.start + r * seg.period + j] = jax.tree.map(lambda a, r=r: a[r], aux)

        head = Dense(cfg.vocab_size, ("embed", "vocab"), cfg.init_std, jnp.float32, pdt, name="head")
        final_norm = RMSNorm(cfg.rms_norm_eps, pdt, name="norm")
        y = HyperHead(cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps, cfg.init_std, cfg.hc_init_alpha, name="hc_head")(X)
        final_hidden = final_norm(y)
        logits = head(final_hidden)

        mtp_logits = []
        Xm = X
        for k in range(cfg.mtp_depth):
            shifted = jnp.concatenate([tokens[:, k + 1:], jnp.zeros((B, min(k + 1, S)), tokens.dtype)], 1)[:, :S]
            override = None if routed_indices is None else routed_indices[cfg.num_layers + k]
            Xm, hidden, aux = MTP(cfg, self.capture, self.qat, name=f"mtp{k}")(Xm, embed(shifted), ctx, override)
            mtp_logits.append(head(hidden))
            per_layer[cfg.num_layers + k] = aux

        layers = [per_layer[i] for i in range(cfg.num_layers + cfg.mtp_depth)]
        aux = {
            "expert_load": jnp.stack([a["load"] for a in layers]),
            "balance_loss": sum(a["balance_loss"] for a in layers),
            "router_indices": jnp.stack([a["indices"] for a in layers]),
            "router_weights": jnp.stack([a["weights"] for a in layers]),
            "indexer": {i: a["indexer"] for i, a in enumerate(layers) if "indexer" in a},
            # small scalars for metrics: mean visible / selected compressed entries per query, per CSA layer
            "indexer_stats": {f"layer{i}": {"visible_mean": jnp.mean(a["indexer"]["visible"].astype(jnp.float32)),
                                            "selected_mean": jnp.mean(a["indexer"]["selected"].astype(jnp.float32))}
                              for i, a in enumerate(layers) if "indexer" in a},
            "final_hidden": final_hidden if self.capture else None,
        }
        if self.capture:
            for key in ("attn_out", "moe_out", "layer_out"):
                aux[key] = [a[key] for a in layers]
        return ModelOutput(logits, tuple(mtp_logits), aux)

    # ---- variables ---------------------------------------------------------------------------------
    def init_variables(self, rng, tokens) -> dict:
        """Plain (unboxed) variables {'params', 'buffers'}."""
        return nn.unbox(jax.jit(self.init)(rng, tokens))

    def logical_axes(self, tokens) -> dict:
        """The logical axis names of every parameter and buffer, from abstract shapes (no allocation)."""
        boxed = jax.eval_shape(self.init, jax.random.key(0), tokens)
        return nn.get_partition_spec(boxed)


# ---- router buffers as [L_moe, E] arrays (aux-loss-free bias updates live outside the model) ---------

def _router_leaves(cfg: ModelConfig):
    """(layer index, path to the router's buffer dict, repeat index or None) for every MoE layer."""
    out = []
    for s, seg in enumerate(layer_plan(cfg)):
        for r in range(seg.repeats):
            for j in range(seg.period):
                out.append((seg.start + r * seg.period + j, (f"seg{s}", f"layer{j}", "moe", "router"), r))
    for k in range(cfg.mtp_depth):
        out.append((cfg.num_layers + k, (f"mtp{k}", "block", "moe", "router"), None))
    return sorted(out)


def learned_router_mask(cfg: ModelConfig) -> np.ndarray:
    """bool [L_moe]: True for layers with a learned (biased) router, False for hash layers."""
    return np.array([k == "learned" for k in cfg.moe_kinds] + [True] * cfg.mtp_depth)


def router_bias(cfg: ModelConfig, buffers: dict) -> Float[Array, "l e"]:
    """The selection biases of all MoE layers as [L_moe, E] (zero rows for hash layers)."""
    rows = []
    for _, path, r in _router_leaves(cfg):
        node = buffers
        for key in path:
            node = node[key]
        if "bias" in node:
            rows.append(node["bias"] if r is None else node["bias"][r])
        else:
            rows.append(jnp.zeros((cfg.n_routed_experts,), jnp.float32))
    return jnp.stack(rows)


def with_router_bias(cfg: ModelConfig, buffers: dict, bias: Float[Array, "l e"]) -> dict:
    """A copy of `buffers` whose router biases are the rows of `bias` (hash rows are ignored)."""
    buffers = _thaw(buffers)  # a fresh dict tree (leaves shared), so the caller's buffers are left alone
    for layer, path, r in _router_leaves(cfg):
        node = buffers
        for key in path:
            node = node[key]
        if "bias" in node:
            node["bias"] = bias[layer] if r is None else node["bias"].at[r].set(bias[layer])
    return buffers


def _thaw(tree: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _thaw(v) for k, v in tree.items()}
    return tree
