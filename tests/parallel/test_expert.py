"""Expert-parallel routed experts (shard_map, all-gather dispatch, psum_scatter combine) against the
single-device path of `v4jax.model.moe.Experts`: values and gradients on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.model import ModelConfig, presets
from v4jax.model.moe import Experts
from v4jax.parallel import ShardingRules, make_mesh
from v4jax.parallel import shardings as sh
from v4jax.parallel.expert import expert_parallel_active, routed_experts_parallel

MESHES = [{"data": 8}, {"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}]
T = 64


def rel(a, b):
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.from_config(presets.tiny())  # float32, 8 experts, top-2
    module = Experts(cfg)
    kx, kr, kw, ki = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (T, cfg.hidden_size), jnp.float32)
    # distinct experts per token; skew the choice so some experts get many rows and some none on a shard
    logits = jax.random.normal(kr, (T, cfg.n_routed_experts)) + jnp.linspace(0, 2, cfg.n_routed_experts)
    idx = jax.lax.top_k(logits, cfg.num_experts_per_tok)[1].astype(jnp.int32)
    weights = jax.random.uniform(kw, (T, cfg.num_experts_per_tok), minval=0.1, maxval=1.0)
    params = module.init(ki, x, idx, weights)["params"]
    params = jax.tree.map(lambda p: p.unbox() if hasattr(p, "unbox") else p, params,
                          is_leaf=lambda p: hasattr(p, "unbox"))
    # scale weights up so the SwiGLU clamp (limit 10) is actually hit for some rows
    params = jax.tree.map(lambda p: p * 40.0, params)

    cotangent = jax.random.normal(jax.random.key(4), x.shape)

    def objective(params, x, weights):
        y = module.apply({"params": params}, x, idx, weights)  # [T, d]
        return jnp.sum(y * cotangent), y

    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))
    (_, y), grads = step(params, x, weights)
    return cfg, module, params, x, idx, weights, step, y, grads


def test_single_device_path_is_untouched(setup):
    assert not expert_parallel_active()
    cfg, _, params, x, idx, weights, _, y, _ = setup
    # an independent dense reference: every token through its K experts, one by one
    w1, w3, w2 = params["w1"], params["w3"], params["w2"]
    ref = np.zeros(y.shape, np.float64)
    for t in range(T):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            g = np.asarray(x[t], np.float64) @ np.asarray(w1[e], np.float64)
            u = np.asarray(x[t], np.float64) @ np.asarray(w3[e], np.float64)
            g, u = np.minimum(g, cfg.swiglu_limit), np.clip(u, -cfg.swiglu_limit, cfg.swiglu_limit)
            h = g / (1 + np.exp(-g)) * u * float(weights[t, k])
            ref[t] += h @ np.asarray(w2[e], np.float64)
    assert np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref) < 1e-5


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_expert_parallel_matches_single_device(setup, mesh_cfg):
    cfg, _, params, x, _, weights, step, y, grads = setup
    mesh, rules = make_mesh(mesh_cfg), ShardingRules()
    specs = sh.specs_from_logical(params, {"w1": ("experts", "embed", "mlp"), "w3": ("experts", "embed", "mlp"),
                                           "w2": ("experts", "mlp", "embed")}, rules, mesh)
    specs = jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s), specs, is_leaf=lambda s: isinstance(s, tuple))
    p = jax.device_put(params, sh.named(specs, mesh))
    tok = jax.sharding.NamedSharding(mesh, sh.batch_spec(rules, mesh, 2, T))
    xs, ws = jax.device_put(x, tok), jax.device_put(weights, tok)
    with jax.set_mesh(mesh):
        (_, y_mesh), g_mesh = step(p, xs, ws)
    assert rel(y_mesh, y) < 1e-5
    for a, b in zip(jax.tree.leaves(g_mesh), jax.tree.leaves(grads)):
        assert rel(a, b) < 1e-5
    if mesh_cfg.get("expert", 1) > 1:  # the experts really are split: each device holds E / expert of them
        shard = p["w1"].addressable_shards[0].data
        assert shard.shape[0] == cfg.n_routed_experts // mesh_cfg["expert"]


def test_tokens_must_split_over_the_batch_axes(setup):
    _, _, params, x, idx, weights, *_ = setup
    mesh = make_mesh({"expert": 8})
    with pytest.raises(ValueError, match="do not split over batch axes"):
        routed_experts_parallel(x[:12], idx[:12], weights[:12], params["w1"], params["w3"], params["w2"],
                                jax.nn.relu, ShardingRules(), mesh)
