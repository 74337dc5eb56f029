"""build_optimizer: frozen leaves (no state, no update, not in the norm), clipping, AdamW wiring, config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.optim.fake_params import fake_params
from v4jax.model.config import ConfigError
from v4jax.optim import (
    build_optimizer,
    default_optim_config,
    learning_rate_schedule,
    param_labels,
    path_to_str,
    trainable_global_norm,
    validate_optim_config,
)
from v4jax.optim.muon import HybridMuonState


def _params():
    return jax.tree.map(jnp.asarray, fake_params())


def _small_params():
    """A slice of the tree (embedding, attention with its indexer, router): fewer leaves, faster compiles."""
    full = _params()
    layer = full["seg0"]["layer0"]
    return {
        "embed": full["embed"],
        "seg0": {
            "layer0": {"attn": layer["attn"], "moe": {"router": layer["moe"]["router"]}}
        },
    }


def _cfg(**overrides):
    cfg = default_optim_config()
    cfg.warmup_steps = 0
    cfg.update(overrides)
    return cfg


def _state_paths(state):
    return [path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]


def test_frozen_parameters_have_no_optimizer_state():
    params = _params()
    frozen_state = build_optimizer(_cfg(frozen=["/indexer/"]), params, 10).init(params)
    plain_state = build_optimizer(_cfg(), params, 10).init(params)
    assert any("/indexer/" in p for p in _state_paths(plain_state))
    assert not any("/indexer/" in p for p in _state_paths(frozen_state))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    labels = param_labels(params, _cfg())
    per_leaf = {"adamw": 2, "muon": 1}  # Adam's mu and nu; Muon's momentum
    indexer_state = sum(
        per_leaf[label] * x.size
        for (p, x), label in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(labels)
        )
        if "/indexer/" in path_to_str(p)
    )
    assert size(plain_state) - size(frozen_state) == indexer_state


def test_frozen_gradients_neither_update_nor_count_in_the_norm():
    params = _small_params()
    cfg = _cfg(frozen=["/indexer/"], grad_clip=1.0, optimizer="adamw")
    labels = param_labels(params, cfg)
    rng = np.random.default_rng(0)
    small = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.3, jnp.float32), params
    )
    huge = jax.tree.map(
        lambda g, label: g * 1e6 if label == "frozen" else g, small, labels
    )
    norm_small, norm_huge = (
        trainable_global_norm(small, labels),
        trainable_global_norm(huge, labels),
    )
    np.testing.assert_allclose(float(norm_huge), float(norm_small), rtol=1e-6)
    assert (
        float(optax.tree.norm(huge)) > 1e5
    )  # the plain norm would be dominated by frozen leaves

    tx = build_optimizer(cfg, params, 10)
    update = jax.jit(tx.update)

    def run(first_grads):
        state = tx.init(params)
        # The trainable norm is > 1, so the clip scales step 1; Adam's step-2 update depends on that scale.
        u1, state = update(first_grads, state, params)
        u2, _ = update(jax.tree.map(lambda g: 0.5 * g, small), state, params)
        return u1, u2

    (_, a2), (b1, b2) = run(small), run(huge)
    for path, label in jax.tree_util.tree_leaves_with_path(labels):
        if label == "frozen":
            assert (
                not np.asarray(_get(b1, path)).any()
                and not np.asarray(_get(b2, path)).any()
            )
        else:
            np.testing.assert_allclose(
                np.asarray(_get(b2, path)),
                np.asarray(_get(a2, path)),
                rtol=1e-5,
                atol=1e-9,
            )


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_clipping_scales_trainable_gradients_to_the_limit():
    params = _small_params()
    cfg = _cfg(grad_clip=1.0, frozen=["/indexer/"])
    labels = param_labels(params, cfg)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0, jnp.float32), params)
    # first two links of the chain: mask frozen, clip
    mask_clip = optax.chain(
        optax.masked(
            optax.set_to_zero(), jax.tree.map(lambda l: l == "frozen", labels)
        ),
        optax.clip_by_global_norm(1.0),
    )
    clipped, _ = jax.jit(mask_clip.update)(grads, mask_clip.init(params))
    assert abs(float(trainable_global_norm(clipped, labels)) - 1.0) < 1e-5


def test_adamw_partition_wiring_weight_decay_only_on_zero_gradient():
    full = _params()
    params = {"embed": full["embed"], "norm": full["norm"], "hc_head": full["hc_head"]}
    cfg = _cfg(schedule="constant", lr=0.01, weight_decay=0.1)
    tx = build_optimizer(cfg, params, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    np.testing.assert_allclose(
        np.asarray(u["embed"]["embedding"]),
        -0.01 * 0.1 * np.asarray(params["embed"]["embedding"]),
        rtol=1e-6,
    )


def test_adamw_everywhere_has_no_muon_state():
    params = _params()
    has_muon = lambda state: any(
        isinstance(x, HybridMuonState)
        for x in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, HybridMuonState)
        )
    )
    assert has_muon(build_optimizer(_cfg(), params, 10).init(params))
    assert not has_muon(
        build_optimizer(_cfg(optimizer="adamw"), params, 10).init(params)
    )


def test_wsd_schedule_shape():
    cfg = _cfg(
        schedule="wsd",
        lr=1.0,
        warmup_steps=10,
        final_lr_fraction=0.1,
        decay_start_fraction=0.8,
    )
    sched = learning_rate_schedule(cfg, 100)
    lr = np.array([float(sched(s)) for s in range(101)])
    np.testing.assert_allclose(lr[:11], np.linspace(0, 1, 11), atol=1e-6)
    np.testing.assert_allclose(lr[10:81], 1.0, atol=1e-6)
    assert np.all(np.diff(lr[80:]) < 0)
    np.testing.assert_allclose(lr[100], 0.1, atol=1e-6)
    np.testing.assert_allclose(lr[90], 0.1 + 0.9 * 0.5, atol=1e-6)


def test_cosine_and_constant_schedules():
    cos = learning_rate_schedule(_cfg(schedule="cosine", lr=2.0, warmup_steps=0), 50)
    np.testing.assert_allclose(
        [float(cos(0)), float(cos(25)), float(cos(50))], [2.0, 1.1, 0.2], atol=1e-5
    )
    const = learning_rate_schedule(
        _cfg(schedule="constant", lr=2.0, warmup_steps=4), 50
    )
    np.testing.assert_allclose(
        [float(const(2)), float(const(4)), float(const(49))], [1.0, 2.0, 2.0], atol=1e-6
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("schedule", "linear"),
        ("optimizer", "sgd"),
        ("b2", 1.0),
        ("muon_ns_dtype", "float16"),
        ("grad_clip", -1.0),
        ("frozen", ["("]),
        ("frozen", [3]),
        ("router_delay", -1),
        ("router_every", 0),
        ("router_every_mode", "sum"),
        ("warmup_steps", -1),
        ("final_lr_fraction", 2.0),
    ],
)
def test_bad_config_is_a_one_line_error_naming_the_field(field, value):
    cfg = default_optim_config()
    cfg[field] = value
    with pytest.raises(ConfigError, match=rf"^config\.optim\.{field}: ") as err:
        validate_optim_config(cfg)
    assert "\n" not in str(err.value)


def test_unknown_field_and_short_training():
    cfg = default_optim_config()
    cfg.lr_peak = 1.0
    with pytest.raises(ConfigError, match=r"config\.optim\.lr_peak"):
        validate_optim_config(cfg)
    with pytest.raises(ConfigError, match=r"config\.optim\.warmup_steps"):
        learning_rate_schedule(default_optim_config(), 50)


def test_real_model_optimizer_traces():
    """init and update trace on the real tiny model's (abstract) tree, with every option on."""
    from tests.optim.test_labels import _tiny_model_params

    params = _tiny_model_params()
    cfg = _cfg(frozen=["/indexer/"], router_delay=1, router_every=2)
    tx = build_optimizer(cfg, params, 10)
    state = jax.eval_shape(tx.init, params)
    updates, _ = jax.eval_shape(tx.update, params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
