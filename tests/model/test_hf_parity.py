"""float32 parity with HuggingFace transformers 5.24.0 `DeepseekV4ForCausalLM` on the committed goldens.

The goldens (tests/goldens/*, made by scripts/hf_goldens.py in a torch venv) cover sliding/CSA/HCA
layers, YaRN, hash and learned routing, hc_mult 2 and 4, an active SwiGLU clamp, batch > 1, sequences
ending mid-window, and every checkpoint layout (HF, sharded HF, upstream, save_pretrained, FP8/FP4).
Seeds were chosen so router, indexer and argmax margins are >= 1e-4: selections must match exactly.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.interop import load_checkpoint
from v4jax.model import Transformer

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "goldens")
CASES = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(GOLDENS, "*", "golden.npz")))


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def sorted_picks(idx):
    """Rows of picks as sets: valid indices ascending, then -1s."""
    idx = np.asarray(idx)
    key = np.where(idx < 0, np.iinfo(np.int32).max, idx)
    return np.take_along_axis(idx, np.argsort(key, axis=-1, kind="stable"), -1)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    with jax.default_matmul_precision("highest"):
        name = request.param
        path = os.path.join(GOLDENS, name)
        cfg, variables = load_checkpoint(path)
        golden = dict(np.load(os.path.join(path, "golden.npz")))
        out = jax.jit(Transformer(cfg, capture=True).apply)(variables, jnp.asarray(golden["input_ids"]))
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        return name, cfg, golden, jax.device_get(out), meta


def test_goldens_present():
    assert len(CASES) >= 7, CASES


def test_logits_match(case):
    name, _, golden, out, _ = case
    err = rel_l2(out.logits, golden["logits"])
    assert err <= 1e-5, f"{name}: logits relative L2 error {err:.2e}"
    assert np.array_equal(np.argmax(out.logits, -1), np.argmax(golden["logits"], -1))


def test_every_layer_matches(case):
    name, cfg, golden, out, _ = case
    for i in range(cfg.num_layers):
        for ours, theirs in (("attn_out", "attn_out_%d"), ("moe_out", "moe_out_%d"), ("layer_out", "layer_out_%d")):
            err = rel_l2(out.aux[ours][i], golden[theirs % i])
            assert err <= 1e-5, f"{name}: layer {i} {ours} relative L2 error {err:.2e}"
    assert rel_l2(out.aux["final_hidden"], golden["final_hidden"]) <= 1e-5


def test_router_selections_identical(case):
    name, cfg, golden, out, _ = case
    for i in range(cfg.num_layers):
        idx = np.asarray(out.aux["router_indices"][i]).reshape(-1, cfg.num_experts_per_tok)
        w = np.asarray(out.aux["router_weights"][i]).reshape(idx.shape)
        order = np.argsort(idx, -1)
        np.testing.assert_array_equal(np.take_along_axis(idx, order, -1), golden[f"router_idx_{i}"],
                                      err_msg=f"{name}: router picks of layer {i}")
        np.testing.assert_allclose(np.take_along_axis(w, order, -1), golden[f"router_w_{i}"], rtol=1e-5, atol=1e-6)


def test_indexer_selections_identical(case):
    name, cfg, golden, out, _ = case
    csa = [i for i, k in enumerate(cfg.layer_kinds) if k == "csa"]
    assert all(f"indexer_idx_{i}" in golden for i in csa)
    for i in csa:
        ours = sorted_picks(out.aux["indexer"][i]["indices"])
        np.testing.assert_array_equal(ours, golden[f"indexer_idx_{i}"], err_msg=f"{name}: indexer picks of layer {i}")
