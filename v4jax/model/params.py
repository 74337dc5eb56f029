"""Parameter counts from abstract shapes (`jax.eval_shape`: nothing is allocated), total and per token."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from v4jax.model.config import ModelConfig
from v4jax.model.transformer import Transformer


def abstract_params(cfg: ModelConfig) -> dict:
    model = Transformer(cfg)
    shapes = jax.eval_shape(lambda: model.init_variables(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    return shapes["params"]


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{'total', 'mtp', 'main', 'active', 'embedding'}: parameter counts of a config.

    `active` counts what one token of the main model touches: everything except the embedding table and
    the routed experts it does not select (K of E per layer). `mtp` is the MTP blocks' own parameters
    (the embedding and head are shared with the main model).
    """
    flat = flax.traverse_util.flatten_dict(abstract_params(cfg), sep="/")
    total = mtp = routed = 0
    for path, leaf in flat.items():
        n = int(np.prod(leaf.shape))
        total += n
        if path.startswith("mtp"):
            mtp += n
        elif "/moe/experts/" in path:
            routed += n
    embedding = cfg.vocab_size * cfg.hidden_size
    main = total - mtp
    active = main - embedding - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return {"total": total, "main": main, "mtp": mtp, "active": active, "embedding": embedding}
