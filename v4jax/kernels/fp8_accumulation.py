"""FP8 dots in Pallas-Triton kernels accumulate natively on the tensor cores for up to 128 products.

Why: Pallas lowers `plgpu.dot` to Triton's `tt.dot` without a `maxNumImpreciseAcc`, which Triton reads
as 0: on Hopper every FP8 wgmma (K = 32) then goes into a fresh accumulator that CUDA cores add into the
fp32 one, a wait and 64 adds per thread after every instruction. That made the indexer's FP8 score
kernel slower than its bf16 one on the H200 (0.57 against 0.30 ms at S = 8K). DeepSeek-V3/V4 promote
FP8 partial sums to fp32 every 128 products (the paper's accumulation interval N_C = 128); this module
sets exactly that: a dot over K <= 128 accumulates natively, a longer one is promoted every 128.

`enable()` wraps the `tt.dot` builder that Pallas' Triton lowering calls. It changes FP8 x FP8 dots
only, for the whole process (the lowering runs when a jitted program compiles, after the tracing
that asked for it), and only when the caller did not pass the attribute. Pinned to jax 0.11.2's
lowering module; if its layout changes, `enable()` raises instead of silently doing nothing.
"""

from __future__ import annotations

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
  if original is None:
    raise RuntimeError("fp8_accumulation: jax's Pallas-Triton lowering has no tt_dialect.dot to wrap")

  def dot(a, b, c, *, input_precision=None, max_num_imprecise_acc=None, **kwargs):
    if max_num_imprecise_acc is None and _is_fp8(a) and _is_fp8(b):
      max_num_imprecise_acc = max_imprecise_for(ir.RankedTensorType(a.type).shape[-1])
    return original(a, b, c, input_precision=input_precision,
                    max_num_imprecise_acc=max_num_imprecise_acc, **kwargs)

  dialect.dot = dot
  _ENABLED[0] = True
