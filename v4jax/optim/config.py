"""The optimizer's configuration (`config.optim`): defaults and up-front validation.

Every field a researcher can set lives in `default_optim_config()`; `validate_optim_config` turns
any bad value into a one-line `ConfigError` naming `config.optim.<field>` before anything is traced.
"""

from __future__ import annotations

import re

import ml_collections

from v4jax.model.config import ConfigError

SCHEDULES = ("constant", "cosine", "wsd")
OPTIMIZERS = ("muon", "adamw")
NS_DTYPES = ("float32", "bfloat16")
ROUTER_EVERY_MODES = ("accumulate", "skip")


def default_optim_config() -> ml_collections.ConfigDict:
    """Defaults for `config.optim` (the paper's recipe, with a learning rate sized for tiny models)."""
    c = ml_collections.ConfigDict()
    # learning-rate schedule (Muon and AdamW share it, as in the paper)
    c.lr = 3e-3  # tiny default; the paper's 2.7e-4 (Flash) / 2.0e-4 (Pro) is for the big models
    c.warmup_steps = 100
    c.schedule = "wsd"  # "constant" | "cosine" | "wsd" (warm-up, constant, cosine decay: the paper's)
    c.final_lr_fraction = 0.1
    c.decay_start_fraction = (
        0.8  # wsd only: cosine decay starts at this fraction of training
    )
    # optimizer
    c.optimizer = "muon"  # "muon": Muon for matrices + AdamW for the rest | "adamw": AdamW everywhere
    c.weight_decay = 0.1
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-20
    c.muon_momentum = 0.95
    c.muon_update_rms = 0.18
    c.muon_ns_dtype = (
        "float32"  # "float32" | "bfloat16": dtype of the Newton-Schulz iterations
    )
    c.grad_clip = 1.0  # global-norm clip over trainable parameters; 0 = off
    c.frozen = []  # regexes on '/'-joined parameter paths; matching leaves get no update and no state
    # the router (gate weights) as its own partition
    c.router_lr_mult = 1.0
    c.router_delay = 0  # updates applied this many steps late
    c.router_every = 1  # router updated every k steps
    c.router_every_mode = "accumulate"  # "accumulate" (mean of the k gradients) | "skip" (drop the others)
    return c


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"config.optim.{field}: {message}")


def validate_optim_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise a one-line `ConfigError` naming `config.optim.<field>` for the first bad value."""
    known = set(default_optim_config().keys())
    for key in cfg:
        if key not in known:
            _fail(key, f"unknown field (known: {', '.join(sorted(known))})")
    for key in known:
        if key not in cfg:
            _fail(key, "missing (start from v4jax.optim.default_optim_config())")

    def positive(field, allow_zero=False):
        value = cfg[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(field, f"must be a number, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero):
            _fail(field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    def integer(field, minimum):
        value = cfg[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(field, f"must be an integer >= {minimum}, got {value!r}")

    def fraction(field, low_open=False):
        value = cfg[field]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value <= 1
        ):
            _fail(field, f"must be in [0, 1], got {value!r}")
        if low_open and value == 0:
            _fail(field, f"must be in (0, 1], got {value!r}")

    def choice(field, options):
        if cfg[field] not in options:
            _fail(field, f"must be one of {options}, got {cfg[field]!r}")

    positive("lr")
    integer("warmup_steps", 0)
    choice("schedule", SCHEDULES)
    fraction("final_lr_fraction")
    fraction("decay_start_fraction")
    choice("optimizer", OPTIMIZERS)
    positive("weight_decay", allow_zero=True)
    for field in ("b1", "b2", "muon_momentum"):
        value = cfg[field]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value < 1
        ):
            _fail(field, f"must be in [0, 1), got {value!r}")
    positive("eps")
    positive("muon_update_rms")
    choice("muon_ns_dtype", NS_DTYPES)
    positive("grad_clip", allow_zero=True)
    frozen = cfg.frozen
    if isinstance(frozen, str) or not isinstance(frozen, (list, tuple)):
        _fail("frozen", f"must be a list of regexes, got {frozen!r}")
    for pattern in frozen:
        if not isinstance(pattern, str):
            _fail("frozen", f"entries must be regex strings, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            _fail("frozen", f"bad regex {pattern!r} ({err})")
    positive("router_lr_mult")
    integer("router_delay", 0)
    integer("router_every", 1)
    choice("router_every_mode", ROUTER_EVERY_MODES)
