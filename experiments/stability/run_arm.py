"""Trains one arm of the training-stability experiment (issue 5, item 6) into a workdir.

    .venv/bin/python experiments/stability/run_arm.py --arm=baseline --seed=0 --workdir=experiments/stability/runs/baseline-s0

The setting is deliberately unstable so that loss spikes show up on 2 CPU cores within a few hundred
steps: a 2-layer MoE (both layers learned routing, no hash layer, no MTP), AdamW at a high learning
rate with no gradient clipping and no warm-up decay, small batches. The arms differ only in the
stability mechanism they switch on; seed, data and everything else are shared:

* baseline      - no SwiGLU clamp (`model.swiglu_limit=0`), standard routing
* clamp         - SwiGLU clamp at `--clamp` (default the paper's 10, which hardly binds at this scale;
                  the README's lr 3e-2 and 1e-1 runs use --clamp=1.0)
* router_delay  - router updates applied `ROUTER_DELAY` steps late (`optim.router_delay`)
* anticipatory  - anticipatory routing always on (`stability.anticipatory_routing`, delta 1)
* clamp_anticip - clamp + anticipatory routing

Nothing here changes the library: every arm is a `v4jax.train.loop.train` call on an overridden
config; spike detection stays off in training (no rollbacks), spikes are counted offline by
`analyze.py` with `SpikeDetector`'s default thresholds.
"""

from __future__ import annotations

import argparse
import sys

import ml_collections

ARMS = ("baseline", "clamp", "router_delay", "anticipatory", "clamp_anticip")
CLAMP_LIMIT = 10.0
ROUTER_DELAY = 2


def base_config(seed: int, steps: int, lr: float) -> ml_collections.ConfigDict:
    """The shared, spike-prone setting (see the module docstring)."""
    from v4jax.config import default_config

    config = default_config()
    m = config.model
    m.hidden_size, m.num_layers, m.num_heads, m.head_dim, m.rope_head_dim = 64, 2, 2, 32, 8
    m.q_lora_rank, m.o_lora_rank, m.o_groups = 32, 32, 2
    m.layer_kinds = ("sliding", "sliding")
    m.num_hash_layers, m.mtp_depth = 0, 0
    m.n_routed_experts, m.num_experts_per_tok, m.moe_intermediate_size = 8, 2, 64
    m.swiglu_limit = 0.0
    t = config.train
    t.steps, t.batch_size, t.seq_len, t.seed = steps, 8, 64, seed
    t.log_every, t.eval_every, t.checkpoint_every, t.eval_batches = 1, steps, steps, 8
    t.sample_tokens = 1
    o = config.optim
    o.optimizer, o.lr, o.schedule, o.warmup_steps, o.grad_clip = "adamw", lr, "constant", 10, 0.0
    return config


def arm_config(arm: str, seed: int, steps: int, lr: float) -> ml_collections.ConfigDict:
    """`base_config` with the arm's stability mechanism switched on."""
    if arm not in ARMS:
        raise ValueError(f"--arm: must be one of {ARMS}, got {arm!r}")
    config = base_config(seed, steps, lr)
    if arm in ("clamp", "clamp_anticip"):
        config.model.swiglu_limit = CLAMP_LIMIT
    if arm == "router_delay":
        config.optim.router_delay = ROUTER_DELAY
    if arm in ("anticipatory", "clamp_anticip"):
        config.stability.anticipatory_routing = True
    return config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", required=True, choices=ARMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--clamp", type=float, default=CLAMP_LIMIT)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    config = arm_config(args.arm, args.seed, args.steps, args.lr)
    if config.model.swiglu_limit:
        config.model.swiglu_limit = args.clamp
    from v4jax.train.__main__ import enable_compilation_cache
    from v4jax.train.loop import train

    enable_compilation_cache()  # the arms share most compiled steps: reruns skip the compile
    train(config, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
