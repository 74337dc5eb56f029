"""DeepSeek-V4-Pro (1.6T total / 49B active) with the paper's pre-training recipe (spec section 8).

Not trainable on CPU; it validates and builds abstractly. DERIVED: 94.4M tokens per step at the 4K
stage = 23,040 sequences; 33T tokens / 94.4M = ~350k steps. Shares `paper_recipe` with v4_flash.py.
"""

import os
import sys

from v4jax.config import ConfigError, default_config
from v4jax.model import presets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from v4_flash import paper_recipe  # noqa: E402  (configs/ is not a package; big_vision style)

VARIANTS = ("", "anticipatory")


def get_config(arg=None):
    arg = arg or ""
    if arg not in VARIANTS:
        raise ConfigError(f"configs/v4_pro.py:{arg}: unknown variant (known: {', '.join(v or '<none>' for v in VARIANTS)})")
    config = default_config()
    config.model = presets.pro()
    config = paper_recipe(config, lr=2.0e-4, steps=350_000, batch_size=23_040)
    config.stability.anticipatory_routing = arg == "anticipatory"
    return config
