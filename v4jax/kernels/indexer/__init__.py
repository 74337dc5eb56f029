"""Lightning indexer (CSA): QK scores fused with a top-k. Public API: `indexer_topk`."""

from v4jax.kernels.indexer.api import IMPLEMENTATIONS, indexer_topk

__all__ = ["IMPLEMENTATIONS", "indexer_topk"]
