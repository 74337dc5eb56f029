"""The QAT experiment's configs: a 2-layer CSA V4 (bf16 compute, byte vocab) sized for a loaded 2-core CPU.

    python -m v4jax.train --config=experiments/qat/config.py:<variant> --workdir=experiments/qat/runs/<variant>

Variants: "bf16" (no QAT; also the source of the post-training-quantised model), "qat_late" (FP4 QAT of
the routed experts and the indexer QK path over the last 15% of the steps), "qat_start" (QAT from step 0).
Same seed, data and optimizer for all three; only `config.qat` differs.
"""

from v4jax.config import ConfigError, default_config

VARIANTS = ("bf16", "qat_late", "qat_start")
STEPS = 200
LATE_START_FRACTION = 0.85


def get_config(arg=None):
    arg = arg or "bf16"
    if arg not in VARIANTS:
        raise ConfigError(f"experiments/qat/config.py:{arg}: unknown variant (known: {', '.join(VARIANTS)})")
    config = default_config()
    m = config.model
    # the tiny preset with 2 main layers, both CSA (two indexers to measure), and bf16 compute
    m.update(num_layers=2, num_hash_layers=1, mtp_layer_kind="csa", dtype="bfloat16")
    m.layer_kinds = ["csa", "csa"]
    t = config.train
    t.steps = STEPS
    t.batch_size = 8
    t.seq_len = 64
    t.checkpoint_every = STEPS
    t.eval_every = 25
    t.eval_batches = 4
    t.log_every = 5
    t.sample_tokens = 40
    t.sample_prompt = "def "
    t.progress = False
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 20
    if arg != "bf16":
        config.qat.enabled = True
        if arg == "qat_late":
            config.qat.start_fraction = LATE_START_FRACTION
        else:
            config.qat.start_step = 0
    return config
