"""Export v4jax variables to a HuggingFace `deepseek_v4` checkpoint directory (config.json + safetensors).

The inverse of `load.py`'s mapping: kernels back to [out, in], grouped `wo_a` back to [g*d_g, H*c/g],
routed experts fused as HF stores them (`gate_up_proj` = [w1; w3], `down_proj` = w2). MTP blocks have no
HF counterpart and are written under their upstream names (`mtp.K.*`), which HF ignores on load.
"""

from __future__ import annotations

import json
import os

import flax
import numpy as np

from v4jax.interop.hf_config import hf_config_from_model
from v4jax.interop.load import ID, T, leaf_sources
from v4jax.interop.safetensors_io import write_safetensors
from v4jax.model.config import ModelConfig

_MTP_UPSTREAM = {"self_attn.": "attn.", "mlp.": "ffn."}


def _hf_key(name: str) -> str:
    """Canonical name -> the HF state-dict key (`model.` prefix except the head; MTP keeps upstream names)."""
    if name == "lm_head.weight":
        return name
    if name.startswith("mtp."):
        return name  # not loaded by HF; v4jax's loader reads it back
    return "model." + name


def export_hf(cfg: ModelConfig, variables: dict, out_dir: str) -> list[str]:
    """Writes `config.json` and `model.safetensors` (float32) into `out_dir`; returns the tensor names."""
    flat = {f"{coll}:{'/'.join(k)}": np.asarray(v) for coll in ("params", "buffers")
            for k, v in flax.traverse_util.flatten_dict(variables.get(coll, {})).items()}
    tensors: dict[str, np.ndarray] = {}
    experts: dict[str, dict[str, np.ndarray]] = {}
    for key, sources in leaf_sources(cfg).items():
        if key not in flat:
            raise ValueError(f"export: variables lack {key}")
        arr = flat[key]
        for r, name, fn in sources:
            value = arr if r is None else arr[r]
            if "experts:" in name:
                prefix, which = name.split("experts:")
                experts.setdefault(prefix, {})[which] = value
                continue
            if fn is T:
                value = value.T
            elif fn is not ID:  # grouped output projection [g, H*c/g, d_g] -> [g*d_g, H*c/g]
                value = value.transpose(0, 2, 1).reshape(-1, value.shape[1])
            tensors[_hf_key(name)] = np.ascontiguousarray(value)
    for prefix, w in experts.items():
        gate_up = np.concatenate([w["w1"].transpose(0, 2, 1), w["w3"].transpose(0, 2, 1)], axis=1)  # [E, 2I, d]
        tensors[_hf_key(prefix + "mlp.experts.gate_up_proj")] = np.ascontiguousarray(gate_up)
        tensors[_hf_key(prefix + "mlp.experts.down_proj")] = np.ascontiguousarray(w["w2"].transpose(0, 2, 1))
    tensors = {k: v.astype(np.int64) if v.dtype.kind in "iu" else v.astype(np.float32) for k, v in tensors.items()}
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    tmp = os.path.join(out_dir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(hf_config_from_model(cfg), f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "config.json"))
    return sorted(tensors)
