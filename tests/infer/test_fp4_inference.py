"""Inference on packed FP4 experts equals the QAT fake-quant forward; expert memory drops ~3.7x vs bf16."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import quant
from v4jax.infer.fp4 import expert_bytes, pack_experts
from v4jax.model import ModelConfig, Transformer, presets


@pytest.fixture(scope="module")
def setup():
    m = presets.tiny()
    m.update(hidden_size=64, moe_intermediate_size=64)
    cfg = ModelConfig.from_config(m)
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, cfg.vocab_size)
    return cfg, tokens, Transformer(cfg).init_variables(jax.random.key(0), tokens)


def test_packed_logits_equal_fake_quant_logits(setup):
    cfg, tokens, v = setup
    experts_only = quant.QATPolicy(enabled=True, indexer_format=None, index_scores_bf16=False)
    with jax.default_matmul_precision("highest"):
        fq = jax.jit(Transformer(cfg, qat=experts_only).apply)(v, tokens).logits
        packed = {"params": pack_experts(v["params"]), "buffers": v["buffers"]}
        pk = jax.jit(Transformer(cfg).apply)(packed, tokens).logits
        base = jax.jit(Transformer(cfg).apply)(v, tokens).logits
    np.testing.assert_allclose(pk, fq, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(fq - base))) > 1e-3  # quantisation really changed the experts


def test_packed_experts_run_on_the_fp4_kernels(setup):
    """The MoE's packed experts go through `grouped_matmul` -> our FP4 grouped kernel (Triton, interpret
    mode here; asserted by the pallas_call in the program) with the numbers of the XLA dequantize path."""
    cfg, tokens, v = setup
    packed = {"params": pack_experts(v["params"]), "buffers": v["buffers"]}
    kernel_cfg = dataclasses.replace(cfg, fp4_impl="triton", fp4_interpret=True)
    fwd = jax.jit(Transformer(kernel_cfg).apply)
    assert "fp4_grouped_matmul_triton" in str(jax.make_jaxpr(fwd)(packed, tokens))
    with jax.default_matmul_precision("highest"):
        got = fwd(packed, tokens).logits
        ref = jax.jit(Transformer(dataclasses.replace(cfg, fp4_impl="xla")).apply)(packed, tokens).logits
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    w1 = flax.traverse_util.flatten_dict(packed["params"], sep="/")["seg1/layer0/moe/experts/w1_fp4"]
    assert w1.shape[-2:] == (cfg.moe_intermediate_size, cfg.hidden_size // 2)  # [.., E, out, in/2]


def test_expert_memory_drops_3_7x(setup):
    _, _, v = setup
    flat = flax.traverse_util.flatten_dict(v["params"], sep="/")
    bf16 = sum(x.size * 2 for k, x in flat.items() if "/moe/experts/" in k)
    packed = pack_experts(v["params"])
    ratio = bf16 / expert_bytes(packed)
    assert 3.7 <= ratio <= 3.8, ratio  # 16 bits vs 4 + 8/32 bits per weight
    # packed leaves really are uint8 (no float copy kept)
    pflat = flax.traverse_util.flatten_dict(packed, sep="/")
    assert all(x.dtype == np.uint8 for k, x in pflat.items() if "/moe/experts/" in k)


def test_qat_factor_zero_is_identity_and_grads_flow(setup):
    cfg, tokens, v = setup
    policy = quant.QATPolicy(enabled=True)
    model, plain = Transformer(cfg, qat=policy), Transformer(cfg)
    np.testing.assert_array_equal(jax.jit(model.apply)(v, tokens, qat_factor=0.0).logits,
                                  jax.jit(plain.apply)(v, tokens).logits)

    def loss(p, factor):
        return jnp.mean(model.apply({"params": p, "buffers": v["buffers"]}, tokens, qat_factor=factor).logits ** 2)

    g = jax.jit(jax.grad(loss))(v["params"], 1.0)
    gflat = flax.traverse_util.flatten_dict(g, sep="/")
    assert all(np.all(np.isfinite(x)) for x in gflat.values())
    assert np.any(gflat["seg1/layer0/moe/experts/w1"] != 0)  # straight-through gradient reaches the FP4 weights


def test_qat_factor_zero_keeps_indexer_selections(setup):
    """Before QAT starts (factor 0) the indexer sees exactly the plain q/keys/scores: same picks, same logits."""
    cfg, tokens, v = setup
    policy = quant.QATPolicy(enabled=True)
    a = jax.jit(Transformer(cfg, qat=policy).apply)(v, tokens, qat_factor=0.0)
    b = jax.jit(Transformer(cfg).apply)(v, tokens)
    for layer, stats in b.aux["indexer"].items():
        np.testing.assert_array_equal(a.aux["indexer"][layer]["indices"], stats["indices"])
    np.testing.assert_array_equal(a.logits, b.logits)
