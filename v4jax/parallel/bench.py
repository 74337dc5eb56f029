"""Expert-parallel parity and step time on the devices at hand (GPUs, or fake CPU devices).

    python -m v4jax.parallel.bench [--parity] [--scaling] [--dispatch MODES] [--out FILE]

--parity: the tiny model (float32) forward + gradients on each mesh {data=n}, {expert=n},
          {data=2, expert=n/2} vs one device: relative L2 error of logits and the worst gradient leaf.
--scaling: train-step time (forward, backward, AdamW) of a small bf16 MoE at expert = 1, 2, 4, ...
           (data = devices / expert), median of timed steps after warm-up; compile time too.
--dispatch: comma-separated MoE dispatch modes to compare (v4jax.parallel.dispatch), e.g.
           `--dispatch all_gather,all_to_all,ragged_all_to_all`; each mesh with an expert axis runs once per
           mode, in one process, so the step times compare side by side. Default: auto. A mode the platform
           refuses (ragged_all_to_all on CPU) gets a row saying so.
--grouped-impl: backend of the expert GEMMs (v4jax.kernels.grouped_matmul); auto picks XLA for the float32
           parity model and tokamax for the bf16 one on GPU/TPU when installed.
--indexer-impl: backend of the lightning indexer's scores + top-k in both models (`config.model.indexer_impl`;
           auto: v4jax.kernels.indexer's platform choice, Triton on a GPU).
Prints markdown tables row by row as they are measured (and appends each row to --out when given), so a run
cut short by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from v4jax.kernels.grouped_matmul import default_implementation
from v4jax.model import ModelConfig, Transformer, presets
from v4jax.model.config import INDEXER_IMPLS
from v4jax.parallel import shardings as sh
from v4jax.parallel.dispatch import check_dispatch, resolve_dispatch
from v4jax.parallel.training import MeshPlan
from v4jax.train.state import create_train_state


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _loss_fn(model):
    def loss(params, buffers, tokens):
        out = model.apply({"params": params, "buffers": buffers}, tokens)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))  # [B, S, V]
        nll = -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1))
        return nll, out.logits

    return loss


def _modes_for(mesh_cfg: dict, modes: list[str]) -> list[str]:
    """Every mode when the mesh has an expert axis; otherwise one run (the dispatch mode changes nothing)."""
    return modes if mesh_cfg.get("expert", 1) > 1 else modes[:1]


def _label(mode: str, n_expert: int, top_k: int) -> str:
    """The mode as given, with what "auto" resolves to on this platform."""
    if mode != "auto":
        return mode
    return f"auto ({resolve_dispatch(mode, jax.devices()[0].platform, n_expert, top_k)})"


def _with_indexer(m, indexer_impl: str):
    m.indexer_impl = indexer_impl
    return ModelConfig.from_config(m)


def parity(n: int, modes: list[str], indexer_impl: str = "auto") -> Iterator[str]:
    cfg = _with_indexer(presets.tiny(), indexer_impl)
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 64), 0, cfg.vocab_size)
    variables = model.init_variables(jax.random.key(0), tokens)
    step = jax.jit(jax.value_and_grad(_loss_fn(model), has_aux=True))
    (_, logits0), grads0 = step(variables["params"], variables["buffers"], tokens)
    gnorm = float(optax.global_norm(grads0))
    k = cfg.num_experts_per_tok
    yield "| mesh | moe dispatch | logits rel err | grads rel err (all) | worst leaf (norm > 1e-3 of total) |"
    yield "|---|---|---|---|---|"
    for mesh_cfg in ({"data": n}, {"expert": n}, {"data": 2, "expert": n // 2}):
        if min(mesh_cfg.values()) < 1 or (n < 4 and len(mesh_cfg) > 1):
            continue
        name = " x ".join(f"{k}={v}" for k, v in mesh_cfg.items())
        for mode in _modes_for(mesh_cfg, modes):
            plan = MeshPlan.create(mesh_cfg, model, tokens, devices=jax.devices()[:n], dispatch=mode)
            p = jax.device_put(variables["params"], sh.named(plan.variable_specs["params"], plan.mesh))
            b = jax.device_put(variables["buffers"], sh.named(plan.variable_specs["buffers"], plan.mesh))
            tk = plan.put_batch({"t": np.asarray(tokens)})["t"]
            try:
                (_, logits), grads = plan.under_mesh(step)(p, b, tk)
            except ValueError as err:  # a mode this platform refuses
                yield f"| {name} | {_label(mode, mesh_cfg.get('expert', 1), k)} | refused: {err} | | |"
                continue
            leaf_err = max(_rel(a, c) for a, c in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0))
                           if float(jnp.linalg.norm(c)) > 1e-3 * gnorm)
            total = _rel(np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)]),
                         np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads0)]))
            yield (f"| {name} | {_label(mode, mesh_cfg.get('expert', 1), k)} | {_rel(logits, logits0):.2e} | "
                   f"{total:.2e} | {leaf_err:.2e} |")


def small_moe(indexer_impl: str = "auto") -> ModelConfig:
    m = presets.tiny()
    m.update(hidden_size=1024, num_heads=8, head_dim=128, rope_head_dim=32, q_lora_rank=256, o_lora_rank=256,
             o_groups=2, index_head_dim=64, n_routed_experts=32, num_experts_per_tok=4,
             moe_intermediate_size=1024, dtype="bfloat16", vocab_size=4096, sliding_window=128,
             csa_ratio=4, hca_ratio=32, index_topk=64, yarn_original_max_position=2048)
    return _with_indexer(m, indexer_impl)


def scaling(n: int, batch: int, seq: int, steps: int, modes: list[str], indexer_impl: str = "auto") -> Iterator[str]:
    cfg = small_moe(indexer_impl)
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    tx = optax.adamw(1e-4)
    loss = _loss_fn(model)

    def train_step(state, tokens):
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(state.params, state.buffers, tokens)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), value

    yield (f"small MoE: d={cfg.hidden_size}, {cfg.num_layers} layers, {cfg.n_routed_experts} experts top-"
           f"{cfg.num_experts_per_tok}, I={cfg.moe_intermediate_size}, {cfg.dtype}, batch {batch} x {seq}")
    yield "| mesh | moe dispatch | first step (s, compile) | step ms (median) | tokens/s | loss first -> last |"
    yield "|---|---|---|---|---|---|"
    e = 1
    while e <= n:
        mesh_cfg = {"data": n // e, "expert": e}
        for mode in _modes_for(mesh_cfg, modes):
            yield _time_one(mesh_cfg, mode, model, tx, train_step, tokens, n, batch, seq, steps)
        e *= 2


def _time_one(mesh_cfg, mode, model, tx, train_step, tokens, n, batch, seq, steps) -> str:
    """One row of the scaling table: compile + first step, then the median of `steps` timed steps."""
    name = f"data={mesh_cfg['data']} x expert={mesh_cfg['expert']}"
    label = _label(mode, mesh_cfg["expert"], model.cfg.num_experts_per_tok)
    plan = MeshPlan.create(mesh_cfg, model, tokens[:1].repeat(batch, 0), devices=jax.devices()[:n], dispatch=mode)
    state, shardings = plan.init_state(lambda: create_train_state(model, tx, tokens, 0))
    step = plan.jit_step(train_step, shardings)
    tk = plan.put_batch({"t": np.asarray(tokens)})["t"]
    t0 = time.perf_counter()
    try:
        state, value = step(state, tk)
    except ValueError as err:  # a mode this platform refuses
        return f"| {name} | {label} | refused: {err} | | | |"
    first_loss = float(value)
    compile_s = time.perf_counter() - t0
    times, values = [], []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, value = step(state, tk)
        values.append(float(value))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return (f"| {name} | {label} | {compile_s:.1f} | {med * 1e3:.1f} | {batch * seq / med:,.0f} | "
            f"{first_loss:.4f} -> {values[-1]:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--scaling", action="store_true")
    ap.add_argument("--devices", type=int, default=len(jax.devices()))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dispatch", default="auto", help="comma-separated MoE dispatch modes to compare")
    ap.add_argument("--grouped-impl", default="auto", choices=["auto", "xla", "tokamax"],
                    help="backend of the expert GEMMs (auto: tokamax for bf16 on GPU/TPU when installed, else XLA)")
    ap.add_argument("--indexer-impl", default="auto", choices=list(INDEXER_IMPLS),
                    help="backend of the lightning indexer in both models (auto: the platform's best)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    try:
        modes = [check_dispatch(m.strip(), "--dispatch") for m in args.dispatch.split(",")]
    except ValueError as err:
        ap.error(str(err))
    if args.devices > len(jax.devices()):
        ap.error(f"--devices {args.devices}: only {len(jax.devices())} devices are visible")
    impl = None if args.grouped_impl == "auto" else args.grouped_impl
    if impl == "tokamax":
        from v4jax.kernels.grouped_matmul.api import _tokamax_ragged_dot

        if _tokamax_ragged_dot() is None:
            ap.error("--grouped-impl tokamax: tokamax does not import here (pip install '.[cuda]')")
    header = (f"{datetime.date.today()} {jax.devices()[0].device_kind} x{args.devices}, jax {jax.__version__}, "
              f"expert GEMMs: {args.grouped_impl}, indexer: {args.indexer_impl}")
    sections = [[header]]
    if args.parity:
        sections.append(parity(args.devices, modes, args.indexer_impl))
    if args.scaling:
        sections.append(scaling(args.devices, args.batch, args.seq, args.steps, modes, args.indexer_impl))
    with default_implementation(impl):
        for section in sections:  # each row is printed (and appended to --out) as soon as it is measured
            for line in section:
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n")


if __name__ == "__main__":
    main()
