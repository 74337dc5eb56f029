"""FP8 dots in Pallas-Triton kernels get DeepSeek's promotion interval: lowered for a CUDA target on the
CPU (a fake sm_90 device), the dot builder receives maxNumImpreciseAcc = K + 1 for K <= 128 and 128 above;
bf16 dots are untouched."""

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from v4jax.kernels import fp8_accumulation


def test_interval():
  assert fp8_accumulation.max_imprecise_for(128) == 129  # no promotion inside a head's dot
  assert fp8_accumulation.max_imprecise_for(64) == 65
  assert fp8_accumulation.max_imprecise_for(512) == 128  # promoted every 128 products


def test_lowered_fp8_dots_carry_the_interval(monkeypatch, fake_hopper):
  seen = []
  real_dot = lowering.tt_dialect.dot

  def spy(a, b, c, **kwargs):
    seen.append(kwargs.get("max_num_imprecise_acc"))
    return real_dot(a, b, c, **kwargs)

  monkeypatch.setattr(lowering.tt_dialect, "dot", spy)
  monkeypatch.setattr(fp8_accumulation, "_ENABLED", [False])
  fp8_accumulation.enable()
  fp8_accumulation.enable()  # idempotent: wrapped once

  def kernel(a_ref, b_ref, o_ref):
    o_ref[...] = plgpu.dot(a_ref[...], b_ref[...], trans_b=True)

  def lower(dtype, k):
    a = jax.ShapeDtypeStruct((64, k), dtype)
    f = lambda x, y: pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32))(x, y)
    jax.jit(f).trace(a, a).lower(lowering_platforms=("cuda",))

  lower(jnp.float8_e4m3fn, 128)
  lower(jnp.float8_e4m3fn, 512)
  lower(jnp.bfloat16, 128)
  assert seen == [129, 128, None]
