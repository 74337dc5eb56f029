"""The whole optimizer: frozen leaves masked out, global-norm clip over trainable leaves, partitions.

    chain( zero frozen grads -> clip_by_global_norm (trainable only) ->
           partition{ adamw: AdamW, muon: hybrid Muon, router: delayed / every-k (lr x mult),
                      frozen: set_to_zero (no state) } )

Frozen gradients are zeroed *before* the clip, so they never inflate the norm (the pitfall of
maxtext PR #5285). `trainable_global_norm` gives the same norm for metrics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from v4jax.optim.config import validate_optim_config
from v4jax.optim.labels import param_labels, trainable_mask
from v4jax.optim.muon import scale_by_hybrid_muon
from v4jax.optim.router_schedule import delay_updates, every_k
from v4jax.optim.schedule import learning_rate_schedule


def trainable_global_norm(grads: Any, labels: Any) -> jax.Array:
    """The L2 norm of all gradient leaves whose label is not "frozen" (float32 scalar)."""
    squares = [
        jnp.sum(jnp.square(g.astype(jnp.float32)))
        for g, label in zip(jax.tree.leaves(grads), jax.tree.leaves(labels))
        if label != "frozen"
    ]
    return jnp.sqrt(sum(squares)) if squares else jnp.zeros([], jnp.float32)


def _direction(
    cfg: ml_collections.ConfigDict, kind: str
) -> optax.GradientTransformation:
    """The learning-rate-free part of an optimizer: its direction plus decoupled weight decay.

    Both AdamW and Muon end in `- lr * (direction + wd * W)`, so the learning rate is applied
    separately; the router can then run its direction every k steps while its learning rate still
    follows the global step.
    """
    if kind == "adamw" or cfg.optimizer == "adamw":
        direction = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    else:
        direction = scale_by_hybrid_muon(
            momentum=cfg.muon_momentum,
            update_rms=cfg.muon_update_rms,
            ns_dtype=jnp.dtype(cfg.muon_ns_dtype),
        )
    return optax.chain(direction, optax.add_decayed_weights(cfg.weight_decay))


def build_optimizer(
    cfg: ml_collections.ConfigDict, params: Any, total_steps: int
) -> optax.GradientTransformation:
    """The optimizer for `params` (used for labels and shapes only) under `config.optim` `cfg`."""
    validate_optim_config(cfg)
    labels = param_labels(params, cfg)
    schedule = learning_rate_schedule(cfg, total_steps)
    mult = float(cfg.router_lr_mult)
    router_schedule = schedule if mult == 1.0 else (lambda step: schedule(step) * mult)
    # The router's learning rate is read at the global step (its own counter counts every call),
    # applied to the update when it is computed; the delay line then holds it back `router_delay` steps.
    router = delay_updates(
        optax.chain(
            every_k(
                _direction(cfg, "muon"), int(cfg.router_every), cfg.router_every_mode
            ),
            optax.scale_by_learning_rate(router_schedule),
        ),
        int(cfg.router_delay),
    )
    partitions = optax.partition(
        {
            "adamw": optax.chain(
                _direction(cfg, "adamw"), optax.scale_by_learning_rate(schedule)
            ),
            "muon": optax.chain(
                _direction(cfg, "muon"), optax.scale_by_learning_rate(schedule)
            ),
            "router": router,
            "frozen": optax.set_to_zero(),
        },
        labels,
    )
    frozen = jax.tree.map(lambda trainable: not trainable, trainable_mask(labels))
    steps = [optax.masked(optax.set_to_zero(), frozen)]
    if cfg.grad_clip > 0:
        steps.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    steps.append(partitions)
    return optax.chain(*steps)
