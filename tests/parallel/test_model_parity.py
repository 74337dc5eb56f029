"""The whole tiny V4 (float32) on 8 fake CPU devices equals the single-device run: logits and gradients
within relative 1e-5 on four meshes, and a few optimizer steps give the same losses. Slow: each mesh is
a full compile of the model's forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from v4jax.model import ModelConfig, Transformer, presets
from v4jax.parallel import shardings as sh
from v4jax.parallel.training import MeshPlan
from v4jax.train.state import create_train_state

pytestmark = pytest.mark.slow
MESHES = [{"data": 8}, {"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2},
          # the all-to-all dispatch (v4jax.parallel.dispatch) through the config path
          {"data": 2, "expert": 4, "moe_dispatch": "all_to_all"},
          {"fsdp": 2, "expert": 2, "tensor": 2, "moe_dispatch": "all_to_all"}]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # [B, S, V]
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.from_config(presets.tiny())
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size)
    variables = model.init_variables(jax.random.key(0), tokens)

    def loss(params, buffers, tokens):
        out = model.apply({"params": params, "buffers": buffers}, tokens)
        main = nll(out.logits[:, :-1], tokens[:, 1:])
        mtp = nll(out.mtp_logits[0][:, :-2], tokens[:, 2:])
        return main + 0.3 * mtp, out.logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, logits), grads = step(variables["params"], variables["buffers"], tokens)
    return model, tokens, variables, step, value, logits, grads


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_logits_and_gradients_match_single_device(setup, mesh_cfg):
    model, tokens, variables, step, value, logits, grads = setup
    plan = MeshPlan.create(mesh_cfg, model, tokens)
    assert plan.dispatch == mesh_cfg.get("moe_dispatch", "auto")
    params = jax.device_put(variables["params"], sh.named(plan.variable_specs["params"], plan.mesh))
    buffers = jax.device_put(variables["buffers"], sh.named(plan.variable_specs["buffers"], plan.mesh))
    batch = plan.put_batch({"tokens": np.asarray(tokens)})
    (value_m, logits_m), grads_m = plan.under_mesh(step)(params, buffers, batch["tokens"])
    assert rel(logits_m, logits) < 1e-5
    assert abs(float(value_m) - float(value)) < 1e-5 * abs(float(value))
    flat_m = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_m)])
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
    assert rel(flat_m, flat) < 1e-5
    # per leaf, for leaves that carry gradient (leaves ~1e-7 of the total are float32 summation-order noise)
    total = np.linalg.norm(flat)
    for (path, gm), g in zip(jax.tree_util.tree_flatten_with_path(grads_m)[0], jax.tree.leaves(grads)):
        if np.linalg.norm(g) > 1e-3 * total:
            assert rel(gm, g) < 1e-5, jax.tree_util.keystr(path)


def test_training_steps_give_the_same_losses(setup):
    model, tokens, _, step, *_ = setup
    tx = optax.adamw(3e-3)

    def train_step(state, tokens):
        (value, _), grads = step(state.params, state.buffers, tokens)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state), value

    def run(plan):
        state, shardings = plan.init_state(lambda: create_train_state(model, tx, tokens, 0))
        fn = plan.jit_step(train_step, shardings)
        batch = plan.put_batch({"tokens": np.asarray(tokens)})["tokens"]
        losses = []
        for _ in range(3):
            state, value = fn(state, batch)
            losses.append(float(value))
        return losses, state

    single, _ = run(MeshPlan.create({}, model, tokens, devices=jax.devices()[:1]))
    sharded, state = run(MeshPlan.create({"data": 2, "expert": 4}, model, tokens))
    assert single[-1] < single[0]  # it trains
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    # the optimizer state lives split like the weights (experts over `expert`)
    mu = state.opt_state[0].mu["seg1"]["layer0"]["moe"]["experts"]["w1"]
    assert mu.sharding.spec == state.params["seg1"]["layer0"]["moe"]["experts"]["w1"].sharding.spec
    assert mu.addressable_shards[0].data.shape[1] == mu.shape[1] // 4
