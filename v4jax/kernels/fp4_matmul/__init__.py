"""FP4 (MXFP4) weight x bf16 activation matmuls: dense and grouped, with Pallas backends and an XLA fallback.

See api.py for the interface, planar.py for the Hopper kernel's load-time weight layout and block_sizes.py for
the stored tuned tiles.
"""

from v4jax.kernels.fp4_matmul.api import (
    IMPLEMENTATIONS,
    fp4_grouped_matmul,
    fp4_matmul,
    transpose_kn_to_nk,
)
from v4jax.kernels.fp4_matmul.planar import PlanarMXFP4, to_planar

__all__ = ["IMPLEMENTATIONS", "PlanarMXFP4", "fp4_grouped_matmul", "fp4_matmul", "to_planar", "transpose_kn_to_nk"]
