"""Inference on packed FP4 expert weights: convert trained routed experts to MXFP4 `QArray`s.

Each expert matrix is quantised with 1x32 blocks along its input axis (K) and E8M0 scales, 4.25 bits per
weight, as in the released checkpoints, and stored transposed ([E, out, in/2] values, [E, out, in/32]
scales): the layout the FP4 kernels read, so the model's expert GEMMs run on the packed bytes
(`v4jax.kernels.fp4_matmul` through `grouped_matmul`) without a copy per call. On a Hopper GPU,
`planarize_experts` then moves the bytes once more into the Mosaic GPU kernel's layout
(`fp4_matmul.PlanarMXFP4`), which spares each expert GEMM a pass over its activations and a scale transpose
and lets the kernel decode with fewer instructions (on the H200, same tiles: grouped prefill 1.99 against
2.43 ms, decode at 64 tokens 165 against 180 us; experiments/benchmarks/RESULTS.md, session 7). Where
`planar_max_scale` reads at most 128 (scales <= 2, as in LLM weights), `ModelConfig.fp4_fused_decode = True`
lets the kernels decode with one FMA per register (session 9: kernels 3-6% faster).
"""

from __future__ import annotations

import flax
import jax.numpy as jnp
import numpy as np

from v4jax import quant
from v4jax.kernels.fp4_matmul import planar
from v4jax.model.moe import (
    PACKED_SUFFIX,
    PLANAR_SCALE_SUFFIX,
    PLANAR_SUFFIX,
    SCALE_SUFFIX,
)


def is_expert_weight(path: str) -> bool:
    return "/moe/experts/w" in "/" + path


def pack_experts(params: dict) -> dict:
    """A copy of `params` whose routed-expert weights `w{1,2,3}` [.., E, in, out] become MXFP4 leaves
    `w{n}_fp4` (uint8 [.., E, out, in/2], two values per byte along `in`) and `w{n}_fp4_scale` (E8M0 bytes
    [.., E, out, in/32], one per 32 inputs).

    Plain arrays rather than a `QArray` leaf, so that scanned layers slice them like any other parameter.
    """
    out = {}
    for k, v in flax.traverse_util.flatten_dict(params, sep="/").items():
        if is_expert_weight(k) and not k.endswith((PACKED_SUFFIX, SCALE_SUFFIX, PLANAR_SUFFIX, PLANAR_SCALE_SUFFIX)):
            q = quant.quantize(jnp.swapaxes(v, -1, -2), "mxfp4", axis=v.ndim - 1)  # [.., E, out, in] along in
            out[k + PACKED_SUFFIX], out[k + SCALE_SUFFIX] = q.values, q.scales
        else:
            out[k] = v
    return flax.traverse_util.unflatten_dict(out, sep="/")


def planarize_experts(params: dict) -> dict:
    """A copy of `params` whose packed expert leaves (`pack_experts`) are in the Hopper kernel's load-time
    layout (`fp4_matmul.PlanarMXFP4`): `w{n}_fp4_planar` (uint8 [.., E, out, in/2], each 256-input chunk's
    planes as the layout's 32-bit words, in thread order per 64 outputs) and `w{n}_fp4_planar_scale` (E8M0
    bytes [.., E, in/32, out], permuted within each [8, 64] box). The model computes the same numbers; on an
    H200 the expert GEMMs are faster (module docstring). Needs `in` % 256 == 0 and `out` % 64 == 0 for every
    expert matrix."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    out = {}
    for k, v in flat.items():
        if is_expert_weight(k) and k.endswith(SCALE_SUFFIX):
            continue  # converted with its values below
        if not (is_expert_weight(k) and k.endswith(PACKED_SUFFIX)):
            out[k] = v
            continue
        base = k[: -len(PACKED_SUFFIX)]
        d_in = 2 * v.shape[-1]
        if d_in % planar.CHUNK:
            raise ValueError(f"planarize_experts: {base} has {d_in} inputs, not a multiple of {planar.CHUNK}")
        if v.shape[-2] % planar.TILE_ROWS:
            raise ValueError(f"planarize_experts: {base} has {v.shape[-2]} outputs, not a multiple of "
                             f"{planar.TILE_ROWS}")
        q = quant.QArray(values=v, scales=flat[base + SCALE_SUFFIX], global_scale=None,
                         fmt=quant.get_format("mxfp4"), shape=(*v.shape[:-1], d_in), dtype=np.dtype(np.float32),
                         axis=v.ndim - 1)
        p = planar.to_planar(q)
        out[base + PLANAR_SUFFIX], out[base + PLANAR_SCALE_SUFFIX] = p.values, p.scales
    return flax.traverse_util.unflatten_dict(out, sep="/")


def planar_max_scale(params: dict) -> int | None:
    """The largest E8M0 scale byte of the planar expert leaves (`planarize_experts`); None without any, or when
    one cannot be read here (multi-host arrays). At most `planar.FUSED_MAX_SCALE` (128),
    `ModelConfig.fp4_fused_decode` may be True (one FMA per decoded register)."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    # planar.max_scale_byte: None for arrays it cannot read here (traced, or not all held by this process)
    maxima = [planar.max_scale_byte(v) for k, v in flat.items() if is_expert_weight(k) and k.endswith(PLANAR_SCALE_SUFFIX)]
    return None if not maxima or None in maxima else max(maxima)


def expert_bytes(params: dict) -> int:
    """Bytes held by the routed-expert weights (packed values and scales included)."""
    flat = flax.traverse_util.flatten_dict(params, sep="/")
    return int(sum(np.asarray(v).nbytes for k, v in flat.items() if is_expert_weight(k)))
