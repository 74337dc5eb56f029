"""DeepSeek-V4-Flash (284B total / 13B active) with the paper's pre-training recipe (spec section 8).

Not trainable on CPU; it validates and builds abstractly (`jax.eval_shape`), and is the starting point
for pod runs. Batch and step counts are DERIVED from the paper's token budget: 75.5M tokens per step at
the 4K stage = 18,432 sequences; 32T tokens / 75.5M = ~424k steps. The paper does not give the decay
start; 0.9 is a guess. Variant `configs/v4_flash.py:anticipatory` keeps anticipatory routing on.
"""

from v4jax.config import ConfigError, default_config
from v4jax.model import presets

VARIANTS = ("", "anticipatory")


def paper_recipe(config, *, lr: float, steps: int, batch_size: int):
    """The optimizer / loss settings shared by Flash and Pro (spec section 8.3)."""
    config.optim.optimizer = "muon"
    config.optim.lr = lr
    config.optim.schedule = "wsd"
    config.optim.warmup_steps = 2000
    config.optim.final_lr_fraction = 0.1  # cosine decay to lr / 10
    config.optim.decay_start_fraction = 0.9
    config.optim.weight_decay = 0.1
    config.optim.grad_clip = 1.0  # V3's value (GUESS that V4 keeps it)
    t = config.train
    t.steps = steps
    t.batch_size = batch_size
    t.seq_len = 4096
    t.mtp_weight = 0.3
    t.mtp_weight_late = 0.1
    t.mtp_weight_schedule = "paper"
    t.balance_loss_weight = 1e-4
    t.router_bias_speed = 1e-3
    t.checkpoint_every = 1000
    t.eval_every = 1000
    t.log_every = 10
    t.progress = False
    config.model.dtype = "bfloat16"
    return config


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ConfigError(f"configs/v4_flash.py:{arg}: unknown variant (known: {', '.join(v or '<none>' for v in VARIANTS)})")
    config = default_config()
    config.model = presets.flash()
    config = paper_recipe(config, lr=2.7e-4, steps=424_000, batch_size=18_432)
    config.stability.anticipatory_routing = arg == "anticipatory"
    return config
