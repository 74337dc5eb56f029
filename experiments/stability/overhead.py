"""Extra wall-clock cost of anticipatory routing (issue 5, item 3), measured in one process, interleaved.

    .venv/bin/python experiments/stability/overhead.py --config=configs/tiny.py --pairs=30

The machine is shared (2 CPU cores, other jobs come and go), so two separate training runs would
compare different load conditions. Here one process builds the same jitted `train_step` and
`route_step` that `v4jax.train.loop` uses and alternates, step by step (the order inside each pair
alternates too), between

* off: `train_step(state, batch)`                                   (standard routing)
* on:  `route_step(params, buffers, batch)` + `train_step(state, batch, routed_indices)`
       (the loop runs the routing-only forward before the update, not overlapped with it)

each followed by a host sync, as the loop does on every logged step. It prints the medians, their
spread and the median per-pair ratio, and writes them as JSON when `--out` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import numpy as np


def load_config(spec: str):
    """`configs/x.py[:variant]` -> ConfigDict (as the CLI's config_flags would load it)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("stability_overhead_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs after the compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from v4jax.data import build_pipeline, build_tokenizer, load_corpus
    from v4jax.model import ModelConfig, Transformer
    from v4jax.optim import build_optimizer, learning_rate_schedule
    from v4jax.train.__main__ import enable_compilation_cache
    from v4jax.train.loop import _router_bias_fns
    from v4jax.train.state import create_train_state, init_variables
    from v4jax.train.step import make_route_step, make_train_step, mtp_weight_fn

    enable_compilation_cache()
    config = load_config(args.config)
    t = config.train
    model_cfg = ModelConfig.from_config(config.model)
    model = Transformer(model_cfg)
    init_tokens = jnp.zeros((t.batch_size, t.seq_len), jnp.int32)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), init_tokens))["params"]
    tx = build_optimizer(config.optim, abstract, t.steps)
    state = create_train_state(model, tx, init_tokens, t.seed)
    train_step = jax.jit(make_train_step(
        model, tx, lr_schedule=learning_rate_schedule(config.optim, t.steps), mtp_weight=mtp_weight_fn(t, t.steps),
        balance_loss_weight=float(t.balance_loss_weight), router_bias_speed=float(t.router_bias_speed),
        skip_nonfinite=bool(config.stability.skip_nonfinite), **_router_bias_fns(model_cfg)), donate_argnums=0)
    route_step = jax.jit(make_route_step(model))
    tokenizer = build_tokenizer(config.data)
    batches = build_pipeline(config.data, tokenizer=tokenizer, split="train", seq_len=t.seq_len,
                             batch_size=t.batch_size, seed=t.seed, corpus=load_corpus(config.data))

    def off(state, batch):
        state, metrics = train_step(state, batch, None)
        jax.block_until_ready(metrics)
        return state

    def on(state, batch):
        routed = route_step(state.params, state.buffers, batch)
        state, metrics = train_step(state, batch, routed)
        jax.block_until_ready(metrics)
        return state

    times: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.warmup + args.pairs):
        order = (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))
        for name, fn in order:
            batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
            start = time.perf_counter()
            state = fn(state, batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
        if i == args.warmup - 1:
            print("compiled; timing", flush=True)
    off_t, on_t = np.asarray(times["off"]), np.asarray(times["on"])
    ratios = on_t / off_t
    result = {"config": args.config, "pairs": args.pairs,
              "off_median_s": float(np.median(off_t)), "off_p25_p75_s": np.percentile(off_t, [25, 75]).tolist(),
              "on_median_s": float(np.median(on_t)), "on_p25_p75_s": np.percentile(on_t, [25, 75]).tolist(),
              "overhead_of_medians": float(np.median(on_t) / np.median(off_t) - 1),
              "median_pair_overhead": float(np.median(ratios) - 1),
              "pair_overhead_p25_p75": (np.percentile(ratios, [25, 75]) - 1).tolist()}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
