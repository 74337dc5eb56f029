"""Compile time of the tiny model's forward+backward as depth grows, scanned vs unrolled layers.

    python experiments/benchmarks/compile_time.py [--layers 4 16] [--seq 128] [--append]

Layers beyond the tiny schedule repeat [csa, hca]; with scanning, depth adds repeats to one segment, so
compile time should stay nearly flat. Prints a table; --append adds it to experiments/benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from v4jax.model import ModelConfig, Transformer, layer_plan, presets


def build(layers: int, scan: bool) -> ModelConfig:
    m = presets.tiny()
    m.num_layers = layers
    m.layer_kinds = ["sliding", "csa"] + ["hca", "csa"] * ((layers - 2) // 2) + ["hca"] * ((layers - 2) % 2)
    m.scan_layers = scan
    return ModelConfig.from_config(m)


def compile_seconds(cfg: ModelConfig, batch: int, seq: int) -> float:
    model = Transformer(cfg)
    tokens = jnp.zeros((batch, seq), jnp.int32)
    variables = jax.eval_shape(lambda: model.init_variables(jax.random.key(0), tokens))

    def loss(params, buffers, tokens):
        out = model.apply({"params": params, "buffers": buffers}, tokens)
        return jnp.mean(out.logits) + out.aux["balance_loss"]

    step = jax.jit(jax.value_and_grad(loss))
    t = time.perf_counter()
    step.lower(variables["params"], variables["buffers"], tokens).compile()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--append", action="store_true")
    p.add_argument("--scan", choices=("both", "on", "off"), default="both")
    args = p.parse_args()
    rows = ["| layers | scan | segments | compile s (fwd+bwd) |", "|---|---|---|---|"]
    for scan in {"both": (True, False), "on": (True,), "off": (False,)}[args.scan]:
        for layers in args.layers:
            cfg = build(layers, scan)
            secs = compile_seconds(cfg, args.batch, args.seq)
            rows.append(f"| {layers} | {scan} | {len(layer_plan(cfg))} | {secs:.1f} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.append:
        header = (f"\n## Compile time, tiny fwd+bwd ({datetime.date.today()}, {platform.processor() or 'cpu'}, "
                  f"{jax.devices()[0].device_kind}, jax {jax.__version__})\n\n`{' '.join(sys.argv)}`\n\n")
        with open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
