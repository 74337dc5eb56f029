"""v4jax.quant: FP4/FP8 block formats, the QArray pytree, straight-through fake-quant, Hadamard, QAT policy.

    from v4jax import quant
    q  = quant.quantize(x, "mxfp4")    # QArray: packed uint8 values (element 2i in the low nibble), scales
    x2 = quant.dequantize(q)           # x's shape and dtype
    y  = quant.fake_quant(x, "mxfp4")  # custom_vjp: quantize -> dequantize forward, STE backward

Modules, one job each: formats (descriptors and presets), e8m0 (exact power-of-two exponents),
e2m1 (FP4 rounding, codes, packing), qarray (the pytree), quantize (quantize / dequantize),
fake_quant (custom_vjp, clipped STE, stochastic rounding), hadamard (Walsh-Hadamard rotation),
fp8_lossless (MXFP4 -> FP8 128x128 conversion and its lossless rule), policy (QAT config and schedule).
"""

from v4jax.quant.fake_quant import fake_quant, round_to_dtype, stochastic_round_bf16
from v4jax.quant.formats import FORMATS, QuantFormat, get_format
from v4jax.quant.fp8_lossless import (
    Fp8Blocks,
    lossless_blocks,
    lossless_fraction,
    mxfp4_to_fp8,
)
from v4jax.quant.hadamard import hadamard
from v4jax.quant.policy import (
    TENSORS,
    QATPolicy,
    apply_qat,
    cast_index_scores,
    default_qat_config,
    qat_active,
    validate_qat_config,
)
from v4jax.quant.qarray import QArray, abstract_like
from v4jax.quant.quantize import (
    dequantize,
    effective_scales,
    qarray_from_mxfp4_checkpoint,
    quantize,
)

__all__ = [
    "FORMATS",
    "TENSORS",
    "Fp8Blocks",
    "QATPolicy",
    "QArray",
    "QuantFormat",
    "abstract_like",
    "apply_qat",
    "cast_index_scores",
    "default_qat_config",
    "dequantize",
    "effective_scales",
    "fake_quant",
    "get_format",
    "hadamard",
    "lossless_blocks",
    "lossless_fraction",
    "mxfp4_to_fp8",
    "qarray_from_mxfp4_checkpoint",
    "qat_active",
    "quantize",
    "round_to_dtype",
    "stochastic_round_bf16",
    "validate_qat_config",
]
