"""How often a SwiGLU clamp at limit L would bind in a trained arm: fractions of gate > L and |up| > L.

    .venv/bin/python experiments/stability/clamp_stats.py --arm=baseline --lr=1e-2 --workdir=experiments/stability/runs/lr1e-2/baseline-s0

Restores the run's latest checkpoint and runs the model on a few training batches with
`v4jax.model.moe.clamped_swiglu` wrapped (experiment-only monkeypatch, nothing in the library
changes) so that every expert's SwiGLU input reports how many of its gate values exceed L and how
many |up| values exceed L, for several L. The forward runs under `jax.disable_jit()` (the layer scan
then runs as a Python loop on concrete arrays; a `jax.debug.callback` inside flax's scan is rejected). The counts cover shared and
routed experts; routed-expert buffers may hold padding slots (zeros), which only lowers the fractions.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

LIMITS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)

    import os

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import run_arm

    from v4jax.data import build_pipeline, build_tokenizer, load_corpus
    from v4jax.model import ModelConfig, Transformer
    from v4jax.model import moe as moe_lib
    from v4jax.optim import build_optimizer
    from v4jax.train.checkpoint import Checkpointer
    from v4jax.train.state import create_train_state, init_variables

    config = run_arm.arm_config(args.arm, args.seed, args.steps, args.lr)
    t = config.train
    totals = {"n": 0.0, "gate": np.zeros(len(LIMITS)), "up": np.zeros(len(LIMITS)), "gate_max": 0.0, "up_max": 0.0}

    def record(n, gate_over, up_over, gate_max, up_max):
        totals["n"] += float(n)
        totals["gate"] += np.asarray(gate_over)
        totals["up"] += np.asarray(up_over)
        totals["gate_max"] = max(totals["gate_max"], float(gate_max))
        totals["up_max"] = max(totals["up_max"], float(up_max))

    original = moe_lib.clamped_swiglu

    def counting_swiglu(gate, up, limit):
        limits = jnp.asarray(LIMITS, jnp.float32)
        g, u = gate.astype(jnp.float32), jnp.abs(up.astype(jnp.float32))
        gate_over = jnp.sum(g[..., None] > limits, axis=tuple(range(g.ndim)))  # [len(LIMITS)]
        up_over = jnp.sum(u[..., None] > limits, axis=tuple(range(u.ndim)))  # [len(LIMITS)]
        if not isinstance(g, jax.core.Tracer):  # flax's scan also traces the body once: skip that pass
            record(g.size, gate_over, up_over, jnp.max(g), jnp.max(u))
        return original(gate, up, limit)

    model = Transformer(ModelConfig.from_config(config.model))
    init_tokens = jnp.zeros((t.batch_size, t.seq_len), jnp.int32)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), init_tokens))["params"]
    tx = build_optimizer(config.optim, abstract, t.steps)
    template = create_train_state(model, tx, init_tokens, t.seed)
    restored = Checkpointer(os.path.join(args.workdir, "checkpoints"), 1).restore_latest(template)
    if restored is None:
        raise SystemExit(f"--workdir: no checkpoint under {args.workdir}/checkpoints")
    step, state = restored[0], restored[1]
    batches = build_pipeline(config.data, tokenizer=build_tokenizer(config.data), split="train",
                             seq_len=t.seq_len, batch_size=t.batch_size, seed=t.seed + 1,
                             corpus=load_corpus(config.data))
    forward = (lambda p, b, batch: model.apply({"params": p, "buffers": b}, batch["tokens"],
                                                      segment_ids=batch["segment_ids"],
                                                      positions=batch["positions"]).logits)
    moe_lib.clamped_swiglu = counting_swiglu
    for _ in range(args.batches):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        with jax.disable_jit():
            jax.block_until_ready(forward(state.params, state.buffers, batch))
    n = max(totals["n"], 1.0)
    result = {"workdir": args.workdir, "step": int(step), "values": int(totals["n"]),
              "gate_max": totals["gate_max"], "abs_up_max": totals["up_max"],
              "fraction_gate_over": {str(L): float(c / n) for L, c in zip(LIMITS, totals["gate"])},
              "fraction_abs_up_over": {str(L): float(c / n) for L, c in zip(LIMITS, totals["up"])}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
