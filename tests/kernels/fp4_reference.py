"""Shared oracles of the FP4 kernel tests: random MXFP4 weights with spread scales, the float64 references
and the relative error with the poisoned-buffer (no NaN) check."""

import jax
import jax.numpy as jnp
import numpy as np

from v4jax import quant


def weight(key, shape, axis=-1):
    """Random W whose 1x32 blocks span several octaves, so the E8M0 scales differ between blocks."""
    k1, k2 = jax.random.split(key)
    w = jax.random.normal(k1, shape, jnp.float32)
    octave = jnp.exp2(jax.random.randint(k2, shape, -4, 4).astype(jnp.float32))
    return quant.quantize(w * octave, "mxfp4", axis=axis)


def rel(y, ref):
    """Relative L2 error in float64; fails if any element is NaN/inf (an output element never written)."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y)), "output has NaN/inf (an element was never written)"
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def ref_dense(x, w):
    """x @ dequantize(w).T in float64."""
    return np.asarray(x, np.float64) @ np.asarray(quant.dequantize(w), np.float64).T


def ref_grouped(x, w, group_sizes):
    """Per group g: rows of x @ dequantize(w)[g].T in float64; rows past sum(group_sizes) are zero."""
    wd = np.asarray(quant.dequantize(w), np.float64)
    x, out, start = np.asarray(x, np.float64), np.zeros((x.shape[0], w.shape[1])), 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[start : start + size] = x[start : start + size] @ wd[g].T
        start += size
    return out


def sum_err(v, v_ref, terms):
    """|v - v_ref| over sum(|terms|), for a loss v = sum(terms): float32 rounding of a sum is bounded by the
    magnitude of its terms, not of the result, which random signs can bring near zero (cancellation)."""
    return abs(float(v) - float(v_ref)) / float(np.sum(np.abs(np.asarray(terms, np.float64))))
