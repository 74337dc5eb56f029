"""Counts loss spikes in the stability arms' metrics.jsonl, writes the table, results.json and plots.

    .venv/bin/python experiments/stability/analyze.py RUNS [OUT.json] [OUT.png] [MAX_STEP]

MAX_STEP (optional) cuts every run at that step, so that unfinished arms compare at equal length
(the final eval loss then exists only for runs that reached their last step).

Each run directory is named `<arm>-s<seed>` and holds the `metrics.jsonl` that `run_arm.py` wrote
(one record per step). A spike is what the library's `SpikeDetector` with its default thresholds
(z-score > 4 over the last 50 good losses, after 20 of them) calls one, replayed offline over the
total training loss; the "largest spike" is max_t loss_t / median(previous 50 finite losses).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ARM_ORDER = ("baseline", "clamp", "router_delay", "anticipatory", "clamp_anticip")


def read_run(path: str) -> list[dict]:
    """The per-step records of one run (last write of a step wins)."""
    by_step: dict[int, dict] = {}
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def spikes_of(steps: list[int], losses: list[float]) -> tuple[list[int], int, float, int]:
    """(spike steps, nonfinite count, largest loss / rolling median, step of that maximum)."""
    from v4jax.train.stability import SpikeDetector, default_stability_config

    cfg = default_stability_config()
    cfg.spike_detection = True
    cfg.max_rollbacks = 0  # offline: only count
    detector = SpikeDetector(cfg)
    spike_steps, largest, largest_at, finite_history = [], 1.0, -1, []
    for step, loss in zip(steps, losses):
        if math.isfinite(loss) and len(finite_history) >= cfg.min_history:
            ratio = loss / float(np.median(finite_history[-cfg.spike_window:]))
            if ratio > largest:
                largest, largest_at = ratio, step
        event = detector.observe(step, loss)
        if event is not None and event.kind == "spike":
            spike_steps.append(step)
        if math.isfinite(loss):
            finite_history.append(loss)
    return spike_steps, detector.nonfinite_count, largest, largest_at


def summarise(run_dir: str, max_step: int | None = None) -> dict:
    """The table row of one run (records after `max_step` ignored)."""
    records = [r for r in read_run(run_dir) if max_step is None or int(r["step"]) <= max_step]
    steps = [int(r["step"]) for r in records]
    losses = [float(r["loss"]) for r in records]
    spike_steps, nonfinite, largest, largest_at = spikes_of(steps, losses)
    lm = [float(r["lm_loss"]) for r in records if math.isfinite(float(r["lm_loss"]))]
    evals = [float(r["eval_loss"]) for r in records if "eval_loss" in r]
    sources = {r.get("routing_source", "current") for r in records[1:]}
    return {"steps": steps[-1] if steps else 0, "spikes": len(spike_steps), "spike_steps": spike_steps,
            "nonfinite": nonfinite, "largest_spike": largest, "largest_spike_step": largest_at,
            "final_train_loss": float(np.mean(lm[-10:])) if lm else float("nan"),
            "final_eval_loss": evals[-1] if evals else float("nan"),
            "median_step_time": float(np.median([r["step_time"] for r in records[5:]])) if len(records) > 5 else None,
            "routing_sources": sorted(sources), "losses": losses, "loss_steps": steps}


def plot(results: dict[str, dict], path: str) -> None:
    """One panel per arm: total loss per step for each seed, detected spikes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARM_ORDER if any(k.startswith(a + "-s") for k in results)]
    fig, axes = plt.subplots(len(arms), 1, figsize=(8, 2.0 * len(arms)), sharex=True, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, arm in zip(axes, arms):
        for name in sorted(k for k in results if k.startswith(arm + "-s")):
            r = results[name]
            ax.plot(r["loss_steps"], r["losses"], lw=0.7, label=name.split("-")[-1])
            at = {s: v for s, v in zip(r["loss_steps"], r["losses"])}
            xs = list(r["spike_steps"])
            ax.plot(xs, [at[s] for s in xs], "x", color="red", ms=6)
        ax.set_title(arm, fontsize=9, loc="left")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("step (red x: spike by SpikeDetector defaults)")
    finite = [v for r in results.values() for v in r["losses"] if math.isfinite(v)]
    if finite:
        axes[0].set_ylim(min(finite) * 0.95, min(max(finite), np.percentile(finite, 99.5) * 1.5))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str]) -> int:
    runs = argv[0] if argv else os.path.join(HERE, "runs")
    out_json = argv[1] if len(argv) > 1 else os.path.join(HERE, "results.json")
    out_png = argv[2] if len(argv) > 2 else os.path.join(HERE, "loss_curves.png")
    max_step = int(argv[3]) if len(argv) > 3 else None
    results = {}
    for name in sorted(os.listdir(runs)):
        if os.path.exists(os.path.join(runs, name, "metrics.jsonl")):
            results[name] = summarise(os.path.join(runs, name), max_step)
    if not results:
        raise SystemExit(f"no runs with metrics.jsonl under {runs}")
    plot(results, out_png)
    print("| run | steps | spikes (steps) | nonfinite | largest spike (x median, step) | final train loss | final eval loss | median step s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in sorted(results.items(), key=lambda kv: (ARM_ORDER.index(kv[0].rsplit("-s", 1)[0]), kv[0])):
        spikes = f"{r['spikes']} ({', '.join(map(str, r['spike_steps'][:8]))}{'...' if r['spikes'] > 8 else ''})"
        print(f"| {name} | {r['steps']} | {spikes} | {r['nonfinite']} | {r['largest_spike']:.2f} @ {r['largest_spike_step']} "
              f"| {r['final_train_loss']:.3f} | {r['final_eval_loss']:.3f} | {r['median_step_time'] or float('nan'):.3f} |")
    with open(out_json, "w") as f:
        json.dump({k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "loss_steps")}
                   for k, v in results.items()}, f, indent=1)
    print(f"wrote {out_json} and {out_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
