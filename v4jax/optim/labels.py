"""Which optimizer each parameter gets: rules on the '/'-joined parameter path.

Labels are "frozen" (matches `config.optim.frozen`; takes precedence), "router" (the MoE gate,
its own delayed schedule), "adamw" (embedding, head, norm scales, mHC base/scale, sinks, position
biases: the paper's AdamW group) and "muon" (the matrices). The rules are data (`LABEL_RULES`);
a leaf that no rule matches is an error naming its path, so a new parameter cannot silently land
in the wrong optimizer.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections

LABELS = ("adamw", "muon", "router", "frozen")

_NORMS = "attn_norm|ffn_norm|q_norm|kv_norm|norm|enorm|hnorm"
# (label, regex on the path, minimum rank). The rules are mutually exclusive (a test checks it), so
# their order does not matter; "frozen" (config.optim.frozen) is checked before all of them.
LABEL_RULES: tuple[tuple[str, str, int], ...] = (
    ("router", r"(^|/)moe/router/kernel$", 2),
    ("adamw", r"(^|/)embed/embedding$", 2),
    ("adamw", r"(^|/)head/kernel$", 2),
    ("adamw", rf"(^|/)({_NORMS})/scale$", 1),
    ("adamw", r"(^|/)(attn_hc|ffn_hc|hc_head)/(base|scale)$", 1),
    ("adamw", r"(^|/)sink$", 1),
    ("adamw", r"(^|/)ape$", 1),
    # Matrices: projections (…/kernel), the grouped output projection `wo_a` [g, in, out], mHC `fn`,
    # experts' w1/w2/w3 [E, in, out]. Named explicitly rather than
    # "any >= 2-D leaf" because a scanned per-layer vector is 2-D too and must not be orthogonalised.
    (
        "muon",
        r"^(?!(.*/)?(head|moe/router)/kernel$).*(^|/)(kernel|fn|w1|w2|w3|wo_a)$",
        2,
    ),
)


def path_to_str(path: tuple[Any, ...]) -> str:
    """'/'-join a jax key path (dict keys, attributes, sequence indices).

    The `.value` attribute through which flax's boxed parameters (`nn.Partitioned`,
    `nn.LogicallyPartitioned`) flatten is skipped, so boxed and unboxed trees get the same paths.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def label_for_path(path: str, ndim: int, frozen_patterns: tuple[str, ...] = ()) -> str:
    """The label of one leaf; ValueError naming the path when no rule matches."""
    if any(re.search(pattern, path) for pattern in frozen_patterns):
        return "frozen"
    matches = [
        (label, min_rank)
        for label, pattern, min_rank in LABEL_RULES
        if re.search(pattern, path)
    ]
    if len(matches) > 1:
        raise ValueError(
            f"parameter {path!r} matches several optimizer rules: {[label for label, _ in matches]}"
        )
    for label, min_rank in matches:
        if ndim < min_rank:
            raise ValueError(
                f"parameter {path!r} matches the {label!r} rule but has rank {ndim} < {min_rank}"
            )
        return label
    raise ValueError(
        f"parameter {path!r} (rank {ndim}) matches no optimizer rule (see v4jax.optim.labels.LABEL_RULES)"
        " or freeze it with config.optim.frozen"
    )


def param_labels(params: Any, cfg: ml_collections.ConfigDict) -> Any:
    """A pytree like `params` holding one label in `LABELS` per leaf (see `LABEL_RULES`)."""
    frozen = tuple(cfg.frozen)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: label_for_path(path_to_str(path), leaf.ndim, frozen), params
    )


def trainable_mask(labels: Any) -> Any:
    """True for every leaf that is not frozen."""
    return jax.tree.map(lambda label: label != "frozen", labels)
