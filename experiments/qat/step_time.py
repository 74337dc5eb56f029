"""QAT step-time overhead on CPU, measured in one process: the plain and the QAT (factor 1) train steps of the
experiment's model, compiled once each, then timed in alternating blocks on the same batch so that the load
from other processes hits both alike.

    python experiments/qat/step_time.py   # -> step_time.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import config as qat_config  # experiments/qat/config.py (this folder is on sys.path)
import jax
import jax.numpy as jnp

from v4jax import quant
from v4jax.data import build_pipeline, build_tokenizer, load_corpus
from v4jax.model import ModelConfig, Transformer
from v4jax.optim import build_optimizer, learning_rate_schedule
from v4jax.train.loop import _router_bias_fns
from v4jax.train.state import create_train_state
from v4jax.train.step import make_train_step, mtp_weight_fn

BLOCKS, STEPS_PER_BLOCK = 6, 3


def build_step(config, qat: bool):
    """(jitted train step, initial state) for the experiment's model, QAT at factor 1 or off."""
    t = config.train
    mcfg = ModelConfig.from_config(config.model)
    policy = quant.QATPolicy(enabled=True)
    model = Transformer(mcfg, qat=policy) if qat else Transformer(mcfg)
    tokens = jnp.zeros((t.batch_size, t.seq_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init_variables(jax.random.PRNGKey(0), tokens))["params"]
    tx = build_optimizer(config.optim, params, t.steps)
    step = make_train_step(model, tx, lr_schedule=learning_rate_schedule(config.optim, t.steps),
                           mtp_weight=mtp_weight_fn(t, t.steps), balance_loss_weight=float(t.balance_loss_weight),
                           router_bias_speed=float(t.router_bias_speed),
                           qat_factor=(lambda s: jnp.float32(1.0)) if qat else None, **_router_bias_fns(mcfg))
    return jax.jit(step), create_train_state(model, tx, tokens, t.seed)


def main() -> None:
    config = qat_config.get_config("bf16")
    t = config.train
    tokenizer, corpus = build_tokenizer(config.data), load_corpus(config.data)
    batch = next(build_pipeline(config.data, tokenizer=tokenizer, split="train", seq_len=t.seq_len,
                                batch_size=t.batch_size, seed=t.seed, corpus=corpus))
    runs = {name: list(build_step(config, name == "qat")) for name in ("plain", "qat")}
    for name, (step, state) in runs.items():  # compile + one warm step each
        t0 = time.perf_counter()
        runs[name][1], m = step(state, batch)
        jax.block_until_ready(m)
        print(f"{name}: first step (compile) {time.perf_counter() - t0:.1f} s", flush=True)
    times = {"plain": [], "qat": []}
    for _ in range(BLOCKS):
        for name in ("plain", "qat"):
            step, state = runs[name]
            for _ in range(STEPS_PER_BLOCK):
                t0 = time.perf_counter()
                state, m = step(state, batch)
                jax.block_until_ready(m)
                times[name].append(time.perf_counter() - t0)
            runs[name][1] = state
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"median_step_time_plain": med["plain"], "median_step_time_qat": med["qat"],
           "qat_overhead": med["qat"] / med["plain"] - 1, "steps_each": BLOCKS * STEPS_PER_BLOCK, "times": times}
    with open(os.path.join(HERE, "step_time.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: v for k, v in out.items() if k != "times"}))


if __name__ == "__main__":
    main()
