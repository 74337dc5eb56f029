"""The QAT policy: which tensors get fake-quantized, in which format, and from when ("late-stage QAT").

The `config.qat` block (an ml-collections ConfigDict, `default_qat_config()`, QAT off by default) is
checked by `validate_qat_config` (one-line `ConfigError`s naming `config.qat.<field>`) and frozen into a
hashable `QATPolicy` that jitted code can close over. Fields:

  enabled              master switch (False: every helper is the identity)
  experts_format       routed expert weights w1/w2/w3, e.g. "mxfp4" (DeepSeek-V4), or None
  indexer_format       indexer q and compressed indexer keys, e.g. "mxfp4", or None
  kv_format            optional FP8 simulation of the attention KV (e.g. "fp8_kv"), or None
  index_scores_bf16    round the index scores to bf16 before top-k (spec/dsv4.md 7.1)
  hadamard             rotate indexer q / keys with the 128-point Hadamard before quantizing them
                       (the indexer applies `quant.hadamard`; the policy only records the choice)
  start_step | start_fraction
                       when QAT starts: a step, or a fraction of total steps (at most one of the two;
                       neither means step 0)
  ramp_steps           0: switch on at the start step; n > 0: blend in linearly over n steps
  ste                  "plain" | "clipped" straight-through backward (see fake_quant.py)
  stochastic_rounding  stochastically round the gradients leaving fake-quant ops (needs a key per step)
  grad_format          None (round gradients to bf16) or a format name for stochastically rounded gradients

Ramp: `qat_active(step, total_steps, policy)` returns a float32 blend factor a in [0, 1]:
a = 0 before the start, then min(1, (step - start + 1) / ramp_steps) (1 at once when ramp_steps == 0).
`apply_qat` uses it as x + a * (fake_quant(x) - x) (exactly x at a = 0, exactly fake_quant(x) at a = 1):
the forward moves from x to its quantized value,
and with the plain STE the gradient stays exactly g at every a.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jaxtyping import Array, Float
from ml_collections.config_dict import placeholder

# ConfigError lives with the model config so that every config error in v4jax is one exception type.
from v4jax.errors import ConfigError
from v4jax.quant.fake_quant import STE_MODES, fake_quant
from v4jax.quant.formats import FORMATS, QuantFormat, get_format

TENSORS = ("experts", "indexer_q", "indexer_k", "kv")
_FORMAT_FIELD = {"experts": "experts_format", "indexer_q": "indexer_format", "indexer_k": "indexer_format", "kv": "kv_format"}


@dataclasses.dataclass(frozen=True)
class QATPolicy:
    """Frozen, hashable view of `config.qat`; see the module docstring for each field."""

    enabled: bool = False
    experts_format: str | None = "mxfp4"
    indexer_format: str | None = "mxfp4"
    kv_format: str | None = None
    index_scores_bf16: bool = True
    hadamard: bool = True
    start_step: int | None = None
    start_fraction: float | None = None
    ramp_steps: int = 0
    ste: str = "plain"
    stochastic_rounding: bool = False
    grad_format: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> QATPolicy:
        """Validates `config.qat` and freezes it."""
        d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
        validate_qat_config(d)
        return cls(**d)

    def format_for(self, tensor: str) -> QuantFormat | None:
        """The format of `tensor` (one of TENSORS), or None when QAT leaves it alone."""
        if tensor not in TENSORS:
            raise ValueError(f"QATPolicy.format_for: tensor {tensor!r} is not one of {TENSORS}")
        name = getattr(self, _FORMAT_FIELD[tensor])
        return get_format(name) if self.enabled and name is not None else None

    def start(self, total_steps: int) -> int:
        """The first QAT step for a run of `total_steps` steps."""
        if self.start_step is not None:
            return int(self.start_step)
        if self.start_fraction is not None:
            return int(self.start_fraction * total_steps)
        return 0


def default_qat_config() -> ml_collections.ConfigDict:
    """The `config.qat` block with its defaults: DeepSeek-V4's choices, switched off."""
    c = ml_collections.ConfigDict()
    c.enabled = False
    c.experts_format = placeholder(str)
    c.experts_format = "mxfp4"
    c.indexer_format = placeholder(str)
    c.indexer_format = "mxfp4"
    c.kv_format = placeholder(str)
    c.index_scores_bf16 = True
    c.hadamard = True
    c.start_step = placeholder(int)
    c.start_fraction = placeholder(float)
    c.ramp_steps = 0
    c.ste = "plain"
    c.stochastic_rounding = False
    c.grad_format = placeholder(str)
    return c


def _err(field: str, msg: str) -> ConfigError:
    return ConfigError(f"config.qat.{field}: {msg}")


def validate_qat_config(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> None:
    """Checks every field of `config.qat`; raises a one-line ConfigError naming the first bad field."""
    d = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    known = {f.name for f in dataclasses.fields(QATPolicy)}
    for key in d:
        if key not in known:
            raise _err(key, f"unknown field (known: {sorted(known)})")
    for key in ("enabled", "index_scores_bf16", "hadamard", "stochastic_rounding"):
        if key in d and not isinstance(d[key], bool):
            raise _err(key, f"must be a bool, got {d[key]!r}")
    for key in ("experts_format", "indexer_format", "kv_format", "grad_format"):
        if d.get(key) is not None and d[key] not in FORMATS:
            raise _err(key, f"{d[key]!r} is not None or one of {sorted(FORMATS)}")
    start_step, start_fraction = d.get("start_step"), d.get("start_fraction")
    if start_step is not None and start_fraction is not None:
        raise _err("start_step", "set start_step or start_fraction, not both")
    if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0):
        raise _err("start_step", f"must be an int >= 0, got {start_step!r}")
    if start_fraction is not None and not (isinstance(start_fraction, (int, float)) and 0.0 <= start_fraction <= 1.0):
        raise _err("start_fraction", f"must be a float in [0, 1], got {start_fraction!r}")
    ramp = d.get("ramp_steps", 0)
    if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 0:
        raise _err("ramp_steps", f"must be an int >= 0, got {ramp!r}")
    if d.get("ste", "plain") not in STE_MODES:
        raise _err("ste", f"{d['ste']!r} is not one of {STE_MODES}")
    if d.get("grad_format") is not None and not d.get("stochastic_rounding", False):
        raise _err("grad_format", "only applies with stochastic_rounding=True")


def qat_active(step: int | jax.Array, total_steps: int, policy: QATPolicy) -> Float[Array, ""]:
    """The QAT blend factor at `step` (float32 in [0, 1]): 0 before the start, then ramps to 1 (module docstring)."""
    if not policy.enabled:
        return jnp.zeros((), jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    start = float(policy.start(total_steps))
    if policy.ramp_steps == 0:
        return (step >= start).astype(jnp.float32)
    return jnp.clip((step - start + 1.0) / policy.ramp_steps, 0.0, 1.0)


def apply_qat(
    x: Float[Array, ...],
    tensor: str,
    policy: QATPolicy,
    factor: Float[Array, ""] | float,
    *,
    axis: int = -1,
    key: jax.Array | None = None,
) -> Float[Array, ...]:
    """x blended towards fake_quant(x) by `factor` per the policy's format for `tensor` (identity when off).

    `key` is needed when the policy asks for stochastic rounding of the gradients.
    """
    fmt = policy.format_for(tensor)
    if fmt is None:
        return x
    if policy.stochastic_rounding and key is None:
        raise ValueError(f"apply_qat: policy.stochastic_rounding needs a key (tensor {tensor!r})")
    fq = fake_quant(
        x,
        fmt,
        axis=axis,
        ste=policy.ste,
        stochastic_rounding_key=key if policy.stochastic_rounding else None,
        grad_format=policy.grad_format,
    )
    factor = jnp.asarray(factor, jnp.float32).astype(x.dtype)
    # exactly x before the start and exactly fake_quant(x) after the ramp; the gradient is g either way
    blend = x + factor * (fq - x)
    return jnp.where(factor >= 1, fq, jnp.where(factor <= 0, x, blend))


def cast_index_scores(scores: Float[Array, ...], policy: QATPolicy) -> Float[Array, ...]:
    """Index scores rounded to bf16 (kept in their dtype) when the policy says so; identity otherwise."""
    if policy.enabled and policy.index_scores_bf16:
        return scores.astype(jnp.bfloat16).astype(scores.dtype)
    return scores
