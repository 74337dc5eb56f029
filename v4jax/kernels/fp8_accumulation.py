"""FP8 dots in Pallas-Triton kernels accumulate natively on the tensor cores for up to 128 products.

Why: Pallas lowers `plgpu.dot` to Triton's `tt.dot` without a `maxNumImpreciseAcc`, which Triton reads
as 0: on Hopper every FP8 wgmma (K = 32) then goes into a fresh accumulator that CUDA cores add into the
fp32 one, a wait and 64 adds per thread after every instruction. That made the indexer's FP8 score
kernel slower than its bf16 one on the H200 (0.565 against 0.365 ms at S = 8K, chunk 2048); with the
interval it is faster (0.226 against 0.306 ms, chunk 8192). DeepSeek-V3/V4 promote
FP8 partial sums to fp32 every 128 products (the paper's accumulation interval N_C = 128); this module
sets exactly that: a dot over K <= 128 accumulates natively, a longer one is promoted every 128.

`enable()` wraps the `tt.dot` builder that Pallas' Triton lowering calls. It changes FP8 x FP8 dots
only, and only when the caller did not pass the attribute, for the whole process: the lowering runs
when a jitted program compiles, after the tracing, so it cannot be scoped to one kernel. Importing
`v4jax.kernels.indexer.triton` enables it, so every FP8 dot compiled afterwards sees the same rule.
Written against jax 0.11.2's lowering module: `enable()` raises if that module no longer builds its
dots through `tt_dialect.dot` (the wrapper would silently do nothing). Tested by lowering FP8 kernels
for a CUDA target on the CPU (tests/kernels/test_fp8_accumulation.py).
"""

from __future__ import annotations

import inspect

PROMOTION_INTERVAL = 128  # products per native FP8 accumulation (DeepSeek's N_C)
_ENABLED = [False]


def _is_fp8(value) -> bool:
  from jax._src.lib.mlir import ir
  return str(ir.RankedTensorType(value.type).element_type).startswith("f8")


def max_imprecise_for(k: int) -> int:
  """Triton's maxNumImpreciseAcc for a dot of inner size k: k + 1 (no promotion inside the dot) up to
  PROMOTION_INTERVAL, else the interval (Triton promotes when the count reaches it)."""
  return k + 1 if k <= PROMOTION_INTERVAL else PROMOTION_INTERVAL


def enable() -> None:
  """Installs the interval for FP8 dots lowered from now on (idempotent)."""
  if _ENABLED[0]:
    return
  from jax._src.lib.mlir import ir
  from jax._src.pallas.triton import lowering

  dialect = getattr(lowering, "tt_dialect", None)
  original = getattr(dialect, "dot", None)
  dot_rule = getattr(lowering, "_dot_general_lowering", None)
  try:
    calls_dialect_dot = dot_rule is not None and "tt_dialect.dot(" in inspect.getsource(dot_rule)
  except (OSError, TypeError):  # no source available: trust the attribute check alone
    calls_dialect_dot = dot_rule is not None
  if original is None or not calls_dialect_dot:
    raise RuntimeError("fp8_accumulation: jax's Pallas-Triton lowering no longer builds dots through "
                       "tt_dialect.dot; update v4jax/kernels/fp8_accumulation.py for this jax version")

  def dot(a, b, c, *, input_precision=None, max_num_imprecise_acc=None, **kwargs):
    if max_num_imprecise_acc is None and _is_fp8(a) and _is_fp8(b):
      max_num_imprecise_acc = max_imprecise_for(ir.RankedTensorType(a.type).shape[-1])
    return original(a, b, c, input_precision=input_precision,
                    max_num_imprecise_acc=max_num_imprecise_acc, **kwargs)

  dialect.dot = dot
  _ENABLED[0] = True
