"""Analysis of the QAT experiment's trained runs (see run.py): FP4 evaluations, indexer recall, lossless blocks,
step-time overhead, plots and `results.json`.

Everything is evaluated on the same eval batches (the eval split of the run's data pipeline, same seed).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import statistics
from typing import Any

import config as qat_config  # experiments/qat/config.py (this folder is on sys.path)
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from v4jax import quant
from v4jax.data import build_pipeline, build_tokenizer, load_corpus
from v4jax.infer.fp4 import is_expert_weight, pack_experts
from v4jax.model import ModelConfig, Transformer
from v4jax.model.compressor import Compressor, entry_visibility
from v4jax.model.indexer import Indexer
from v4jax.model.layers import Dense
from v4jax.train.loop import _bytes_per_token_ratio
from v4jax.train.step import token_nll

TRAINED = ("bf16", "qat_late", "qat_start")
EVAL_BATCHES = 8
# the FP4 inference numerics: indexer q/keys Hadamard + MXFP4, scores in bf16 (experts come packed)
FP4_POLICY = quant.QATPolicy(enabled=True, experts_format="mxfp4", indexer_format="mxfp4")


def eval_batches(config) -> tuple[list[dict[str, np.ndarray]], float]:
    """The first EVAL_BATCHES batches of the eval split, and their UTF-8 bytes per target token."""
    t = config.train
    tokenizer, corpus = build_tokenizer(config.data), load_corpus(config.data)
    it = build_pipeline(config.data, tokenizer=tokenizer, split="eval", seq_len=t.seq_len,
                        batch_size=t.batch_size, seed=t.seed, corpus=corpus)
    batches = [next(it) for _ in range(EVAL_BATCHES)]
    return batches, _bytes_per_token_ratio(tokenizer, batches)


def make_loss(model: Transformer, qat_factor: float | None):
    """jitted (variables, batch) -> (nll_sum, tokens) of `model` at a fixed QAT factor (None: plain)."""
    kwargs = {} if qat_factor is None else {"qat_factor": jnp.float32(qat_factor)}

    @jax.jit
    def loss(variables, batch):
        out = model.apply(variables, batch["tokens"], segment_ids=batch["segment_ids"],
                          positions=batch["positions"], **kwargs)
        mask = batch["loss_mask"].astype(jnp.float32)
        return jnp.sum(token_nll(out.logits, batch["targets"]) * mask), jnp.sum(mask)

    return loss


def mean_loss(loss_fn, variables, batches) -> float:
    nll = count = 0.0
    for b in batches:
        s, n = loss_fn(variables, b)
        nll, count = nll + float(s), count + float(n)
    return nll / count


def packed(variables: dict) -> dict:
    """The variables with real MXFP4 routed experts (uint8 codes + E8M0 scales)."""
    return {"params": pack_experts(variables["params"]), "buffers": variables["buffers"]}


# ---- indexer recall on real activations ---------------------------------------------------------------

def capture_indexer_inputs(model: Transformer, variables: dict, batches) -> list[dict[str, np.ndarray]]:
    """Per CSA layer and batch: the indexer's roped q [B,S,nh,hd], keys [B,N,hd], head weights [B,S,nh]
    and visibility [B,S,N]. A flax method interceptor adds them to the indexer's stats dict, which the
    model already returns (through the scanned layers) as `aux['indexer'][layer]`. The model must carry a
    QAT policy so that the indexer calls `_quantize_qk`; it runs at factor 0, on unquantised q/keys.
    """
    stack: list[dict[str, Any]] = []

    def interceptor(next_fun, args, kwargs, context):
        mod, name = context.module, context.method_name
        if isinstance(mod, Indexer) and name == "__call__":
            stack.append({})
            idx, selected, stats = next_fun(*args, **kwargs)
            return idx, selected, dict(stats, **{"captured_" + k: v for k, v in stack.pop().items()})
        if stack and isinstance(mod, Indexer) and name == "_quantize_qk":
            stack[-1]["q"], stack[-1]["kv"] = args[0], args[1]
        out = next_fun(*args, **kwargs)
        if stack and isinstance(mod, Compressor) and name == "__call__":
            stack[-1]["visible"] = entry_visibility(out, args[1])
        if stack and isinstance(mod, Dense) and mod.name == "weights_proj" and name == "__call__":
            stack[-1]["w"] = out
        return out

    def forward(variables, batch):
        with nn.intercept_methods(interceptor):
            out = model.apply(variables, batch["tokens"], segment_ids=batch["segment_ids"],
                              positions=batch["positions"], qat_factor=jnp.float32(0.0))
        return {layer: {k[len("captured_"):]: v for k, v in stats.items() if k.startswith("captured_")}
                for layer, stats in out.aux["indexer"].items()}

    fwd = jax.jit(forward)
    captured = []
    for b in batches:
        for per_layer in jax.device_get(fwd(variables, b)).values():
            captured.append({k: np.asarray(v) for k, v in per_layer.items()})
    return captured


def index_scores(q, kv, w) -> jax.Array:
    """score[b,s,n] = sum_h w*nh^-0.5 * relu(q.k) * hd^-0.5 in float32 (the indexer's formula)."""
    nh, hd = q.shape[-2:]
    qk = jnp.einsum("bshc,bnc->bshn", q.astype(jnp.float32), kv.astype(jnp.float32))  # [B, S, nh, N]
    return jnp.einsum("bshn,bsh->bsn", jax.nn.relu(qk) * hd ** -0.5, w.astype(jnp.float32) * nh ** -0.5)  # [B, S, N]


def topk_recall(captured, topk: int) -> dict[str, float]:
    """|top-k of FP4 scores ∩ top-k of fp32 scores| / k over queries with more than k visible entries.

    FP4 path: Hadamard-rotate q and keys, MXFP4 fake-quantise them (1x32 blocks, E8M0), scores cast to bf16.
    """
    hits = total = queries = 0
    for c in captured:
        visible = jnp.asarray(c["visible"])
        k = min(topk, visible.shape[-1])
        exact = index_scores(c["q"], c["kv"], c["w"])
        q4 = quant.fake_quant(quant.hadamard(jnp.asarray(c["q"])), "mxfp4")
        k4 = quant.fake_quant(quant.hadamard(jnp.asarray(c["kv"])), "mxfp4")
        fp4 = index_scores(q4, k4, c["w"]).astype(jnp.bfloat16).astype(jnp.float32)
        _, top_exact = jax.lax.top_k(jnp.where(visible, exact, -jnp.inf), k)  # [B, S, k]
        _, top_fp4 = jax.lax.top_k(jnp.where(visible, fp4, -jnp.inf), k)  # [B, S, k]
        rows = np.asarray(jnp.sum(visible, -1) > k)  # [B, S]
        same = np.asarray(jnp.any(top_fp4[..., :, None] == top_exact[..., None, :], -1).sum(-1))  # [B, S]
        hits += int(same[rows].sum())
        queries += int(rows.sum())
        total += int(rows.sum()) * k
    return {"recall": hits / max(total, 1), "queries": queries, "topk": topk}


# ---- FP4 -> FP8 lossless blocks ------------------------------------------------------------------------

def lossless_blocks_of(params: dict) -> dict[str, float]:
    """Fraction of the 128x128 blocks of all routed-expert matrices whose MXFP4 -> FP8 conversion is lossless."""
    counts = {True: [0, 0], False: [0, 0]}
    for path, w in flax.traverse_util.flatten_dict(params, sep="/").items():
        if not is_expert_weight(path):
            continue
        w_nk = jnp.swapaxes(jnp.asarray(w, jnp.float32), -1, -2)  # [..., E, out, in]: blocks along the input axis
        q = quant.quantize(w_nk, "mxfp4", axis=-1)
        for sub in (True, False):
            ok = np.asarray(quant.lossless_blocks(q, allow_subnormals=sub))
            counts[sub][0] += int(ok.sum())
            counts[sub][1] += ok.size
    return {"lossless_fraction": counts[True][0] / counts[True][1],
            "lossless_fraction_normal_fp8_only": counts[False][0] / counts[False][1], "blocks": counts[True][1]}


# ---- run histories --------------------------------------------------------------------------------------

def history(runs: str, variant: str) -> list[dict[str, Any]]:
    with open(os.path.join(runs, variant, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def step_times(records, lo: int = 0, hi: int = 10 ** 9) -> list[float]:
    """Per-window mean step times of the logged windows with lo < step <= hi (the first, compiling window out)."""
    return [r["step_time"] for r in records if "step_time" in r and lo < r["step"] <= hi and r["step"] > 5]


def plots(runs: str, out_dir: str, hist: dict, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for v in TRAINED:
        pts = [(r["step"], r["eval_loss"]) for r in hist[v] if "eval_loss" in r]
        ax.plot(*zip(*pts), marker="o", label=v)
    start = int(qat_config.LATE_START_FRACTION * qat_config.STEPS)
    ax.axvline(start, color="grey", ls=":", label=f"late QAT start (step {start})")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats/byte, training-time numerics)")
    ax.set_title("QAT experiment: eval loss during training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "eval_loss_curves.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    names = [n.split(" (")[0].split(",")[0] for n in table]  # short labels: bf16, PTQ, late QAT, QAT from start
    vals = [row["eval_loss"] for row in table.values()]
    ax.bar(names, vals, color=["tab:blue", "tab:red", "tab:orange", "tab:green"][:len(names)])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.4f}", ha="center", va="bottom")
    ax.set_ylim(min(vals) - 0.05, max(vals) + 0.03)
    ax.set_ylabel("final eval loss (nats/byte)")
    ax.set_title("final eval loss: bf16 vs FP4 inference")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "final_eval_loss.png"))
    plt.close(fig)


def analyze(runs: str, out_dir: str) -> dict[str, Any]:
    """Runs every measurement and writes results.json and the two plots into `out_dir`."""
    config = qat_config.get_config("bf16")
    mcfg = ModelConfig.from_config(config.model)
    batches, bytes_per_token = eval_batches(config)
    variables = {}
    for v in TRAINED:
        with open(os.path.join(runs, v, "final.pkl"), "rb") as f:
            variables[v] = pickle.load(f)

    plain_loss = make_loss(Transformer(mcfg), None)
    fp4_loss = make_loss(Transformer(mcfg, qat=FP4_POLICY), 1.0)
    plain = {v: mean_loss(plain_loss, variables[v], batches) for v in TRAINED}
    fp4 = {v: mean_loss(fp4_loss, packed(variables[v]), batches) for v in TRAINED}
    base = plain["bf16"]
    rows = {"bf16 (no quantisation)": plain["bf16"], "PTQ (bf16-trained, FP4 eval)": fp4["bf16"],
            "late QAT (last 15%), FP4 eval": fp4["qat_late"], "QAT from start, FP4 eval": fp4["qat_start"]}
    table = {name: {"eval_loss": loss, "bits_per_byte": loss / math.log(2) / bytes_per_token,
                    "gap_to_bf16": loss - base} for name, loss in rows.items()}
    extra = {"plain_forward_eval_loss": plain, "fp4_eval_loss": fp4}

    capture_model = Transformer(mcfg, qat=FP4_POLICY)
    recall = {v: topk_recall(capture_indexer_inputs(capture_model, variables[v], batches), mcfg.index_topk)
              for v in ("bf16", "qat_start")}
    lossless = {v: lossless_blocks_of(variables[v]["params"]) for v in TRAINED}

    hist = {v: history(runs, v) for v in TRAINED}
    start = int(qat_config.LATE_START_FRACTION * qat_config.STEPS)
    med = lambda xs: statistics.median(xs) if xs else float("nan")
    timing = {"median_step_time_bf16": med(step_times(hist["bf16"])),
              "median_step_time_qat_start": med(step_times(hist["qat_start"])),
              "qat_late_median_before_start": med(step_times(hist["qat_late"], hi=start)),
              "qat_late_median_after_start": med(step_times(hist["qat_late"], lo=start + 5))}
    timing["qat_overhead"] = timing["median_step_time_qat_start"] / timing["median_step_time_bf16"] - 1
    loop_eval = {v: [r["eval_loss"] for r in hist[v] if "eval_loss" in r][-1] for v in TRAINED}

    results = {"table": table, "extra": extra, "indexer_recall": recall, "lossless_blocks": lossless,
               "step_time": timing, "loop_final_eval_loss": loop_eval,
               "setup": {"steps": qat_config.STEPS, "late_start_step": start, "eval_batches": EVAL_BATCHES,
                         "batch_size": config.train.batch_size, "seq_len": config.train.seq_len,
                         "bytes_per_token": bytes_per_token}}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plots(runs, out_dir, hist, table)
    print(json.dumps(results, indent=2))
    return results
