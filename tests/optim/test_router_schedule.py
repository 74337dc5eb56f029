"""The router's own schedule: delay line, every-k (accumulate / skip), learning-rate multiplier."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from v4jax.optim import build_optimizer, default_optim_config, delay_updates, every_k

ROUTER = ("seg0", "moe", "router", "kernel")


def _params():
    rng = np.random.default_rng(0)
    return {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((12, 6)), jnp.float32)},
        "seg0": {
            "moe": {
                "router": {
                    "kernel": jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
                },
                "experts": {
                    "w1": jnp.asarray(rng.standard_normal((2, 4, 6, 5)), jnp.float32)
                },
            }
        },
    }


def _grads(n, seed=1):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(
            lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), _params()
        )
        for _ in range(n)
    ]


def _cfg(**overrides):
    cfg = default_optim_config()
    cfg.schedule, cfg.warmup_steps, cfg.grad_clip = "constant", 0, 0.0
    cfg.update(overrides)
    return cfg


def _run(cfg, grads):
    """Updates for a fixed gradient sequence at fixed params (so runs are comparable step by step)."""
    params = _params()
    tx = build_optimizer(cfg, params, total_steps=100)
    state, out = tx.init(params), []
    update = jax.jit(tx.update)
    for g in grads:
        u, state = update(g, state, params)
        out.append(u)
    return out


def _leaf(tree, path=ROUTER):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_delay_applies_the_update_computed_delta_steps_earlier(optimizer):
    grads = _grads(6)
    base = _run(_cfg(optimizer=optimizer), grads)
    delayed = _run(_cfg(optimizer=optimizer, router_delay=2), grads)
    for t in range(6):
        expected = np.zeros_like(_leaf(base[0])) if t < 2 else _leaf(base[t - 2])
        np.testing.assert_array_equal(_leaf(delayed[t]), expected)
        # the other partitions are not delayed
        np.testing.assert_array_equal(
            _leaf(delayed[t], ("seg0", "moe", "experts", "w1")),
            _leaf(base[t], ("seg0", "moe", "experts", "w1")),
        )
    assert np.abs(_leaf(base[0])).max() > 0


def test_delay_line_in_isolation():
    tx = delay_updates(optax.identity(), 3)
    state = tx.init({"w": jnp.zeros(2)})
    outs = []
    for t in range(7):
        u, state = tx.update({"w": jnp.full(2, float(t + 1))}, state)
        outs.append(float(u["w"][0]))
    assert outs == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]


def test_every_k_accumulate_uses_the_mean_gradient():
    grads = _grads(6)
    run = _run(_cfg(router_every=3, router_every_mode="accumulate"), grads)
    mean = jax.tree.map(lambda *g: sum(g) / 3, *grads[:3])
    first = _run(_cfg(), [mean])[0]
    for t in (0, 1, 3, 4):
        assert not _leaf(run[t]).any()
    np.testing.assert_allclose(_leaf(run[2]), _leaf(first), rtol=1e-5, atol=1e-7)
    assert _leaf(run[5]).any()


def test_every_k_skip_drops_the_other_gradients():
    grads = _grads(3)
    run = _run(_cfg(router_every=3, router_every_mode="skip"), grads)
    alone = _run(_cfg(), [grads[2]])[0]
    assert not _leaf(run[0]).any() and not _leaf(run[1]).any()
    np.testing.assert_allclose(_leaf(run[2]), _leaf(alone), rtol=1e-5, atol=1e-7)


def test_both_modes_agree_on_constant_gradients():
    grads = _grads(1) * 4
    acc = _run(_cfg(router_every=2, router_every_mode="accumulate"), grads)
    skip = _run(_cfg(router_every=2, router_every_mode="skip"), grads)
    for a, s in zip(acc, skip):
        np.testing.assert_allclose(_leaf(a), _leaf(s), rtol=1e-5, atol=1e-7)


def test_router_learning_rate_follows_the_global_step():
    """With every-k, the router's lr is read at the global step, not at its k-times-slower count."""
    cfg = _cfg(schedule="cosine", router_every=2, router_every_mode="skip")
    grads = _grads(1) * 4
    run = _run(cfg, grads)  # router direction computed at steps 1 and 3
    plain = _run(
        _cfg(schedule="cosine"), grads[:2]
    )  # the same two directions at steps 0 and 1
    lr = lambda step: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / 100))
    np.testing.assert_allclose(
        _leaf(run[3]), _leaf(plain[1]) * lr(3) / lr(1), rtol=1e-5, atol=1e-8
    )


def test_router_lr_multiplier():
    grads = _grads(1)
    base = _run(_cfg(), grads)[0]
    scaled = _run(_cfg(router_lr_mult=0.25), grads)[0]
    np.testing.assert_allclose(_leaf(scaled), 0.25 * _leaf(base), rtol=1e-6)
    np.testing.assert_array_equal(
        _leaf(scaled, ("embed", "embedding")), _leaf(base, ("embed", "embedding"))
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="delay"):
        delay_updates(optax.identity(), -1)
    with pytest.raises(ValueError, match="mode"):
        every_k(optax.identity(), 2, "sometimes")
