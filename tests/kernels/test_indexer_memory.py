"""The Triton indexer quantizes q one chunk at a time: its compiled program's temporary memory stays at the
bf16 path's level instead of holding fp32 copies of the whole q (which at S = 16K, H = 64, D = 128 is
512 MiB per copy; the whole-q prologue took 2.5 GiB of temporaries at S = 32K). Compiled for CPU in
interpret mode: the quantization prologue is the same XLA code on the GPU."""

import jax
import jax.numpy as jnp

import v4jax.model  # noqa: F401  (import order)
from v4jax.kernels.indexer import triton

S, H, D, RATIO = 16384, 64, 128, 4


def temp_mib(quant, quantizer="xla"):
    q = jax.ShapeDtypeStruct((1, S, H, D), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1, S, H), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, S // RATIO, D), jnp.bfloat16)
    f = jax.jit(lambda q, w, k: triton.indexer_topk(q, w, k, 512, RATIO, quant=quant, interpret=True,
                                                       quantizer=quantizer, chunk=2048))
    return f.lower(q, w, k).compile().memory_analysis().temp_size_in_bytes / 2**20


def test_quantized_q_is_quantized_per_chunk():
    plain, mxfp4, fused = temp_mib(None), temp_mib("mxfp4"), temp_mib("mxfp4", "triton")
    q_fp32_mib = S * H * D * 4 / 2**20  # 512
    assert mxfp4 < 2.5 * plain, (mxfp4, plain)  # 352 vs 158 MiB; the whole-q prologue: 1240 MiB
    assert mxfp4 < q_fp32_mib, (mxfp4, q_fp32_mib)
    assert fused < 1.5 * plain, (fused, plain)  # the fused quantizer has no fp32 temporaries
