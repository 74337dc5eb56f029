"""The default main job: the tiny V4 (every mechanism on) on the embedded stdlib corpus, 2 CPU cores.

    python -m v4jax.train --config=configs/tiny.py --workdir=runs/tiny
    python -m v4jax.train --config=configs/tiny.py:anticipatory --workdir=runs/tiny-ar

Variants (`configs/tiny.py:<arg>`): "" (default), "anticipatory" (anticipatory routing always on),
"paper_mtp" (MTP weight 0.3 -> 0.1 at the LR decay start).
"""

from v4jax.config import ConfigError, default_config

VARIANTS = ("", "anticipatory", "paper_mtp")


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ConfigError(f"configs/tiny.py:{arg}: unknown variant (known: {', '.join(v or '<none>' for v in VARIANTS)})")
    config = default_config()
    t = config.train
    t.steps = 300
    t.batch_size = 8
    t.seq_len = 128
    t.checkpoint_every = 50
    t.eval_every = 100
    t.eval_batches = 8
    t.log_every = 10
    t.sample_tokens = 120
    t.sample_prompt = "def "
    config.optim.lr = 3e-3
    config.optim.warmup_steps = 50
    if arg == "anticipatory":
        config.stability.anticipatory_routing = True
    if arg == "paper_mtp":
        t.mtp_weight_schedule = "paper"
    return config
