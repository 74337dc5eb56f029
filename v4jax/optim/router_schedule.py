"""The router's own step schedule: updates applied late (a delay line) and only every k steps.

`delay_updates(inner, delay)` keeps a ring buffer of the last `delay` updates of `inner` in the
optimizer state, so the update computed at step t is applied at step t + delay (zeros for the first
`delay` steps). optax has no delay transform (MaxText has no delayed-router schedule either), hence
this one. `every_k(inner, k, mode)` updates only every k-th step: "accumulate" averages the k
gradients (optax.MultiSteps), "skip" drops the other steps' gradients
(optax.transforms.conditionally_mask). Both modes update at steps k-1, 2k-1, ... so they agree on
constant gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class DelayLineState(NamedTuple):
    """`buffer`: every leaf with a leading [delay] axis; `slot`: where the next update goes."""

    inner: Any
    buffer: Any
    slot: jax.Array


def delay_updates(
    inner: optax.GradientTransformation, delay: int
) -> optax.GradientTransformation:
    """Apply `inner`'s update `delay` steps after it is computed (zeros until then)."""
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise ValueError(f"delay must be an integer >= 0, got {delay!r}")
    if delay == 0:
        return inner

    def init_fn(params):
        buffer = jax.tree.map(lambda p: jnp.zeros((delay,) + p.shape, p.dtype), params)
        return DelayLineState(
            inner=inner.init(params), buffer=buffer, slot=jnp.zeros([], jnp.int32)
        )

    def update_fn(updates, state, params=None):
        fresh, inner_state = inner.update(updates, state.inner, params)
        # The slot about to be overwritten holds the update computed `delay` steps ago.
        delayed = jax.tree.map(lambda buf: buf[state.slot], state.buffer)
        buffer = jax.tree.map(
            lambda buf, new: buf.at[state.slot].set(new.astype(buf.dtype)),
            state.buffer,
            fresh,
        )
        slot = (state.slot + 1) % delay
        delayed = jax.tree.map(lambda d, u: d.astype(u.dtype), delayed, updates)
        return delayed, DelayLineState(inner=inner_state, buffer=buffer, slot=slot)

    return optax.GradientTransformation(init_fn, update_fn)


def every_k(
    inner: optax.GradientTransformation, k: int, mode: str = "accumulate"
) -> optax.GradientTransformation:
    """Run `inner` every k-th step (steps k-1, 2k-1, ...); zero updates in between."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k == 1:
        return inner
    if mode == "accumulate":
        return optax.MultiSteps(
            inner, every_k_schedule=k, use_grad_mean=True
        ).gradient_transformation()
    if mode == "skip":
        return optax.transforms.conditionally_mask(
            inner, lambda count: (count + 1) % k == 0
        )
    raise ValueError(f"mode must be 'accumulate' or 'skip', got {mode!r}")
