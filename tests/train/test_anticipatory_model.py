"""Anticipatory routing on the real model: the selection used at step t is the one computed with the
parameters of step t-1 (checked against a recomputation from those saved parameters), while the
combine weights come from the current router."""

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.model import ModelConfig, Transformer, learned_router_mask, presets
from v4jax.train.step import make_route_step


def test_step_t_uses_the_selection_of_step_t_minus_1():
    cfg = ModelConfig.from_config(presets.tiny())
    model = Transformer(cfg)
    key0, key1 = jax.random.split(jax.random.key(0))
    batch0 = jax.random.randint(key0, (2, 32), 0, cfg.vocab_size)
    batch1 = jax.random.randint(key1, (2, 32), 0, cfg.vocab_size)
    v = model.init_variables(jax.random.key(1), batch0)
    route = jax.jit(make_route_step(model))
    seg = jnp.ones_like(batch1)
    pos = jnp.broadcast_to(jnp.arange(32), batch1.shape)
    batch = {"tokens": batch1, "segment_ids": seg, "positions": pos}
    saved = jax.tree.map(jnp.copy, v["params"])  # the parameters of step t-1
    cached = route(v["params"], v["buffers"], batch)  # anticipation forward at step t-1

    # the parameters of step t: every leaf moved by noise of its own scale, so that the router really moves (a
    # large SGD step did the same, at the cost of compiling the model's backward pass, most of this test's minute)
    leaves, tree = jax.tree.flatten(v["params"])
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params1 = jax.tree.unflatten(tree, [p + 0.5 * (jnp.std(p) + 1e-2) * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])

    apply = jax.jit(model.apply)
    fresh = apply({"params": params1, "buffers": v["buffers"]}, batch1, segment_ids=seg, positions=pos)
    used = apply({"params": params1, "buffers": v["buffers"]}, batch1, segment_ids=seg, positions=pos,
                 routed_indices=cached)
    learned = learned_router_mask(cfg)
    got = np.asarray(used.aux["router_indices"])
    np.testing.assert_array_equal(got[learned], np.asarray(cached)[learned])
    np.testing.assert_array_equal(np.asarray(route(saved, v["buffers"], batch)), np.asarray(cached))
    assert np.any(np.asarray(fresh.aux["router_indices"])[learned] != got[learned])  # the router did move
    # combine weights: the current router's affinities at the cached picks, renormalised, x scaling factor
    assert np.allclose(np.asarray(used.aux["router_weights"]).sum(-1)[learned], cfg.routed_scaling_factor, rtol=1e-5)
    assert not np.allclose(np.asarray(used.aux["router_weights"]), np.asarray(
        apply(v, batch1, segment_ids=seg, positions=pos, routed_indices=cached).aux["router_weights"]))
