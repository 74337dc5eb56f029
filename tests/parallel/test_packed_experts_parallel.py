"""Packed FP4 experts under an expert-parallel mesh (8 fake CPU devices): the expert-parallel path
dequantises the kernel-layout leaves and gives the single-device logits. Slow: a full model compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from v4jax.infer.fp4 import pack_experts
from v4jax.model import ModelConfig, Transformer, presets
from v4jax.parallel.training import MeshPlan

pytestmark = pytest.mark.slow


def test_packed_experts_expert_parallel_equal_single_device():
    m = presets.tiny()
    m.update(hidden_size=64, moe_intermediate_size=64)
    model = Transformer(ModelConfig.from_config(m))
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, model.cfg.vocab_size)
    v = model.init_variables(jax.random.key(0), tokens)
    packed = {"params": pack_experts(v["params"]), "buffers": v["buffers"]}
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(model.apply)(packed, tokens).logits
        plan = MeshPlan.create({"data": 2, "expert": 4}, model, tokens)
        replicated = jax.device_put(packed, NamedSharding(plan.mesh, P()))
        batch = plan.put_batch({"tokens": np.asarray(tokens)})
        got = plan.under_mesh(jax.jit(model.apply))(replicated, batch["tokens"]).logits
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 1e-5
