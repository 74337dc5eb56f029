"""Load balancing of the MoE router outside the optimizer ([PAPER] §2.1, spec §5.3).

* `update_router_bias`: the aux-loss-free bias update (DeepSeek-V3's `noaux_tc`): every step,
  b_i += speed * sign(mean_load - load_i) per layer, over the global batch, then re-centred to
  zero mean per layer (without it the bias mean drifts: torchtitan #1506). Hash layers keep theirs.
* `sequence_balance_loss`: the sequence-wise balance loss sum_i f_i P_i, per sequence, averaged;
  unweighted (the training loss multiplies it by `BALANCE_LOSS_WEIGHT`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from v4jax.model.moe import sequence_balance_loss  # noqa: F401  (re-exported: it lives with the router)

ROUTER_BIAS_SPEED = 1e-3  # gamma, both V4 models
BALANCE_LOSS_WEIGHT = 1e-4  # alpha, both V4 models


def update_router_bias(
    bias: Float[Array, "L E"],
    load: Float[Array, "L E"],
    speed: float = ROUTER_BIAS_SPEED,
    learned_mask: Bool[Array, " L"] | None = None,
) -> Float[Array, "L E"]:
    """One aux-loss-free step: push under-loaded experts up, over-loaded down, re-centre each row.

    `load` is the number of tokens routed to each expert, already summed over the whole global
    batch (all tokens, all devices). Rows where `learned_mask` is False (hash layers) are unchanged.
    """
    if bias.shape != load.shape or bias.ndim != 2:
        raise ValueError(
            f"bias and load must both be [L, E], got {bias.shape} and {load.shape}"
        )
    load = load.astype(jnp.float32)
    mean_load = jnp.mean(load, axis=-1, keepdims=True)  # [L, 1]
    stepped = bias.astype(jnp.float32) + speed * jnp.sign(mean_load - load)  # [L, E]
    centred = stepped - jnp.mean(stepped, axis=-1, keepdims=True)  # [L, E]
    if learned_mask is None:
        return centred.astype(bias.dtype)
    if learned_mask.shape != bias.shape[:1]:
        raise ValueError(
            f"learned_mask must be [L] = {bias.shape[:1]}, got {learned_mask.shape}"
        )
    return jnp.where(learned_mask[:, None], centred, bias.astype(jnp.float32)).astype(
        bias.dtype
    )


