"""The top-level experiment config: one ConfigDict with a block per concern, and `validate` for all of it.

`default_config()` assembles the blocks each subpackage owns (model preset, optimizer, data, stability,
QAT) plus the `train` and `mesh` blocks defined here. `validate(config)` runs every block's own
validator and then the checks that span blocks (tokenizer vocab vs model vocab, ...). Every problem is
a one-line `ConfigError` naming the field, raised before anything is built, traced or written.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from v4jax.model.config import ConfigError

__all__ = [
    "ConfigError",
    "default_config",
    "default_mesh_config",
    "default_train_config",
    "model_fingerprint",
    "validate",
]

MTP_WEIGHT_SCHEDULES = ("constant", "paper")
MESH_AXES = ("data", "fsdp", "expert", "tensor")


def default_train_config() -> ml_collections.ConfigDict:
    """The `train` block: loop length, batch shape, cadence of logging / eval / checkpoints, loss weights."""
    return ml_collections.ConfigDict(dict(
        steps=600,
        batch_size=8,
        seq_len=128,
        seed=0,
        checkpoint_every=100,
        keep_checkpoints=3,
        eval_every=200,
        eval_batches=8,
        log_every=10,
        mtp_weight=0.3,
        mtp_weight_schedule="constant",  # "paper": mtp_weight until the LR decay starts, then mtp_weight_late
        mtp_weight_late=0.1,
        balance_loss_weight=1e-4,
        router_bias_speed=1e-3,
        sample_tokens=120,
        sample_prompt="The ",
        sample_temperature=0.0,  # 0 = greedy
        progress=True,
        profile=False,
    ))


def default_mesh_config() -> ml_collections.ConfigDict:
    """Device-mesh axis sizes (-1 = all remaining devices) and the MoE dispatch mode.

    `moe_dispatch`: "auto" | "all_gather" | "all_to_all" | "ragged_all_to_all" (v4jax.parallel.dispatch);
    "auto" is all_gather on CPU, ragged_all_to_all on GPU/TPU when top-k < mesh.expert.
    """
    return ml_collections.ConfigDict({**{axis: 1 for axis in MESH_AXES}, "moe_dispatch": "auto"})


def default_config() -> ml_collections.ConfigDict:
    """The full schema with the tiny model; configs/*.py start from this and override fields."""
    from v4jax.data import default_data_config
    from v4jax.model import presets
    from v4jax.optim import default_optim_config
    from v4jax.train.stability import default_stability_config

    config = ml_collections.ConfigDict()
    config.model = presets.tiny()
    config.train = default_train_config()
    config.optim = default_optim_config()
    config.data = default_data_config()
    config.stability = default_stability_config()
    config.qat = _qat_block()
    config.mesh = default_mesh_config()
    return lists_to_tuples(config)


def lists_to_tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turns list fields into tuples: ml_collections' command-line overrides support tuples, not lists."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            lists_to_tuples(value)
        elif isinstance(value, list):
            del config[key]  # re-created: assigning a tuple over a list field keeps the list type
            config[key] = tuple(value)
    return config


def _qat_block() -> ml_collections.ConfigDict:
    """`v4jax.quant.default_qat_config()`; an empty block while the quant package does not provide one."""
    try:
        from v4jax.quant import default_qat_config
    except ImportError:
        return ml_collections.ConfigDict()
    return default_qat_config()


def _err(field: str, msg: str) -> ConfigError:
    return ConfigError(f"config.{field}: {msg}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_train_config(t: ml_collections.ConfigDict) -> None:
    """Checks the `train` block; one-line ConfigError on the first bad field."""
    known = set(default_train_config().keys())
    unknown = sorted(set(t.keys()) - known)
    if unknown:
        raise _err(f"train.{unknown[0]}", "unknown field")
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints", "eval_every",
                 "eval_batches", "log_every"):
        if not _is_int(t[name]) or t[name] < 1:
            raise _err(f"train.{name}", f"must be a positive integer, got {t[name]!r}")
    for name in ("seed", "sample_tokens"):
        if not _is_int(t[name]) or t[name] < 0:
            raise _err(f"train.{name}", f"must be a non-negative integer, got {t[name]!r}")
    for name in ("mtp_weight", "mtp_weight_late", "balance_loss_weight", "router_bias_speed", "sample_temperature"):
        v = t[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise _err(f"train.{name}", f"must be a non-negative number, got {v!r}")
    if t.mtp_weight_schedule not in MTP_WEIGHT_SCHEDULES:
        raise _err("train.mtp_weight_schedule", f"must be one of {MTP_WEIGHT_SCHEDULES}, got {t.mtp_weight_schedule!r}")
    if not isinstance(t.sample_prompt, str):
        raise _err("train.sample_prompt", f"must be a string, got {t.sample_prompt!r}")
    for name in ("progress", "profile"):
        if not isinstance(t[name], bool):
            raise _err(f"train.{name}", f"must be True or False, got {t[name]!r}")


def validate_mesh_config(m: ml_collections.ConfigDict) -> None:
    """Mesh sizes must be positive integers or -1 (fill with the remaining devices), at most one -1;
    `moe_dispatch` (optional, default "auto") one of the dispatch modes."""
    from v4jax.parallel.dispatch import check_dispatch

    unknown = sorted(set(m.keys()) - set(MESH_AXES) - {"moe_dispatch"})
    if unknown:
        raise _err(f"mesh.{unknown[0]}", f"unknown mesh axis (known: {', '.join(MESH_AXES)})")
    for axis in MESH_AXES:
        v = m[axis]
        if not _is_int(v) or not (v >= 1 or v == -1):
            raise _err(f"mesh.{axis}", f"must be a positive integer or -1, got {v!r}")
    if sum(m[a] == -1 for a in MESH_AXES) > 1:
        raise _err("mesh", "at most one axis may be -1")
    try:
        check_dispatch(m.get("moe_dispatch", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Validates every block and the cross-block constraints; raises a one-line ConfigError."""
    from v4jax.data import validate_data_config
    from v4jax.model.config import validate_model_config
    from v4jax.optim import validate_optim_config
    from v4jax.train.stability import validate_stability_config

    expected = ("model", "train", "optim", "data", "stability", "qat", "mesh")
    unknown = sorted(set(config.keys()) - set(expected))
    if unknown:
        raise _err(unknown[0], f"unknown block (known: {', '.join(expected)})")
    for block in expected:
        if block not in config:
            raise _err(block, "missing block")
    try:
        from v4jax.quant import validate_qat_config
    except ImportError:  # the quant package may only expose defaults
        validate_qat_config = None
    try:
        validate_model_config(config.model.to_dict())
        validate_train_config(config.train)
        validate_optim_config(config.optim)
        validate_data_config(config.data)
        validate_stability_config(config.stability)
        if validate_qat_config is not None and len(config.qat):
            validate_qat_config(config.qat)
        validate_mesh_config(config.mesh)
        _validate_cross_block(config)
    except ConfigError:
        raise
    except ValueError as err:  # some block validators raise plain ValueError; same one-line contract
        raise ConfigError(str(err)) from None


def _validate_cross_block(config: ml_collections.ConfigDict) -> None:
    from v4jax.data import build_tokenizer

    tok = build_tokenizer(config.data)
    if tok.vocab_size > config.model.vocab_size:
        raise _err("model.vocab_size", f"{config.model.vocab_size} is smaller than the tokenizer's vocab "
                   f"{tok.vocab_size} (config.data)")


def model_fingerprint(config: ml_collections.ConfigDict) -> str:
    """A short stable hash of the model block: a checkpoint is only resumed into the same model."""
    import hashlib
    import json

    text = json.dumps(config.model.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
