"""Load DeepSeek-V4 checkpoints (HF, upstream, save_pretrained; bf16/fp32 or FP8 + packed FP4) into v4jax.

`load_checkpoint(dir)` reads `config.json` and the safetensors files through memory maps, one tensor at a
time: each tensor is dequantised (FP8 128x128 ue8m0 blocks; FP4 e2m1 packed two per byte with 1x32 ue8m0
scales, decoded by `v4jax.quant`), transposed to v4jax's [in, out] kernels and written into its slot of the
preallocated (layer-stacked) leaf, so no second copy of the checkpoint is ever held. A missing tensor, a
shape mismatch, an unknown dtype or a config field v4jax cannot express is a one-line `CheckpointError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from v4jax.interop.hf_config import (
    CheckpointError,
    model_config_from_hf,
    read_config_json,
)
from v4jax.interop.names import canonical_name
from v4jax.interop.safetensors_io import TensorRef, open_checkpoint
from v4jax.model.config import ModelConfig
from v4jax.model.transformer import Transformer, layer_plan

FP8_BLOCK = 128

T = lambda w: w.T
ID = lambda w: w


def _wo_a(cfg: ModelConfig):
    def f(w):  # [g*d_g, H*c/g] -> [g, H*c/g, d_g]
        return w.reshape(cfg.o_groups, cfg.o_lora_rank, -1).transpose(0, 2, 1)
    return f


def block_table(cfg: ModelConfig, kind: str, hashed: bool) -> dict[str, tuple[str, Callable]]:
    """v4jax leaf path inside a block -> (canonical name suffix inside the layer, transform)."""
    t = {
        "attn_hc/fn": ("attn_hc.fn", ID), "attn_hc/base": ("attn_hc.base", ID), "attn_hc/scale": ("attn_hc.scale", ID),
        "ffn_hc/fn": ("ffn_hc.fn", ID), "ffn_hc/base": ("ffn_hc.base", ID), "ffn_hc/scale": ("ffn_hc.scale", ID),
        "attn_norm/scale": ("input_layernorm.weight", ID), "ffn_norm/scale": ("post_attention_layernorm.weight", ID),
        "attn/wq_a/kernel": ("self_attn.q_a_proj.weight", T), "attn/q_norm/scale": ("self_attn.q_a_norm.weight", ID),
        "attn/wq_b/kernel": ("self_attn.q_b_proj.weight", T), "attn/wkv/kernel": ("self_attn.kv_proj.weight", T),
        "attn/kv_norm/scale": ("self_attn.kv_norm.weight", ID), "attn/wo_a": ("self_attn.o_a_proj.weight", _wo_a(cfg)),
        "attn/wo_b/kernel": ("self_attn.o_b_proj.weight", T), "attn/sink": ("self_attn.sinks", ID),
        "moe/router/kernel": ("mlp.gate.weight", T),
        "moe/shared/w1/kernel": ("mlp.shared_experts.gate_proj.weight", T),
        "moe/shared/w3/kernel": ("mlp.shared_experts.up_proj.weight", T),
        "moe/shared/w2/kernel": ("mlp.shared_experts.down_proj.weight", T),
        "moe/experts/w1": ("experts:w1", ID), "moe/experts/w3": ("experts:w3", ID), "moe/experts/w2": ("experts:w2", ID),
        "buffers:moe/router/" + ("tid2eid" if hashed else "bias"):
            ("mlp.gate.tid2eid" if hashed else "mlp.gate.e_score_correction_bias", ID),
    }
    comp = "self_attn.compressor."
    if kind in ("csa", "hca"):
        t.update({"attn/compressor/wkv/kernel": (comp + "kv_proj.weight", T),
                  "attn/compressor/wgate/kernel": (comp + "gate_proj.weight", T),
                  "attn/compressor/ape": (comp + "position_bias", ID),
                  "attn/compressor/norm/scale": (comp + "kv_norm.weight", ID)})
    if kind == "csa":
        ix = comp + "indexer."
        t.update({"attn/indexer/wq_b/kernel": (ix + "q_b_proj.weight", T),
                  "attn/indexer/weights_proj/kernel": (ix + "scorer.weights_proj.weight", T),
                  "attn/indexer/compressor/wkv/kernel": (ix + "kv_proj.weight", T),
                  "attn/indexer/compressor/wgate/kernel": (ix + "gate_proj.weight", T),
                  "attn/indexer/compressor/ape": (ix + "position_bias", ID),
                  "attn/indexer/compressor/norm/scale": (ix + "kv_norm.weight", ID)})
    return t


def leaf_sources(cfg: ModelConfig) -> dict[str, list[tuple[int | None, str, Callable]]]:
    """For every v4jax leaf ("params:path" / "buffers:path"): [(repeat index or None, canonical name, transform)]."""
    out: dict[str, list] = {}

    def add(key, r, name, fn):
        coll = "buffers" if key.startswith("buffers:") else "params"
        out.setdefault(f"{coll}:{key.split(':', 1)[-1]}", []).append((r, name, fn))

    add("embed/embedding", None, "embed_tokens.weight", ID)
    add("head/kernel", None, "lm_head.weight", T)
    add("norm/scale", None, "norm.weight", ID)
    for leaf in ("fn", "base", "scale"):
        add(f"hc_head/{leaf}", None, f"hc_head.hc_{leaf}", ID)
    for s, seg in enumerate(layer_plan(cfg)):
        for r in range(seg.repeats):
            for j, (kind, hashed) in enumerate(zip(seg.kinds, seg.hashed)):
                layer = seg.start + r * seg.period + j
                for path, (name, fn) in block_table(cfg, kind, hashed).items():
                    coll, _, p = path.rpartition(":")
                    add(f"{coll + ':' if coll else ''}seg{s}/layer{j}/{p}", r, f"layers.{layer}.{name}", fn)
    for k in range(cfg.mtp_depth):
        for path, (name, fn) in block_table(cfg, cfg.mtp_layer_kind, False).items():
            coll, _, p = path.rpartition(":")
            add(f"{coll + ':' if coll else ''}mtp{k}/block/{p}", None, f"mtp.{k}.block.{name}", fn)
        for v4, name, fn in (("e_proj/kernel", "e_proj.weight", T), ("h_proj/kernel", "h_proj.weight", T),
                             ("enorm/scale", "enorm.weight", ID), ("hnorm/scale", "hnorm.weight", ID),
                             ("norm/scale", "norm.weight", ID), ("hc_head/fn", "hc_head.hc_fn", ID),
                             ("hc_head/base", "hc_head.hc_base", ID), ("hc_head/scale", "hc_head.hc_scale", ID)):
            add(f"mtp{k}/{v4}", None, f"mtp.{k}.{name}", fn)
    return out


class TensorSource:
    """Canonically named, dequantised float32 (or integer) tensors of one checkpoint, read lazily."""

    def __init__(self, refs: dict[str, TensorRef], cfg: ModelConfig):
        self.cfg = cfg
        self.refs: dict[str, TensorRef] = {}
        for key, ref in refs.items():
            self.refs[canonical_name(key, cfg.num_layers)] = ref
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.refs

    def get(self, name: str) -> np.ndarray:
        if name not in self.refs:
            raise CheckpointError(f"checkpoint: missing tensor {name}")
        ref = self.refs[name]
        self.used.add(name)
        raw = ref.read()
        scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else None
        if scale_name and scale_name in self.refs:
            self.used.add(scale_name)
            return self._dequantize(name, ref, raw, self.refs[scale_name].read())
        if raw.dtype in (np.int64, np.int32):
            return raw.astype(np.int32)
        if raw.dtype == np.int8 or raw.dtype == np.uint8 or ref.dtype.startswith("F8") or ref.dtype == "F4":
            raise CheckpointError(f"checkpoint: tensor {name} is {ref.dtype} but has no scale tensor")
        return raw.astype(np.float32)

    def _dequantize(self, name, ref: TensorRef, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        scale = _scale_to_float(name, scale)
        if ref.dtype == "F8_E4M3":
            rows, cols = q.shape
            if scale.shape != (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)):
                raise CheckpointError(f"checkpoint: tensor {name} FP8 scale shape {scale.shape} does not fit {q.shape}")
            full = np.repeat(np.repeat(scale, FP8_BLOCK, 0), FP8_BLOCK, 1)[:rows, :cols]
            return q.astype(np.float32) * full
        if ref.dtype in ("I8", "U8", "F4"):
            from v4jax import quant  # FP4 decoding is owned by the quant package

            logical = (*q.shape[:-1], q.shape[-1] * 2)
            if scale.shape != (*logical[:-1], logical[-1] // 32):
                raise CheckpointError(f"checkpoint: tensor {name} FP4 scale shape {scale.shape} does not fit {logical}")
            qa = quant.qarray_from_mxfp4_checkpoint(q.view(np.uint8), _scale_bytes(scale), dtype=jnp.float32)
            return np.asarray(quant.dequantize(qa), np.float32)
        raise CheckpointError(f"checkpoint: tensor {name} has a scale but unsupported dtype {ref.dtype}")

    def experts(self, layer_prefix: str, which: str) -> np.ndarray:
        """Stacked routed-expert weights [E, in, out] for v4jax (w1/w3: [E, d, I]; w2: [E, I, d])."""
        cfg = self.cfg
        E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
        fused = f"{layer_prefix}mlp.experts.gate_up_proj"
        if which in ("w1", "w3") and self.has(fused):
            gu = self.get(fused)  # [E, 2I, d], rows [0:I] = gate (w1), [I:2I] = up (w3)
            _check(fused, gu.shape, (E, 2 * I, cfg.hidden_size))
            part = gu[:, :I] if which == "w1" else gu[:, I:]
            return part.transpose(0, 2, 1)
        down = f"{layer_prefix}mlp.experts.down_proj"
        if which == "w2" and self.has(down):
            w = self.get(down)
            _check(down, w.shape, (E, cfg.hidden_size, I))
            return w.transpose(0, 2, 1)
        out = None
        for e in range(E):
            name = f"{layer_prefix}mlp.experts.{e}.{which}.weight"
            w = self.get(name).T  # [in, out]
            if out is None:
                out = np.empty((E, *w.shape), np.float32)
            _check(name, w.shape, out.shape[1:])
            out[e] = w
        return out


def _scale_to_float(name: str, scale: np.ndarray) -> np.ndarray:
    if scale.dtype == ml_dtypes.float8_e8m0fnu or scale.dtype == np.uint8:
        return np.ldexp(1.0, scale.view(np.uint8).astype(np.int32) - 127).astype(np.float32)
    if scale.dtype in (np.float32, ml_dtypes.bfloat16, np.float16):
        return scale.astype(np.float32)
    raise CheckpointError(f"checkpoint: scale of {name} has unsupported dtype {scale.dtype}")


def _scale_bytes(scale_f32: np.ndarray) -> np.ndarray:
    """Power-of-two float scales back to E8M0 bytes (exact for ue8m0 checkpoints)."""
    m, e = np.frexp(scale_f32)
    if not np.all(m == 0.5):
        raise CheckpointError("checkpoint: FP4 scales are not powers of two (not ue8m0)")
    return (e - 1 + 127).astype(np.uint8)


def _check(name: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"checkpoint: tensor {name} has shape {tuple(got)}, expected {tuple(want)}")


def load_checkpoint(checkpoint_dir: str, *, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """Returns (ModelConfig, variables {'params', 'buffers'}) of a DeepSeek-V4 checkpoint directory."""
    hf = read_config_json(checkpoint_dir)
    refs = open_checkpoint(checkpoint_dir)
    has_mtp = any(canonical_name(k, hf.get("num_hidden_layers", 0)).startswith("mtp.") for k in refs)
    cfg = model_config_from_hf(hf, mtp_depth=None if has_mtp else 0)
    if has_mtp and cfg.mtp_depth == 0:
        cfg = model_config_from_hf(hf, mtp_depth=1)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    src = TensorSource(refs, cfg)

    model = Transformer(cfg)
    abstract = jax.eval_shape(lambda: model.init_variables(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    flat = {f"{coll}:{'/'.join(k)}": v for coll in ("params", "buffers")
            for k, v in flax.traverse_util.flatten_dict(abstract.get(coll, {})).items()}
    sources = leaf_sources(cfg)
    extra = sorted(set(flat) - set(sources))
    if extra:
        raise CheckpointError(f"interop: no checkpoint mapping for v4jax leaf {extra[0]}")
    loaded = {}
    for key, spec in flat.items():
        arr = np.empty(spec.shape, np.dtype(spec.dtype))
        for r, name, fn in sources[key]:
            if "experts:" in name:  # routed experts are assembled from fused or per-expert tensors
                prefix, which = name.split("experts:")
                value = src.experts(prefix, which)
            else:
                value = fn(src.get(name))
            target = arr if r is None else arr[r]
            _check(name, value.shape, target.shape)
            target[...] = value
        loaded[key] = arr
    unused = sorted(set(src.refs) - src.used)
    if unused:
        raise CheckpointError(f"checkpoint: unexpected tensor {unused[0]} (not part of this config)")
    variables: dict = {"params": {}, "buffers": {}}
    for key, arr in loaded.items():
        coll, path = key.split(":", 1)
        variables[coll][tuple(path.split("/"))] = arr
    return cfg, {c: flax.traverse_util.unflatten_dict(v) for c, v in variables.items()}

