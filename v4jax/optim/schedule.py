"""The learning-rate schedule shared by Muon and AdamW (the paper reuses the AdamW schedule for Muon).

"wsd" is the paper's: linear warm-up, a long constant phase, then cosine decay to
`final_lr_fraction * lr` starting at `decay_start_fraction` of training. Built from optax schedules.
"""

from __future__ import annotations

import ml_collections
import optax

from v4jax.model.config import ConfigError
from v4jax.optim.config import validate_optim_config


def learning_rate_schedule(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
    """The schedule `step -> lr` for `total_steps` optimizer steps under `config.optim` `cfg`."""
    validate_optim_config(cfg)
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, int)
        or total_steps < 1
    ):
        raise ConfigError(
            f"total_steps must be a positive integer, got {total_steps!r}"
        )
    peak, warmup = float(cfg.lr), int(cfg.warmup_steps)
    final = peak * float(cfg.final_lr_fraction)
    if warmup >= total_steps and cfg.schedule != "constant":
        raise ConfigError(
            f"config.optim.warmup_steps: {warmup} must be < total_steps ({total_steps}) for schedule {cfg.schedule!r}"
        )
    warm = (
        optax.linear_schedule(0.0, peak, warmup)
        if warmup > 0
        else optax.constant_schedule(peak)
    )
    if cfg.schedule == "constant":
        return optax.join_schedules([warm, optax.constant_schedule(peak)], [warmup])
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            peak, total_steps - warmup, alpha=final / peak
        )
        return optax.join_schedules([warm, decay], [warmup])
    decay_start = max(warmup, round(total_steps * float(cfg.decay_start_fraction)))
    decay = optax.cosine_decay_schedule(
        peak, max(1, total_steps - decay_start), alpha=final / peak
    )
    return optax.join_schedules(
        [warm, optax.constant_schedule(peak), decay], [warmup, decay_start]
    )
