"""An independent numpy + ml_dtypes decoder/encoder for the quant tests.

Written on purpose unlike v4jax.quant: a Python loop over blocks, float64 log2 for exponents,
ml_dtypes casts for rounding (float4_e2m1fn, float8_e4m3fn) and for decoding, strided slicing for
nibble packing.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F4 = ml_dtypes.float4_e2m1fn
F8 = ml_dtypes.float8_e4m3fn
HF_LUT = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def block_scale(amax: float, fmt: str, g: np.float32 | None = None):
    """(stored scale, effective float scale) of one block under the spec's rules."""
    if fmt in ("mxfp4", "mxfp4_ocp", "fp8_ue8m0", "fp8_weight_ue8m0", "fp8_kv"):
        if fmt == "mxfp4":
            e = np.ceil(np.log2(max(float(amax), 6 * 2.0**-126) / 6))
        elif fmt == "mxfp4_ocp":
            e = np.floor(np.log2(max(float(amax), 2.0**-124))) - 2
        else:
            e = np.ceil(np.log2(float(max(np.float32(amax), np.float32(1e-4))) / 448))
        return np.uint8(int(e) + 127), np.float32(2.0**e)
    if fmt in ("fp8", "fp8_weight"):
        s = max(np.float32(amax), np.float32(1e-4)) / np.float32(448)
        return np.float32(s), np.float32(s)
    # nvfp4 / nvfp4_2d
    sb = np.asarray(np.float32(amax) / np.float32(6) / g, F8)
    return sb, np.float32(sb.astype(np.float32)) * g


BLOCKS = {"mxfp4": (1, 32), "mxfp4_ocp": (1, 32), "nvfp4": (1, 16), "nvfp4_2d": (16, 16), "fp8": (1, 128),
          "fp8_ue8m0": (1, 128), "fp8_weight": (128, 128), "fp8_weight_ue8m0": (128, 128), "fp8_kv": (1, 64)}


def reference_quantize(x: np.ndarray, fmt: str):
    """x: float32 [M, K]. Returns (values as stored bytes/float8, scales as stored, global scale, dequantized f32)."""
    x = np.asarray(x, np.float32)
    bm, bk = BLOCKS[fmt]
    m, k = x.shape
    fp4 = fmt.startswith(("mx", "nv"))
    g = None
    if fmt.startswith("nv"):
        gamax = np.abs(x).max()
        g = np.float32(gamax) / np.float32(448 * 6) if gamax > 0 else np.float32(1.0)
    codes = np.zeros((m, k), np.uint8)
    f8vals = np.zeros((m, k), F8)
    deq = np.zeros((m, k), np.float32)
    scales = []
    for i in range(0, m, bm):
        row = []
        for j in range(0, k, bk):
            blk = x[i:i + bm, j:j + bk]
            stored, s = block_scale(np.abs(blk).max(), fmt, g)
            row.append(stored)
            y = (blk / s).astype(np.float32) if s > 0 else np.zeros_like(blk)
            if fp4:
                c = np.asarray(np.clip(y, -6, 6), F4).view(np.uint8) & 0xF
                codes[i:i + bm, j:j + bk] = c
                deq[i:i + bm, j:j + bk] = c.view(F4).astype(np.float32) * s
            else:
                v = np.asarray(np.clip(y, -448, 448), F8)
                f8vals[i:i + bm, j:j + bk] = v
                deq[i:i + bm, j:j + bk] = v.astype(np.float32) * s
        scales.append(row)
    scales = np.array(scales)
    values = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8) if fp4 else f8vals
    return values, scales, g, deq
