"""Benchmark: compile time and step time of the optimizer update (Muon vs AdamW) on a model's tree.

    python -m v4jax.optim.bench [--layers 4 --experts 16 --vocab 32768]

Builds the parameter shapes of a Flash-shaped model (d = 4096, the released projection sizes) with
fewer layers/experts so it fits one accelerator, then times `jax.jit(tx.update)` for AdamW
everywhere, Muon with float32 Newton-Schulz and Muon with bfloat16 Newton-Schulz. Prints a table
(median of the timed steps); the update's share of a train step is what matters for speed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from v4jax.model import ModelConfig, Transformer, presets
from v4jax.optim import build_optimizer, default_optim_config, param_labels


def _model_shapes(layers: int, experts: int, vocab: int, scale_down: bool = False):
    m = presets.flash()
    if scale_down:  # a CPU smoke run of this script, not a measurement
        m.update(
            hidden_size=256,
            num_heads=8,
            q_lora_rank=64,
            o_lora_rank=64,
            moe_intermediate_size=128,
            index_n_heads=4,
            head_dim=128,
            index_head_dim=64,
            hc_mult=2,
        )
    kinds = ["sliding", "sliding"] + ["csa", "hca"] * layers
    m.update(
        num_layers=layers,
        n_routed_experts=experts,
        vocab_size=vocab,
        num_hash_layers=min(1, layers),
    )
    m.layer_kinds = kinds[:layers]
    model = Transformer(ModelConfig.from_config(m))
    tokens = jnp.zeros((1, 256), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]


def _time_update(cfg, shapes, steps: int) -> tuple[float, float]:
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes)
    key = jax.random.PRNGKey(1)
    grads = jax.tree.map(
        lambda s: jax.random.normal(key, s.shape, s.dtype) * 1e-3, shapes
    )
    tx = build_optimizer(cfg, shapes, 1000)
    state = jax.jit(tx.init)(params)
    start = time.perf_counter()
    update = jax.jit(tx.update, donate_argnums=1).lower(grads, state, params).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _, state = update(grads, state, params)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times[1:] or times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny widths, to check the script runs"
    )
    args = parser.parse_args()
    shapes = _model_shapes(args.layers, args.experts, args.vocab, args.smoke)
    labels = jax.tree.leaves(param_labels(shapes, default_optim_config()))
    sizes = [x.size for x in jax.tree.leaves(shapes)]
    muon_params = sum(
        s for s, label in zip(sizes, labels) if label in ("muon", "router")
    )
    print(
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; {len(sizes)} leaves, "
        f"{sum(sizes) / 1e9:.3f} B params ({muon_params / 1e9:.3f} B under Muon)"
    )
    print(f"{'optimizer':<22}{'compile s':>10}{'step ms':>10}{'ratio':>8}")
    rows = []
    for name, overrides in [
        ("adamw", {"optimizer": "adamw"}),
        ("muon (f32 NS)", {}),
        ("muon (bf16 NS)", {"muon_ns_dtype": "bfloat16"}),
    ]:
        cfg = default_optim_config()
        cfg.warmup_steps = 10
        cfg.update(overrides)
        rows.append((name, *_time_update(cfg, shapes, args.steps)))
    base = rows[0][2]
    for name, compile_s, step_s in rows:
        print(f"{name:<22}{compile_s:>10.2f}{step_s * 1e3:>10.2f}{step_s / base:>8.2f}")


if __name__ == "__main__":
    main()
