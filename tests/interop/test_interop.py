"""Checkpoint loading edge cases: bad checkpoints are one-line errors; hf_forward; export round trip;
FP4 experts decode identically through `quant` and through the loader."""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from v4jax import quant
from v4jax.interop import CheckpointError, export_hf, load_checkpoint
from v4jax.interop.safetensors_io import open_checkpoint, read_header, write_safetensors
from v4jax.model import layer_plan
from v4jax.tools import hf_forward

GOLDENS = os.path.join(os.path.dirname(__file__), "..", "goldens")


def copy_case(tmp_path, case):
    dst = tmp_path / case
    shutil.copytree(os.path.join(GOLDENS, case), dst)
    return dst


def rewrite(path, edit):
    """Re-writes model.safetensors after `edit(dict of numpy arrays)`."""
    refs = read_header(str(path / "model.safetensors"))
    tensors = {k: np.array(r.read()) for k, r in refs.items()}
    edit(tensors)
    write_safetensors(str(path / "model.safetensors"), tensors)


def expect_error(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_checkpoint(str(path))
    assert "\n" not in str(e.value)


def test_missing_tensor(tmp_path):
    p = copy_case(tmp_path, "hf_base")
    rewrite(p, lambda t: t.pop("model.layers.1.self_attn.q_b_proj.weight"))
    expect_error(p, r"missing tensor layers\.1\.self_attn\.q_b_proj\.weight")


def test_shape_mismatch(tmp_path):
    p = copy_case(tmp_path, "hf_base")
    rewrite(p, lambda t: t.__setitem__("model.norm.weight", np.ones(7, np.float32)))
    expect_error(p, r"norm\.weight has shape \(7,\)")


def test_unexpected_tensor(tmp_path):
    p = copy_case(tmp_path, "hf_base")
    rewrite(p, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", np.ones(3, np.float32)))
    expect_error(p, r"unexpected tensor layers\.0\.self_attn\.extra\.weight")


def test_unknown_dtype(tmp_path):
    p = copy_case(tmp_path, "hf_base")
    f = p / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["model.norm.weight"]["dtype"] = "C64"
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    f.write_bytes(raw[:8] + new + raw[8 + n:])
    expect_error(p, r"norm\.weight has unknown dtype C64")


def test_truncated_file(tmp_path):
    p = copy_case(tmp_path, "hf_base")
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    expect_error(p, r"extends past the end of the file")


def test_corrupt_header(tmp_path):
    p = copy_case(tmp_path, "hf_base")
    f = p / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:8] + b"{not json" + raw[17:])
    expect_error(p, r"corrupt safetensors header")


def test_missing_shard(tmp_path):
    p = copy_case(tmp_path, "hf_hc2")
    shards = sorted(x for x in os.listdir(p) if x.endswith(".safetensors"))
    os.remove(p / shards[-1])
    expect_error(p, r"lists shard .* which does not exist")


@pytest.mark.parametrize("field,value", [("scoring_func", "softmax"), ("tie_word_embeddings", True),
                                         ("hidden_act", "gelu"), ("mlp_layer_types", ["moe", "hash_moe", "moe"])])
def test_config_v4jax_cannot_express(tmp_path, field, value):
    p = copy_case(tmp_path, "hf_base")
    cfg = json.loads((p / "config.json").read_text())
    cfg[field] = value
    (p / "config.json").write_text(json.dumps(cfg))
    expect_error(p, f"config.json: {field}")


def test_fp8_weight_without_scale(tmp_path):
    p = copy_case(tmp_path, "upstream_fp8_fp4")
    name = [k for k in read_header(str(p / "model.safetensors")) if k.endswith("wq_a.scale")][0]
    rewrite(p, lambda t: t.pop(name))
    expect_error(p, r"F8_E4M3 but has no scale tensor")


def test_fp4_experts_decode_identically_through_quant_and_loader():
    path = os.path.join(GOLDENS, "upstream_fp8_fp4")
    cfg, v = load_checkpoint(path)
    refs = open_checkpoint(path)
    w = refs["layers.1.ffn.experts.2.w1.weight"].read()
    s = refs["layers.1.ffn.experts.2.w1.scale"].read()
    assert w.dtype == np.int8 and s.dtype == ml_dtypes.float8_e8m0fnu
    direct = np.asarray(quant.dequantize(quant.qarray_from_mxfp4_checkpoint(w, s, dtype=jnp.float32)))
    # independent decode: LUT on nibbles (element 2i in the low nibble) times 2^(e-127)
    lut = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    b = w.view(np.uint8)
    vals = np.stack([lut[b & 15], lut[b >> 4]], -1).reshape(w.shape[0], -1)
    ref = vals * np.repeat(np.ldexp(1.0, s.view(np.uint8).astype(np.int32) - 127), 32, axis=1)
    np.testing.assert_array_equal(direct, ref)
    # the loader's stacked leaf for layer 1, expert 2 ([in, out], the transpose of the checkpoint's [out, in])
    s_idx, segm = next((i, sg) for i, sg in enumerate(layer_plan(cfg)) if 1 in sg.layers())
    r, j = divmod(1 - segm.start, segm.period)
    got = v["params"][f"seg{s_idx}"][f"layer{j}"]["moe"]["experts"]["w1"][r][2]
    np.testing.assert_array_equal(got, ref.T)


@pytest.mark.parametrize("case", ["hf_base", "upstream_fp8_fp4"])
def test_hf_forward_cli(tmp_path, case, capsys):
    golden = np.load(os.path.join(GOLDENS, case, "golden.npz"))
    np.save(tmp_path / "tokens.npy", golden["input_ids"])
    rc = hf_forward.main(["--checkpoint", os.path.join(GOLDENS, case), "--tokens", str(tmp_path / "tokens.npy"),
                          "--out", str(tmp_path / "logits.npy")])
    assert rc == 0
    logits = np.load(tmp_path / "logits.npy")
    assert logits.dtype == np.float32 and logits.shape == golden["logits"].shape
    assert np.linalg.norm(logits - golden["logits"]) / np.linalg.norm(golden["logits"]) < 1e-5


def test_hf_forward_bad_input(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), np.int32))
    rc = hf_forward.main(["--checkpoint", os.path.join(GOLDENS, "hf_base"), "--tokens", str(tmp_path / "bad.npy"),
                          "--out", str(tmp_path / "o.npy")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --tokens") and "\n" not in err and not (tmp_path / "o.npy").exists()
    rc = hf_forward.main(["--checkpoint", str(tmp_path / "nope"), "--tokens", str(tmp_path / "bad.npy"),
                          "--out", str(tmp_path / "o.npy")])
    assert rc == 2


def test_export_round_trip(tmp_path):
    cfg, v = load_checkpoint(os.path.join(GOLDENS, "upstream"))  # with an MTP block
    names = export_hf(cfg, v, str(tmp_path / "out"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "lm_head.weight" in names
    cfg2, v2 = load_checkpoint(str(tmp_path / "out"))
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(v2)):
        np.testing.assert_array_equal(a, b)
    # the HF-named tensors equal the original HF checkpoint's
    orig = {k: r.read() for k, r in read_header(os.path.join(GOLDENS, "hf_base", "model.safetensors")).items()}
    out = {k: r.read() for k, r in read_header(str(tmp_path / "out" / "model.safetensors")).items()}
    for k, x in orig.items():
        np.testing.assert_array_equal(out[k], x.astype(out[k].dtype), err_msg=k)
