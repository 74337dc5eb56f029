"""The FP4 QAT experiment: train bf16 / late-stage QAT / QAT-from-start models, then evaluate them in FP4.

    python experiments/qat/run.py train <variant>   # one training run (the three can run side by side)
    python experiments/qat/run.py analyze            # evaluations, recall, lossless blocks, plots, results.json

`train` runs the library's main job (`v4jax.train.loop.train`) on `config.py:<variant>` into
`runs/<variant>/` and saves the final params/buffers there (`final.pkl`). `analyze` evaluates, on the
same eval batches:
  bf16      the bf16-trained model as it is (plain forward)
  ptq       the same weights with routed experts packed to MXFP4 (`infer.fp4.pack_experts`) and the
            indexer q/keys Hadamard-rotated + MXFP4 fake-quantised, scores cast to bf16 (QAT factor 1)
  qat_late  late-stage QAT model, evaluated like ptq (packed FP4 experts + FP4 indexer QK)
  qat_start QAT-from-start model, evaluated like ptq
and measures the indexer top-k recall of the FP4 QK path against fp32 scores on the trained bf16
model's real activations, and the fraction of 128x128 expert-weight blocks whose MXFP4 -> FP8
conversion is lossless.
"""

from __future__ import annotations

import os
import pickle
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
sys.path.insert(0, HERE)

import config as qat_config  # experiments/qat/config.py (this folder is on sys.path)


def train_variant(variant: str) -> None:
    """Trains one variant with the library's main job and pickles its final variables."""
    import jax

    from v4jax.train.__main__ import enable_compilation_cache
    from v4jax.train.loop import train

    enable_compilation_cache()
    workdir = os.path.join(RUNS, variant)
    result = train(qat_config.get_config(variant), workdir)
    with open(os.path.join(workdir, "final.pkl"), "wb") as f:
        pickle.dump(jax.device_get(result.state.variables), f)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "train":
        train_variant(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "analyze":
        from analyze import analyze

        analyze(RUNS, HERE)
    else:
        raise SystemExit("usage: run.py train <bf16|qat_late|qat_start> | run.py analyze")
