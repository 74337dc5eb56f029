"""The training state: everything a step reads and writes, as one pytree that orbax saves whole.

`buffers` are the model's non-trained variables (router bias, hash tables): they change outside
the optimizer (the aux-loss-free bias update), so they live beside `params`, not inside them.
"""

from __future__ import annotations

from typing import Any

import flax.linen
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    """params / buffers / optimizer state, the step counter and the step's PRNG key."""

    step: jax.Array  # int32 []
    params: Any
    buffers: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw PRNG key data (raw so orbax stores it as a plain array)

    @property
    def variables(self) -> dict[str, Any]:
        """The variables dict `model.apply` takes."""
        return {"params": self.params, "buffers": self.buffers}


def init_variables(model: Any, rng: jax.Array, sample_tokens: jax.Array) -> dict[str, Any]:
    """`model.init` with logical-axis metadata boxes removed (plain arrays: what optax and orbax expect)."""
    return flax.linen.meta.unbox(model.init(rng, sample_tokens))


def create_train_state(model: Any, tx: Any, sample_tokens: jax.Array, seed: int) -> TrainState:
    """Initialises the model from `seed` on `sample_tokens` [B, S] and the optimizer state for its params."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    variables = init_variables(model, init_rng, sample_tokens)
    params = variables["params"]
    buffers = variables.get("buffers", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                      opt_state=tx.init(params), rng=state_rng)
