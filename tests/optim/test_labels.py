"""Parameter labels: every leaf gets exactly one label; rules do not overlap; unknown leaves fail."""

import re

import jax
import numpy as np
import pytest

from tests.optim.fake_params import fake_params
from v4jax.optim import (
    LABEL_RULES,
    LABELS,
    default_optim_config,
    param_labels,
    path_to_str,
)


def _flat_labels(params, cfg):
    labels = param_labels(params, cfg)
    return {
        path_to_str(p): label
        for p, label in jax.tree_util.tree_leaves_with_path(labels)
    }


def test_every_leaf_has_exactly_one_label():
    params = fake_params()
    labels = param_labels(params, default_optim_config())
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat = jax.tree.leaves(labels)
    assert all(label in LABELS for label in flat)
    counts = {label: flat.count(label) for label in LABELS}
    assert sum(counts.values()) == len(jax.tree.leaves(params))
    assert (
        counts["router"] == 2
        and counts["frozen"] == 0
        and counts["muon"] > 0
        and counts["adamw"] > 0
    )


def test_exactly_one_rule_matches_each_leaf():
    for path, leaf in jax.tree_util.tree_leaves_with_path(fake_params()):
        name = path_to_str(path)
        matched = [
            label for label, pattern, _ in LABEL_RULES if re.search(pattern, name)
        ]
        assert len(matched) == 1, (name, matched)


@pytest.mark.parametrize(
    "path, expected",
    [
        ("embed/embedding", "adamw"),
        ("head/kernel", "adamw"),
        ("norm/scale", "adamw"),
        ("hc_head/fn", "muon"),
        ("hc_head/base", "adamw"),
        ("hc_head/scale", "adamw"),
        ("seg0/layer0/attn/sink", "adamw"),
        ("seg0/layer0/attn/compressor/ape", "adamw"),
        ("seg0/layer0/attn/compressor/norm/scale", "adamw"),
        ("seg0/layer0/attn/q_norm/scale", "adamw"),
        ("seg0/layer0/attn/wo_a", "muon"),
        ("seg0/layer0/attn/indexer/weights_proj/kernel", "muon"),
        ("seg0/layer0/ffn_hc/fn", "muon"),
        ("seg0/layer0/ffn_hc/base", "adamw"),
        ("seg0/layer0/moe/router/kernel", "router"),
        ("seg0/layer0/moe/experts/w2", "muon"),
        ("seg0/layer0/moe/shared/w1/kernel", "muon"),
        ("mtp0/enorm/scale", "adamw"),
        ("mtp0/e_proj/kernel", "muon"),
        ("mtp0/block/moe/router/kernel", "router"),
    ],
)
def test_paper_partition(path, expected):
    assert _flat_labels(fake_params(), default_optim_config())[path] == expected


def test_frozen_takes_precedence():
    cfg = default_optim_config()
    cfg.frozen = [r"/indexer/", r"^embed/"]
    flat = _flat_labels(fake_params(), cfg)
    frozen = {path for path, label in flat.items() if label == "frozen"}
    assert (
        "embed/embedding" in frozen
        and "seg0/layer0/attn/indexer/compressor/ape" in frozen
    )
    assert all(("/indexer/" in path) or path.startswith("embed/") for path in frozen)
    assert flat["seg0/layer0/attn/compressor/ape"] == "adamw"


@pytest.mark.parametrize("extra", [{"bias": np.zeros(3)}, {"gate": np.zeros((3, 3))}])
def test_unmatched_leaf_is_an_error_naming_its_path(extra):
    params = fake_params()
    params["seg0"]["layer0"]["attn"]["wq_a"].update(extra)
    name = next(iter(extra))
    with pytest.raises(ValueError, match=f"seg0/layer0/attn/wq_a/{name}"):
        param_labels(params, default_optim_config())


def test_vector_where_a_matrix_is_expected_is_an_error():
    params = fake_params()
    params["head"]["kernel"] = np.zeros(4)
    with pytest.raises(ValueError, match="head/kernel"):
        param_labels(params, default_optim_config())


def _tiny_model_params():
    """Abstract (shape-only) parameters of the real tiny model."""
    import jax.numpy as jnp

    from v4jax.model import ModelConfig, Transformer, presets

    model = Transformer(ModelConfig.from_config(presets.tiny()))
    tokens = jnp.zeros((1, 16), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
    return variables["params"]


def test_real_model_tree_is_fully_labelled():
    params = _tiny_model_params()
    flat = {
        path_to_str(p): label
        for p, label in jax.tree_util.tree_leaves_with_path(
            param_labels(params, default_optim_config())
        )
    }
    for name in flat:
        matched = [lab for lab, pattern, _ in LABEL_RULES if re.search(pattern, name)]
        assert len(matched) == 1, (name, matched)
    routers = [name for name, label in flat.items() if label == "router"]
    assert routers and all(name.endswith("moe/router/kernel") for name in routers)
    assert flat["embed/embedding"] == "adamw" and flat["head/kernel"] == "adamw"
    assert all(
        label == "muon" for name, label in flat.items() if name.endswith("/wo_a")
    )
