"""experiments/benchmarks/fp4_decode_bounds.py: the measurement kernel does `dense_wgs`'s work in "full" mode
(its split partials add up to x @ W.T in the interpreter), the copies alone in "stream" (zeros out), and lowers
for CUDA in every mode with the decode's arithmetic only where it belongs; bad sizes raise one-line errors."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "experiments", "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))

import fp4_decode_bounds as bounds
from fp4_reference import ref_dense, rel, weight

from v4jax.kernels import fp4_matmul


@pytest.mark.parametrize("split, wgs, stages", [(2, 2, 1), (1, 2, 3)])
def test_full_mode_partials_add_up_to_the_product(split, wgs, stages):
    kx, kw = jax.random.split(jax.random.key(split * 10 + stages))
    x = jax.random.normal(kx, (8, 1024), jnp.bfloat16)
    w = weight(kw, (128, 1024))
    p = fp4_matmul.to_planar(w)
    out = bounds.bounds_kernel(x, p.values, p.scales, mode="full", split=split, wgs=wgs, stages=stages,
                               interpret=True)
    assert out.shape == (split, 8, 128)
    assert rel(np.asarray(out, np.float64).sum(0), ref_dense(x, w)) < 1e-2


def test_stream_mode_stores_zeros():
    p = fp4_matmul.to_planar(weight(jax.random.key(1), (128, 1024)))
    out = bounds.bounds_kernel(jnp.ones((8, 1024), jnp.bfloat16), p.values, p.scales, mode="stream", split=2, wgs=2,
                               stages=1, interpret=True)
    assert out.shape == (2, 8, 128) and not np.asarray(out, np.float32).any()


def test_modes_lower_for_cuda_with_their_work_and_bad_sizes_raise():
    p = fp4_matmul.to_planar(weight(jax.random.key(2), (128, 1024)))
    x = jnp.ones((8, 1024), jnp.bfloat16)
    texts = {m: jax.jit(lambda xx, m=m: bounds.bounds_kernel(xx, p.values, p.scales, mode=m, split=2, wgs=2))
             .trace(x).lower(lowering_platforms=("cuda",)).as_text() for m in bounds.MODES}
    for m, text in texts.items():
        assert text.count("custom_call @mosaic_gpu_v2") == 1 and f"fp4_matmul_mosaic_gpu_bounds_{m}" in text
    assert "fma.rn.bf16x2" in texts["full"] and "fma.rn.bf16x2" not in texts["nodecode"]
    assert "wgmma" in texts["full"] and "wgmma" in texts["nodecode"] and "wgmma" not in texts["stream"]
    with pytest.raises(ValueError, match="mode must be"):
        bounds.bounds_kernel(x, p.values, p.scales, mode="decode")
    with pytest.raises(ValueError, match=r"K % \(256 \* split \* wgs\)"):
        bounds.bounds_kernel(x, p.values, p.scales, split=4, wgs=2)
    with pytest.raises(ValueError, match="bm in 8..64"):
        bounds.bounds_kernel(jnp.ones((4, 1024), jnp.bfloat16), p.values, p.scales)
    with pytest.raises(ValueError, match="shared memory"):
        bounds.bounds_kernel(jnp.ones((64, 1024), jnp.bfloat16), p.values, p.scales, wgs=4, stages=1)
    with pytest.raises(ValueError, match="GPU only"):
        bounds.bounds_kernel(x, p.values, p.scales, mode="nodecode", interpret=True)
