"""The jitted train and eval steps: the loss (LM + MTP + balance), the update, the router-bias update.

loss = LM cross-entropy (masked by `loss_mask`)
     + mtp_weight(step) * mean_k MTP cross-entropy (mtp_logits[k][:, t] predicts tokens[:, t+2+k],
       only where that token is in the same document as position t)
     + balance_loss_weight * aux['balance_loss'] (the sequence-wise balance loss, already summed over layers).
The aux-loss-free router bias is updated after the optimizer step from this step's expert load,
outside optax, because it is a buffer driven by counts, not by gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int

from v4jax.train.state import TrainState

Batch = dict[str, jax.Array]
KNOWN_AUX = ("balance_loss", "expert_load", "router_indices", "router_weights", "indexer", "final_hidden")


def token_nll(logits: Float[Array, "B S V"], targets: Int[Array, "B S"]) -> Float[Array, "B S"]:
    """Per-position negative log-likelihood (nats) of `targets` under `logits`, computed in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, S, V]
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, S]


def masked_mean(values: Float[Array, "B S"], mask: Float[Array, "B S"]) -> Float[Array, ""]:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mtp_targets(tokens: Int[Array, "B S"], segment_ids: Int[Array, "B S"],
                offset: int) -> tuple[Int[Array, "B S"], Float[Array, "B S"]]:
    """Targets tokens[:, t+offset] and a mask that is 1 only where that token exists in t's document."""
    seq_len = tokens.shape[1]
    shifted_tokens = jnp.pad(tokens[:, offset:], ((0, 0), (0, offset)))  # [B, S]
    shifted_segments = jnp.pad(segment_ids[:, offset:], ((0, 0), (0, offset)))  # [B, S] (0 past the end)
    in_range = (jnp.arange(seq_len) < seq_len - offset)[None, :]  # [1, S]
    mask = in_range & (segment_ids > 0) & (shifted_segments == segment_ids)
    return shifted_tokens, mask.astype(jnp.float32)


def mtp_loss(mtp_logits: tuple[jax.Array, ...], batch: Batch) -> Float[Array, ""]:
    """Mean over MTP depths k of the masked cross-entropy of mtp_logits[k] against tokens[t+2+k]."""
    if not mtp_logits:
        return jnp.zeros((), jnp.float32)
    losses = []
    for k, logits in enumerate(mtp_logits):
        targets, mask = mtp_targets(batch["tokens"], batch["segment_ids"], 2 + k)
        losses.append(masked_mean(token_nll(logits, targets), mask))
    return jnp.mean(jnp.stack(losses))


def mtp_weight_fn(train_cfg: Any, decay_start_step: int) -> Callable[[jax.Array], jax.Array]:
    """step -> MTP weight: constant, or the paper's mtp_weight until the LR decay starts then mtp_weight_late."""
    early, late = float(train_cfg.mtp_weight), float(train_cfg.mtp_weight_late)
    if train_cfg.mtp_weight_schedule == "constant":
        return lambda step: jnp.asarray(early, jnp.float32)
    return lambda step: jnp.where(step >= decay_start_step, late, early).astype(jnp.float32)


def lr_decay_start(schedule: Callable[[Any], Any], total_steps: int) -> int:
    """The first step at which the learning rate falls below its peak for good (total_steps if never)."""
    import numpy as np

    lrs = np.asarray(jax.vmap(schedule)(jnp.arange(total_steps)))
    peak_at = int(np.argmax(lrs))
    below = np.nonzero(lrs[peak_at:] < lrs[peak_at] * (1 - 1e-6))[0]
    return int(peak_at + below[0]) if below.size else total_steps


def routing_stats(aux: dict[str, Any], bias: jax.Array | None) -> dict[str, jax.Array]:
    """Per-layer expert load max/mean, router-bias magnitude, and the model's small indexer scalars."""
    stats: dict[str, jax.Array] = {}
    if "expert_load" in aux:
        load = aux["expert_load"].astype(jnp.float32)  # [L, E]
        stats["expert_load_max_over_mean"] = jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9)  # [L]
    if bias is not None:
        stats["router_bias_abs_mean"] = jnp.mean(jnp.abs(bias), -1)  # [L]
        stats["router_bias_abs_max"] = jnp.max(jnp.abs(bias))
    flat = {k: v for k, v in aux.items() if k not in KNOWN_AUX}
    for path, value in jax.tree_util.tree_flatten_with_path(flat)[0]:  # indexer stats etc., maybe nested
        if jnp.size(value) <= 64:
            name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
            stats[f"aux/{name}"] = jnp.asarray(value, jnp.float32)
    return stats


def make_train_step(model: Any, tx: optax.GradientTransformation, *, lr_schedule: Callable, mtp_weight: Callable,
                    balance_loss_weight: float, router_bias_speed: float,
                    learned_layers: jax.Array | None,
                    router_bias: Callable | None, with_router_bias: Callable | None,
                    update_router_bias: Callable | None, skip_nonfinite: bool = True,
                    qat_factor: Callable | None = None) -> Callable:
    """Builds `train_step(state, batch, routed_indices=None) -> (state, metrics)` (jit it with donation).

    `learned_layers` bool [L] marks layers whose bias is updated (hash layers keep zeros); the three
    bias callables are `v4jax.model.router_bias`, `.with_router_bias` and
    `v4jax.optim.router_bias.update_router_bias` (None skips the bias update, e.g. dense models).
    With `skip_nonfinite`, a step whose loss or gradient norm is NaN/Inf leaves params, buffers and
    optimizer state unchanged (the step counter still advances; metric `skipped_update` is 1).
    `qat_factor` (step -> float32 blend factor, e.g. `quant.qat_active` with the run's policy; the model
    must be built with `qat=policy`) is evaluated on the traced step counter, so late-stage QAT switches
    on without recompiling; it is logged as metric `qat_factor`. None: the plain step, unchanged.
    """

    def loss_fn(params, buffers, batch, routed_indices, factor):
        qat_kwargs = {} if factor is None else {"qat_factor": factor}
        out = model.apply({"params": params, "buffers": buffers}, batch["tokens"],
                          segment_ids=batch["segment_ids"], positions=batch["positions"],
                          routed_indices=routed_indices, **qat_kwargs)
        lm = masked_mean(token_nll(out.logits, batch["targets"]), batch["loss_mask"])
        mtp = mtp_loss(tuple(out.mtp_logits), batch)
        balance = jnp.asarray(out.aux.get("balance_loss", 0.0), jnp.float32)
        return lm, mtp, balance, out.aux

    def train_step(state: TrainState, batch: Batch, routed_indices: jax.Array | None = None):
        w_mtp = mtp_weight(state.step)
        factor = None if qat_factor is None else qat_factor(state.step)

        def objective(params):
            lm, mtp, balance, aux = loss_fn(params, state.buffers, batch, routed_indices, factor)
            total = lm + w_mtp * mtp + balance_loss_weight * balance
            return total, (lm, mtp, balance, aux)

        (total, (lm, mtp, balance, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        buffers, bias = state.buffers, None
        if router_bias is not None and "expert_load" in aux:
            bias = update_router_bias(router_bias(state.buffers), aux["expert_load"], router_bias_speed,
                                      learned_layers)
            buffers = with_router_bias(state.buffers, bias)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
            params, buffers = keep(params, state.params), keep(buffers, state.buffers)
            opt_state = keep(opt_state, state.opt_state)
        metrics = {"loss": total, "lm_loss": lm, "mtp_loss": mtp, "balance_loss": balance,
                   "mtp_weight": w_mtp, "grad_norm": grad_norm,
                   "skipped_update": (~finite).astype(jnp.float32) if skip_nonfinite else jnp.zeros(()),
                   "learning_rate": jnp.asarray(lr_schedule(state.step), jnp.float32)}
        if factor is not None:
            metrics["qat_factor"] = factor
        metrics.update(routing_stats(aux, bias))
        new_state = state.replace(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: Any, qat_factor: Callable | None = None) -> Callable:
    """Builds `eval_step(params, buffers, batch, step=None) -> (nll_sum, token_count)` for the LM loss.

    With `qat_factor` (as in `make_train_step`), pass `step`: the model runs with the QAT factor of that
    step, so an evaluation sees the numerics the training used; without it `step` is ignored.
    """

    def eval_step(params, buffers, batch, step=None):
        qat_kwargs = {} if qat_factor is None else {"qat_factor": qat_factor(step)}
        out = model.apply({"params": params, "buffers": buffers}, batch["tokens"],
                          segment_ids=batch["segment_ids"], positions=batch["positions"], **qat_kwargs)
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(token_nll(out.logits, batch["targets"]) * mask), jnp.sum(mask)

    return eval_step


def make_route_step(model: Any) -> Callable:
    """Builds `route(params, buffers, batch) -> router_indices [L, B, S, K]` for anticipatory routing."""

    def route(params, buffers, batch):
        out = model.apply({"params": params, "buffers": buffers}, batch["tokens"],
                          segment_ids=batch["segment_ids"], positions=batch["positions"])
        return out.aux["router_indices"]

    return route
