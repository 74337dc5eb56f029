"""FP4 QAT wired into the training loop: the factor switches on at the late start without recompiling,
is logged, and at factor 0 the QAT-built model trains exactly like the plain one."""

import json
import math

import pytest

from v4jax.config import default_config
from v4jax.train.loop import train

STEPS = 6


def small_config(**qat):
    """A one-layer CSA model, 6 steps of batch 2 x 32 bytes: every top-k keeps all 8 compressed entries,
    so the indexer's score numerics cannot change the selection (bitwise comparisons stay meaningful)."""
    config = default_config()
    config.model.update(num_layers=1, num_hash_layers=0, mtp_depth=1, index_topk=8)
    config.model.layer_kinds = ["csa"]
    t = config.train
    t.update(steps=STEPS, batch_size=2, seq_len=32, eval_every=3, log_every=1, eval_batches=1,
             checkpoint_every=STEPS, sample_tokens=2, progress=False)
    config.optim.warmup_steps = 1
    for key, value in qat.items():
        config.qat[key] = value
    return config


def records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_late_qat_switches_on_at_its_start_step(tmp_path):
    train(small_config(enabled=True, start_fraction=0.5), str(tmp_path))
    logged = {r["step"]: r for r in records(tmp_path) if "loss" in r}
    # record `s` holds the metrics of train step s - 1; QAT starts at step int(0.5 * 6) = 3
    assert [logged[s]["qat_factor"] for s in range(1, STEPS + 1)] == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert all(math.isfinite(logged[s]["loss"]) for s in logged)
    assert all(math.isfinite(r["eval_loss"]) for r in records(tmp_path) if "eval_loss" in r)


@pytest.mark.slow
def test_qat_at_factor_zero_trains_exactly_like_the_plain_model(tmp_path):
    plain = train(small_config(), str(tmp_path / "plain"))
    # start at the last step: steps 0..4 run the QAT program at factor 0
    qat = train(small_config(enabled=True, start_step=STEPS - 1), str(tmp_path / "qat"))
    plain_losses = [r["loss"] for r in plain.history if "loss" in r]
    qat_records = [r for r in qat.history if "loss" in r]
    assert [r["qat_factor"] for r in qat_records] == [0.0] * (STEPS - 1) + [1.0]
    assert [r["loss"] for r in qat_records][:STEPS - 1] == plain_losses[:STEPS - 1]  # bitwise
    assert "qat_factor" not in plain.history[0]
