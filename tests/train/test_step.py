"""Loss pieces of the train step (MTP targets, masking), the MTP weight schedule, and one jitted step
on a stand-in model that speaks the model's interface (logits, mtp_logits, aux)."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from v4jax.train import step as step_lib
from v4jax.train.state import create_train_state


def test_mtp_targets_stay_inside_the_document():
    tokens = jnp.array([[10, 11, 12, 13, 20, 21, 22, 0]])
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    targets, mask = step_lib.mtp_targets(tokens, segments, 2)
    np.testing.assert_array_equal(targets[0, :6], [12, 13, 20, 21, 22, 0])
    # t=0,1 predict 12,13 (same doc); t=2,3 would cross into doc 2; t=4 predicts 22; t=5.. past the doc/end
    np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 1, 0, 0, 0])


def test_token_nll_matches_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=(2, 3))
    expected = -np.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(step_lib.token_nll(jnp.asarray(logits), jnp.asarray(targets)), expected, rtol=1e-6)


def test_paper_mtp_schedule_switches_at_lr_decay_start():
    schedule = optax.join_schedules([optax.constant_schedule(1.0), optax.cosine_decay_schedule(1.0, 10)], [30])
    start = step_lib.lr_decay_start(schedule, 40)
    assert start == 31  # lr(30) is still the peak, lr(31) is below it
    cfg = ml_collections.ConfigDict(dict(mtp_weight=0.3, mtp_weight_late=0.1, mtp_weight_schedule="paper"))
    weight = step_lib.mtp_weight_fn(cfg, start)
    assert float(weight(jnp.int32(30))) == np.float32(0.3) and float(weight(jnp.int32(31))) == np.float32(0.1)
    cfg.mtp_weight_schedule = "constant"
    assert float(step_lib.mtp_weight_fn(cfg, start)(jnp.int32(39))) == np.float32(0.3)


class StandInModel(nn.Module):
    """Embedding + dense head, one MTP head, and a fake 2-layer router (the real model's interface)."""

    vocab: int = 16
    experts: int = 4

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, routed_indices=None):
        h = nn.Embed(self.vocab, 8)(tokens)  # [B, S, 8]
        logits = nn.Dense(self.vocab)(h)  # [B, S, V]
        mtp = nn.Dense(self.vocab)(h)  # [B, S, V]
        gate = nn.Dense(self.experts)(h)  # [B, S, E]
        idx = jnp.argmax(gate, -1) if routed_indices is None else routed_indices[0, ..., 0]  # [B, S]
        load = jnp.stack([jnp.bincount(idx.ravel(), length=self.experts)] * 2).astype(jnp.float32)  # [L, E]
        aux = {"balance_loss": jnp.mean(jax.nn.softmax(gate) ** 2), "expert_load": load,
               "router_indices": jnp.broadcast_to(idx[None, ..., None], (2, *idx.shape, 1)),
               "indexer_stats": {"layer1": {"selected_mean": jnp.float32(0.5)}}}
        return types.SimpleNamespace(logits=logits, mtp_logits=(mtp,), aux=aux)


def make_step(skip_nonfinite=True):
    model, tx = StandInModel(), optax.sgd(0.1)
    bias = jnp.zeros((2, 4))
    fns = dict(learned_layers=jnp.array([False, True]), router_bias=lambda buffers: buffers["bias"],
               with_router_bias=lambda buffers, b: {"bias": b},
               update_router_bias=lambda b, load, speed, mask: b + speed * mask[:, None] * jnp.sign(load.mean(-1, keepdims=True) - load))
    train_step = step_lib.make_train_step(model, tx, lr_schedule=lambda s: 0.1, mtp_weight=lambda s: jnp.float32(0.3),
                                          balance_loss_weight=1e-4, router_bias_speed=1e-3, skip_nonfinite=skip_nonfinite, **fns)
    state = create_train_state(model, tx, jnp.zeros((2, 8), jnp.int32), seed=0)
    state = state.replace(buffers={"bias": bias})
    return model, jax.jit(train_step), state


def batch_of(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 16, size=(2, 8)).astype(np.int32)
    seg = np.ones((2, 8), np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((2, 1), np.int32)], 1)
    mask = np.ones((2, 8), np.float32)
    mask[:, -1] = 0
    return {"tokens": tokens, "segment_ids": seg, "positions": np.tile(np.arange(8, dtype=np.int32), (2, 1)),
            "targets": targets, "loss_mask": mask}


def test_train_step_combines_losses_updates_and_moves_only_learned_bias():
    model, train_step, state = make_step()
    batch = batch_of(0)
    new_state, metrics = train_step(state, batch)
    np.testing.assert_allclose(metrics["loss"], metrics["lm_loss"] + 0.3 * metrics["mtp_loss"]
                               + 1e-4 * metrics["balance_loss"], rtol=1e-6)
    assert int(new_state.step) == 1
    assert not np.allclose(new_state.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"])
    np.testing.assert_array_equal(new_state.buffers["bias"][0], 0)  # hash layer untouched
    assert np.abs(new_state.buffers["bias"][1]).max() > 0
    assert metrics["expert_load_max_over_mean"].shape == (2,)
    assert "aux/indexer_stats/layer1/selected_mean" in metrics


def test_routed_indices_reach_the_model():
    _, train_step, state = make_step()
    batch = batch_of(1)
    forced = jnp.full((2, 2, 8, 1), 3, jnp.int32)
    _, metrics = train_step(state, batch, forced)
    assert float(metrics["expert_load_max_over_mean"][0]) == 4.0  # everything on expert 3 of 4


def test_nonfinite_step_leaves_state_unchanged():
    _, train_step, state = make_step()
    poisoned = jax.tree_util.tree_map(lambda x: x, state)
    poisoned = poisoned.replace(params=jax.tree_util.tree_map(lambda p: p.at[(0,) * p.ndim].set(jnp.nan), state.params))
    before = jax.tree_util.tree_map(np.asarray, poisoned.params)
    new_state, metrics = train_step(poisoned, batch_of(2))
    assert float(metrics["skipped_update"]) == 1.0 and int(new_state.step) == 1
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), before,
                           jax.tree_util.tree_map(np.asarray, new_state.params))
